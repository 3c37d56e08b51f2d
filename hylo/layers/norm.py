"""RMSNorm and the two gated variants used by the linear operators."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 (as Llama/Qwen do), cast back to the input dtype before the weight."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = xf.to(dtype)
    return y if weight is None else weight * y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """Gated RMSNorm over groups of the last dim.

    ``gate_first=True`` (Mamba2's ``RMSNormGated(norm_before_gate=False)``): ``norm(y * silu(z)) * w``.
    ``gate_first=False`` (fla's ``FusedRMSNormGated``, Gated DeltaNet / JetBlock): ``norm(y) * w * silu(z)``.
    """

    def __init__(self, dim: int, group_size: int | None = None, eps: float = 1e-5, gate_first: bool = False):
        super().__init__()
        self.eps, self.gate_first = eps, gate_first
        self.group_size = group_size or dim
        if dim % self.group_size:
            raise ValueError(f"group_size {self.group_size} must divide dim {dim}")
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        y, z = y.float(), z.float()
        if self.gate_first:
            y = y * F.silu(z)
        shape = y.shape
        yg = y.reshape(*shape[:-1], -1, self.group_size)
        yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + self.eps)
        y = yg.reshape(shape) * self.weight.float()
        if not self.gate_first:
            y = y * F.silu(z)
        return y.to(dtype)
