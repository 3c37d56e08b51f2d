"""Rotary position embedding (RoPE): the cos/sin tables and the rotation (rotate-half convention, as Llama/Qwen).

Why the tables are a custom op: under ``torch.compile`` inductor inlines their computation
(``theta ** (2i/Dh)``, ``cos``, ``sin``) into the kernels that rotate q and k, so that math runs once per element of
q and k (every head, and again in the backward) instead of once per (position, frequency). In an H100 training step
of a 125M attention model at sequence 2048 those kernels took 17 of the step's 80 ms of kernel time
(``benchmarks/results/train-throughput-mfu-h100.json``). Behind ``hylo::rope_table`` the tables are computed once
per call and the rotation only reads them. A decode step (one position per row) keeps the inline form: there the
tables are tiny, and an opaque op would add its own kernels to every layer of the graphed step.
"""

from __future__ import annotations

import torch


def _tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[..., head_dim]`` in float32 for ``positions`` (any shape)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float().unsqueeze(-1) * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


@torch.library.custom_op("hylo::rope_table", mutates_args=())
def rope_table(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_tables` as an op that inductor cannot inline into its consumers."""
    return _tables(positions, head_dim, theta)


@rope_table.register_fake
def _(positions, head_dim, theta):
    shape = (*positions.shape, head_dim)
    return positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin for ``positions`` (any shape), computed in float32 and cast to ``dtype``. Returns ``[..., head_dim]``.

    More than one position in the last dimension (a parallel forward) goes through :func:`rope_table`; one
    (a decode step) is computed inline.
    """
    if positions.shape[-1] > 1:
        cos, sin = rope_table(positions, head_dim, float(theta))
    else:
        cos, sin = _tables(positions, head_dim, theta)
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x: [B, T, H, Dh]`` by cos/sin ``[B or 1, T, Dh]`` (rotate-half convention)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
