"""The pieces of one decode step, built from a LUT signature alone (no whole model): for timing them on a device
(the LUT builder) and, on the meta device, for counting the bytes of their weights and state (the predictor).

Every piece has ``step(x, state, pos)``, ``init_state(batch, cache_len, device, dtype)`` and ``inputs(batch,
device, dtype)`` (the ``x`` a step takes), like the layers, so one timing loop serves all of them.
"""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import torch
from torch import nn

from ..config import HyloConfig
from ..layers import layer_class
from .lut import KERNEL_STEP_BASE, LAYER_OPS, SIG_FIELDS, LUTError, sig_key


def config_for(op: str, sig: dict) -> HyloConfig:
    """A config whose layer of operator ``op`` has the shape ``sig`` describes."""
    if op not in LAYER_OPS:
        raise LUTError(f"{op!r} is not a layer operator ({list(LAYER_OPS)})")
    missing = [f for f in SIG_FIELDS[op] if f not in sig]
    if missing:
        raise LUTError(f"signature of {op} lacks {missing}: {sig}")
    if op == "ffn":  # a pattern needs a token mixer: a one-head DeltaNet is valid at any width
        return HyloConfig(vocab_size=16, layers="d f", deltanet_num_heads=1, deltanet_head_dim=sig["hidden_size"],
                          **sig)
    return HyloConfig(vocab_size=16, layers=[op], **sig)


class LayerPiece(nn.Module):
    """One layer's ``step`` (the operator alone; the block's norm and residual add are the ``norm`` piece)."""

    def __init__(self, op: str, sig: dict):
        super().__init__()
        cfg = config_for(op, sig)
        self.hidden_size = cfg.hidden_size
        self.layer = layer_class(op)(cfg, cfg.layers.index(op))

    def step(self, x, state, pos):
        return self.layer.step(x, state, pos)

    def init_state(self, batch_size, cache_len, device=None, dtype=None):
        return self.layer.init_state(batch_size, cache_len, device=device, dtype=dtype)

    def inputs(self, batch_size, device, dtype):
        return torch.randn(batch_size, 1, self.hidden_size, device=device, dtype=dtype)


class NormPiece(nn.Module):
    """A block's pre-norm and residual add: ``x + norm(x)`` (the operator's output stands in for ``norm(x)``)."""

    def __init__(self, sig: dict):
        super().__init__()
        from ..layers.norm import RMSNorm

        self.hidden_size = sig["hidden_size"]
        self.norm = RMSNorm(self.hidden_size)

    def step(self, x, state, pos):
        return x + self.norm(x)

    def init_state(self, batch_size, cache_len, device=None, dtype=None):
        return {}

    def inputs(self, batch_size, device, dtype):
        return torch.randn(batch_size, 1, self.hidden_size, device=device, dtype=dtype)


