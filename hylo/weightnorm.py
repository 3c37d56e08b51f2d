"""Nemotron-Flash weight normalization: project every matrix onto the unit sphere after each optimizer step.

A simplified nGPT that normalizes weights only (activations keep their RMSNorms):

- a matrix that *reads* hidden features (attention's ``qkv_proj``, FFN ``gate_up_proj``, Mamba2 ``in_proj``, the
  linear operators' ``b/a/g_proj``, ...: every ``nn.Linear`` inside a block whose input is the block's
  normed hidden state) has each **row** (one output unit's weights) set to unit L2 norm;
- a matrix whose output is **added to the residual stream** (``o_proj``, ``out_proj``, ``down_proj``) has
  each **column** (one input unit's write direction) set to unit L2 norm;
- the LM head: logits are computed from unit-norm rows (``HybridLM.logits``); an untied head is also
  projected here so its stored rows stay on the sphere. A tied embedding is not projected (that would
  rescale the inputs): only its use as the head is normalized.

Left alone: vectors (norm weights, biases, A_log, dt_bias, D), conv kernels and JetBlock's kernel
generator (its zero initialisation makes the block start as a static conv; normalizing it would undo that).
The trainer calls :func:`normalize_weights` after every ``optimizer.step()`` and uses no weight decay.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import RESIDUAL_WRITERS, HybridLM

EXCLUDED = ("kernel_generator",)


def weight_norm_targets(model: HybridLM) -> list[tuple[str, nn.Parameter, int]]:
    """``(name, weight, dim)`` for every projected matrix; ``dim`` is the dim reduced by the norm
    (1: rows, 0: columns)."""
    out = []
    for name, mod in model.layers.named_modules():
        if not isinstance(mod, nn.Linear) or any(e in name for e in EXCLUDED):
            continue
        dim = 0 if name.split(".")[-1] in RESIDUAL_WRITERS else 1
        out.append((f"layers.{name}.weight", mod.weight, dim))
    if not model.config.tie_word_embeddings:
        out.append(("lm_head.weight", model.lm_head.weight, 1))
    return out


@torch.no_grad()
def normalize_weights(model: HybridLM, eps: float = 1e-8) -> None:
    """Project the matrices listed by :func:`weight_norm_targets` onto the unit sphere, in place."""
    for _, w, dim in weight_norm_targets(model):
        w.div_(w.norm(dim=dim, keepdim=True).clamp_min(eps))
