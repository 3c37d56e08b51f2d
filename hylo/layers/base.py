"""The one interface every hylo operator implements.

A layer maps hidden states ``x: [B, T, D]`` to ``y: [B, T, D]`` (the residual add and pre-norm live in
the model's block, not here). Three uses:

(a) ``forward(x, state=None, offset=0)``: parallel/chunked over a whole sequence (training, prefill).
    With ``state`` (from ``init_state``) it starts from that state and **updates it in place** to the
    final state, so prefill fills a preallocated decode cache and can continue an earlier prefill
    (chunked prefill, meta tokens). ``offset`` is the position of ``x[:, 0]`` (tokens already seen).
(b) ``step(x, state, pos)``: one token per row, ``x: [B, 1, D]``; reads and updates ``state`` in place.
    ``pos: LongTensor[B]`` is each row's position, so rows of a batch may be at different lengths.
    Step uses only tensor ops with static shapes (CUDA-graph capturable).
(c) ``init_state(batch_size, max_len, device, dtype)``: an empty state, a dict of tensors. Attention's
    grows with ``max_len``; sliding-window attention keeps a window-sized ring buffer; linear operators
    keep a fixed-size recurrent (and conv) state whatever ``max_len`` is.

Operators without state (``ffn``) return an empty dict and ignore ``state``/``pos``.
"""

from __future__ import annotations

import torch
from torch import nn

State = dict[str, torch.Tensor]


def keep_float32(*params: nn.Parameter) -> None:
    """Mark parameters that must not be rounded to bf16 for the forward (decay rates and skips of the recurrent
    operators: ``exp(A_log)``, ``dt_bias``, ``D``). FSDP2 with bf16 gathers (``hylo.train.dist.wrap``) keeps the
    module holding them in float32."""
    for p in params:
        p._keep_float32 = True


def holds_float32(module: nn.Module) -> bool:
    """Whether ``module`` itself (not its children) holds a parameter marked by :func:`keep_float32`."""
    return any(getattr(p, "_keep_float32", False) for p in module.parameters(recurse=False))


class Layer(nn.Module):
    """Base class; subclasses implement the three methods below."""

    def forward(self, x: torch.Tensor, state: State | None = None, offset: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def step(self, x: torch.Tensor, state: State, pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def init_state(self, batch_size: int, max_len: int, device=None, dtype=None) -> State:
        return {}

    def copy_state(self, src: State, dst: State, length: int) -> None:
        """Copy ``src`` (a state after ``length`` tokens, batch 1 or B) into ``dst`` (batch B, any max_len).

        Used to seed new sequences with the precomputed meta-token state. Fixed-size states broadcast over the
        batch; attention overrides this because its state depends on ``max_len``.
        """
        for key, t in src.items():
            dst[key].copy_(t.expand_as(dst[key]))

    def state_bytes(self, max_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of decode state for one sequence of length ``max_len`` (meta tokens included by the caller)."""
        st = self.init_state(1, max_len, device="meta", dtype=dtype)
        return sum(t.numel() * t.element_size() for t in st.values())


def fuse_projection_keys(state: dict, prefix: str, parts: tuple[str, ...], fused: str) -> None:
    """In a state dict, concatenate ``prefix + part + '.weight'/'.bias'`` (rows, in ``parts`` order) into
    ``prefix + fused + ...``, in place. Attention keeps q/k/v and the FFN gate/up as one matrix each (one matrix
    product instead of three or two); this reads checkpoints with the separate Llama/Qwen names."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{p}.{kind}" for p in parts]
        if all(k in state for k in keys):
            state[f"{prefix}{fused}.{kind}"] = torch.cat([state.pop(k) for k in keys], dim=0)
