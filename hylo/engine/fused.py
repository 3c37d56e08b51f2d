"""A decode step with RMSNorm, SwiGLU and the residual adds fused into the GEMV (``HYLO_GEMV_FUSE=on``).

Why: at batch 1 the compiled, graphed step of a Qwen3-0.6B-shaped model runs 368 kernels per token on an H100,
and the 199 that are not matrix products take 0.35 ms of its 1.17 ms of kernel time, mostly as launch and
ramp-up of tiny kernels (``benchmarks/results/qwen3-vs-transformers-h100-run5-partial.json``). Here each block's
pre-norm moves into the prologue of its first product, SwiGLU's ``silu(gate) * up`` into the prologue of the
down projection, and the residual add into the epilogue of the last product (``hylo.ops.gemv``), which removes
three kernels per layer (two norms and the SwiGLU product), plus the final norm before the LM head.

Blocks of ``attn``/``swa`` and ``ffn`` are fused; the others run their own ``Block.step`` (their products still
take the GEMV through ``gemv_linears``). ``DecodeRunner`` takes this path when the GEMV is on, the switch is on,
the batch has at most ``gemv.MAX_ROWS`` rows and the model's weights share its activations' dtype. Off by default
until the whole step has been timed with it on a GPU (``benchmarks/qwen3_vs_transformers.py --modes
default,default+fuse``).
"""

from __future__ import annotations

import torch

from hylo.layers.attention import Attention
from hylo.layers.ffn import SwiGLU
from hylo.ops import gemv as G
from hylo.ops.backend import Choice

_FUSE = Choice("fused decode step", "HYLO_GEMV_FUSE", ("off", "on"), "off")
set_fuse, get_fuse, fuse_mode = _FUSE.set, _FUSE.get, _FUSE.use


def fusable(block) -> bool:
    """Whether :func:`block_step` computes ``block`` (attention or SwiGLU with contiguous weights)."""
    m = block.mixer
    if isinstance(m, SwiGLU):
        linears = (m.gate_up_proj, m.down_proj)
    elif isinstance(m, Attention):
        linears = (m.qkv_proj, m.o_proj)
    else:
        return False
    return all(lin.weight.is_contiguous() for lin in linears)


def enabled(model, batch_size: int) -> bool:
    """Whether a runner with the GEMV on takes the fused step for ``model`` at ``batch_size``: the switch is on, the
    batch fits the GEMV and one dtype holds the embeddings and every fused weight (the kernel's requirement)."""
    if _FUSE.value != "on" or batch_size > G.MAX_ROWS:
        return False
    dtype = model.embed_tokens.weight.dtype
    return all(p.dtype == dtype for b in model.layers if fusable(b) for p in b.parameters()) and \
        model.norm.weight.dtype == dtype


def block_step(block, h: torch.Tensor, state, pos: torch.Tensor) -> torch.Tensor:
    """``block.step`` on the residual stream ``h [B, D]`` with fused kernels: ``h + mixer(norm(h))``."""
    n, m = block.norm, block.mixer
    if isinstance(m, SwiGLU):
        gu = G.gemv(h, m.gate_up_proj.weight, m.gate_up_proj.bias, n.weight, n.eps)
        return G.gemv(gu, m.down_proj.weight, m.down_proj.bias, residual=h, swiglu=True)
    qkv = G.gemv(h, m.qkv_proj.weight, m.qkv_proj.bias, n.weight, n.eps)
    o = m.step_heads(qkv[:, None], state, pos)[:, 0]
    return G.gemv(o, m.o_proj.weight, m.o_proj.bias, residual=h)


def step(model, tokens: torch.Tensor, states, pos: torch.Tensor, head: torch.Tensor,
         plan: list[bool]) -> torch.Tensor:
    """One decode step (the runner's ``decode_step`` without host bookkeeping), fused where ``plan`` says
    (:func:`fusable` of each block, computed once by the runner); returns the logits ``[B, vocab]`` and advances
    ``pos``."""
    h = model.embed_tokens(tokens.view(-1))
    for block, st, fuse in zip(model.layers, states, plan):
        h = block_step(block, h, st, pos) if fuse else block.step(h[:, None], st, pos)[:, 0]
    pos.add_(1)
    return G.gemv(h, head, None, model.norm.weight, model.norm.eps)
