"""Causal depthwise 1-D convolution with a decode state (Mamba2's conv1d, DeltaNet's short convs).

Layout ``x: [B, T, C]``, ``weight: [C, K]``. The state holds the last ``K-1`` inputs, ``[B, C, K-1]``.
One implementation serves CPU and GPU: ``F.conv1d`` with ``groups=C`` is already a cuDNN kernel,
and the decode step is a single multiply-add over ``K`` taps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  state: torch.Tensor | None = None, activation: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel causal conv over ``x: [B, T, C]``, continuing from ``state: [B, C, K-1]`` (zeros if None).

    Returns ``(y [B, T, C], new_state [B, C, K-1])``; ``new_state`` holds the last ``K-1`` inputs.
    """
    B, T, C = x.shape
    K = weight.shape[-1]
    xt = x.transpose(1, 2)  # [B, C, T]
    if state is None:
        state = xt.new_zeros(B, C, K - 1)
    xp = torch.cat([state.to(xt.dtype), xt], dim=-1)  # [B, C, K-1+T]
    y = F.conv1d(xp, weight.unsqueeze(1).to(xt.dtype), bias, groups=C)
    new_state = xp[..., xp.shape[-1] - (K - 1):]
    y = y.transpose(1, 2)
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"unknown activation {activation!r}")
    return y, new_state


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       state: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """One token ``x: [B, C]``; updates ``state: [B, C, K-1]`` in place; returns ``y: [B, C]``."""
    window = torch.cat([state, x.unsqueeze(-1).to(state.dtype)], dim=-1)  # [B, C, K]
    y = (window.float() * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    state.copy_(window[..., 1:])
    y = y.to(x.dtype)
    if activation == "silu":
        y = F.silu(y)
    return y