class EmbedPiece(nn.Module):
    """The token embedding of one token per row, as ``HybridLM.decode_step`` does it."""

    def __init__(self, sig: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(sig["vocab_size"], sig["hidden_size"])

    def step(self, ids, state, pos):
        return self.embed_tokens(ids.view(-1, 1))

    def init_state(self, batch_size, cache_len, device=None, dtype=None):
        return {}

    def inputs(self, batch_size, device, dtype):
        return torch.randint(0, self.embed_tokens.num_embeddings, (batch_size,), device=device)


class HeadPiece(nn.Module):
    """Final norm + LM head: ``HybridLM.logits(norm(x))`` (unit-norm head rows when ``weight_norm``)."""

    def __init__(self, sig: dict):
        super().__init__()
        from ..layers.norm import RMSNorm

        self.hidden_size = sig["hidden_size"]
        self.norm = RMSNorm(self.hidden_size)
        self.lm_head = nn.Linear(self.hidden_size, sig["vocab_size"], bias=False)
        self.config = SimpleNamespace(weight_norm=bool(sig["weight_norm"]))

    def head_weight(self):
        from ..model import HybridLM

        return HybridLM.head_weight(self)

    def step(self, x, state, pos):
        from ..model import HybridLM

        return HybridLM.logits(self, self.norm(x))[:, 0]  # the model's own code, so the cost is the same

    def init_state(self, batch_size, cache_len, device=None, dtype=None):
        return {}

    def inputs(self, batch_size, device, dtype):
        return torch.randn(batch_size, 1, self.hidden_size, device=device, dtype=dtype)


class KernelBlockPiece(nn.Module):
    """A whole block (pre-norm, operator, residual) as :mod:`hylo.engine.kernel_step` computes it: ``kattn``,
    ``kswa`` or ``kffn``; its GEMVs and attention launched with PDL where :mod:`hylo.ops.pdl` is on, as in the
    step. ``x`` is ``[B, D]`` (the step's rows), ``pos`` ``[B]``. Needs the GEMV (CUDA, or Triton's interpreter)."""

    def __init__(self, op: str, sig: dict):
        super().__init__()
        from ..layers.norm import RMSNorm

        base = KERNEL_STEP_BASE[op]
        cfg = config_for(base, sig)
        self.hidden_size = cfg.hidden_size
        self.norm = RMSNorm(cfg.hidden_size)
        self.mixer = layer_class(base)(cfg, cfg.layers.index(base))
        self.attention = base != "ffn"
        self._freq = None

    def step(self, x, state, pos):
        from ..engine import kernel_step as K
        from ..ops import pdl
        from ..ops.rope import inv_freq

        on = pdl.enabled(x.device)
        gemv = K.gemv_launcher(on, pdl.persistent())
        if not self.attention:
            return K.ffn_block(self, x, gemv)[0]
        if self._freq is None:
            self._freq = inv_freq(self.mixer.head_dim, self.mixer.rope_theta, x.device)
        return K.attn_block(self, x, state, pos, self._freq, gemv, on)[0]

    def init_state(self, batch_size, cache_len, device=None, dtype=None):
        return self.mixer.init_state(batch_size, cache_len, device=device, dtype=dtype) if self.attention else {}

    def inputs(self, batch_size, device, dtype):
        return torch.randn(batch_size, self.hidden_size, device=device, dtype=dtype)


class KernelHeadPiece(HeadPiece):
    """``khead``: the final norm inside the LM head's GEMV, as the kernel step computes it (a weight-normalized
    head is normalized once per runner, outside the step)."""

    def step(self, x, state, pos):
        from ..engine import kernel_step as K
        from ..ops import pdl

        return K.head_logits(x, self.lm_head.weight, self.norm, K.gemv_launcher(pdl.enabled(x.device),
                                                                                pdl.persistent()))

    def inputs(self, batch_size, device, dtype):
        return torch.randn(batch_size, self.hidden_size, device=device, dtype=dtype)


def make_piece(op: str, sig: dict) -> nn.Module:
    """A fresh piece (random weights, on the current default device) for ``op`` with signature ``sig``."""
    if op in ("kattn", "kswa", "kffn"):
        return KernelBlockPiece(op, sig)
    if op == "khead":
        return KernelHeadPiece(sig)
    if op in LAYER_OPS:
        return LayerPiece(op, sig)
    if op == "norm":
        return NormPiece(sig)
    if op == "embed":
        return EmbedPiece(sig)
    if op == "head":
        return HeadPiece(sig)
    raise LUTError(f"no piece module for {op!r} (overhead is timed on its own)")


@functools.lru_cache(maxsize=1024)
def _meta_piece(op: str, key: str) -> nn.Module:
    sig = json.loads(key.split(":", 1)[1])
    with torch.device("meta"):
        return make_piece(op, sig)


def meta_piece(op: str, sig: dict) -> nn.Module:
    """The piece on the meta device (no memory; cached): for counting parameters and state bytes."""
    return _meta_piece(op, sig_key(op, sig))


def weight_bytes(op: str, sig: dict, dtype_bytes: int = 2) -> int:
    """Bytes of the piece's parameters (``overhead``: 0)."""
    if op == "overhead":
        return 0
    return dtype_bytes * sum(p.numel() for p in meta_piece(op, sig).parameters())


@functools.lru_cache(maxsize=8192)
def _state_bytes(op: str, key: str, cache_len: int, dtype: torch.dtype) -> int:
    piece = _meta_piece(op, key)
    st = piece.init_state(1, max(int(cache_len), 1), device="meta", dtype=dtype)
    return sum(t.numel() * t.element_size() for t in st.values())


def state_bytes(op: str, sig: dict, cache_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of decode state of one sequence for a cache of ``cache_len`` positions (0 for stateless pieces)."""
    if op in ("overhead", "norm", "embed", "head", "ffn", "khead", "kffn"):
        return 0
    return _state_bytes(op, sig_key(op, sig), int(cache_len), dtype)


def step_bytes(op: str, sig: dict, context: int, batch: int, dtype: torch.dtype = torch.bfloat16) -> float:
    """Bytes one decode step of the piece reads, roughly: its weights (the embedding: one row per token) and
    ``batch`` sequences of state at (effective) ``context``. Scales LUT entries to a width the table lacks."""
    db = torch.empty((), dtype=dtype).element_size()
    if op == "embed":
        w = batch * sig["hidden_size"] * db
    else:
        w = weight_bytes(op, sig, db)
    return float(w + batch * state_bytes(op, sig, context, dtype) + batch * sig.get("hidden_size", 0) * db)
