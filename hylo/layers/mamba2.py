"""Mamba2 token mixer: the standard state-spaces block (as in Nemotron-Flash and HF ``Mamba2Mixer``).

    in_proj(x) -> z | xBC | dt            z: gate (d_inner), xBC: x (d_inner), B, C (groups*N each), dt (heads)
    xBC = silu(conv1d(xBC))               depthwise causal conv with bias over x|B|C
    dt = softplus(dt + dt_bias), A = -exp(A_log)
    y = SSD(x, dt, A, B, C) + D * x
    out = out_proj(norm(y, z))            gated RMSNorm, gate applied before normalising

Parameter names and shapes follow HF Mamba2 / mamba_ssm so their checkpoints load as they are.
Decode state: ``{"conv": [B, conv_dim, K-1] (model dtype), "ssm": [B, H, P, N] float32}``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hylo.config import HyloConfig
from hylo.layers.base import Layer, State, keep_float32
from hylo.layers.norm import GatedRMSNorm
from hylo.ops.conv import causal_conv1d, causal_conv1d_step
from hylo.ops.ssd import ssd, ssd_step


class Mamba2(Layer):
    def __init__(self, config: HyloConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.d_inner = config.mamba2_expand * config.hidden_size
        self.head_dim = config.mamba2_head_dim
        self.num_heads = self.d_inner // self.head_dim
        self.n_groups = config.mamba2_n_groups
        self.state_size = config.mamba2_state_size
        self.conv_size = config.mamba2_conv_size
        self.chunk_size = config.mamba2_chunk_size
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.state_size

        self.in_proj = nn.Linear(self.hidden_size, self.d_inner + self.conv_dim + self.num_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_size, groups=self.conv_dim,
                                padding=self.conv_size - 1, bias=True)  # weight [conv_dim, 1, K]; used causally
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.A_log._no_weight_decay = True  # as mamba_ssm
        self.D._no_weight_decay = True
        keep_float32(self.dt_bias, self.A_log, self.D)
        self.norm = GatedRMSNorm(self.d_inner, group_size=self.d_inner // self.n_groups, eps=config.norm_eps,
                                 gate_first=True)
        self.out_proj = nn.Linear(self.d_inner, self.hidden_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4,
                         a_range: tuple[float, float] = (1.0, 16.0)) -> None:
        """Mamba2's own init for the non-Linear parameters (the model initialises the Linears)."""
        H, dev = self.num_heads, self.A_log.device
        # A ~ U[a_range]; stored as log so A = -exp(A_log) stays negative
        self.A_log.copy_(torch.empty(H, device=dev).uniform_(*a_range).log())
        # dt log-uniform in [dt_min, dt_max] (floored), stored through the inverse of softplus
        lo, hi = math.log(dt_min), math.log(dt_max)
        dt = torch.exp(torch.rand(H, device=dev) * (hi - lo) + lo).clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.D.fill_(1.0)
        self.conv1d.reset_parameters()  # PyTorch's default, as mamba_ssm
        self.norm.weight.fill_(1.0)

    # ------------------------------------------------------------------ helpers
    def _split_proj(self, zxbcdt: torch.Tensor):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.num_heads], dim=-1)

    def _split_xbc(self, xbc: torch.Tensor):
        gn = self.n_groups * self.state_size
        x, B, C = torch.split(xbc, [self.d_inner, gn, gn], dim=-1)
        lead = x.shape[:-1]
        return (x.reshape(*lead, self.num_heads, self.head_dim),
                B.reshape(*lead, self.n_groups, self.state_size),
                C.reshape(*lead, self.n_groups, self.state_size))

    def _dt_A(self, dt: torch.Tensor):
        return F.softplus(dt.float() + self.dt_bias.float()), -torch.exp(self.A_log.float())

    def _out(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = (y.float() + x.float() * self.D.float()[:, None]).to(x.dtype)
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y)

    # ------------------------------------------------------------------ Layer interface
    def forward(self, x: torch.Tensor, state: State | None = None, offset: int = 0) -> torch.Tensor:
        z, xbc, dt = self._split_proj(self.in_proj(x))
        w = self.conv1d.weight.squeeze(1)
        xbc, conv_state = causal_conv1d(xbc, w, self.conv1d.bias, None if state is None else state["conv"],
                                        activation="silu")
        xs, B, C = self._split_xbc(xbc)
        dt, A = self._dt_A(dt)
        y, ssm_state = ssd(xs, dt, A, B, C, chunk_size=self.chunk_size,
                           initial_state=None if state is None else state["ssm"],
                           output_final_state=state is not None)
        if state is not None:
            state["conv"].copy_(conv_state)
            state["ssm"].copy_(ssm_state)
        return self._out(y, xs, z)

    def step(self, x: torch.Tensor, state: State, pos: torch.Tensor) -> torch.Tensor:
        z, xbc, dt = self._split_proj(self.in_proj(x[:, 0]))
        xbc = causal_conv1d_step(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, state["conv"],
                                 activation="silu")
        xs, B, C = self._split_xbc(xbc)
        dt, A = self._dt_A(dt)
        y = ssd_step(xs, dt, A, B, C, state["ssm"])
        return self._out(y, xs, z)[:, None]

    def init_state(self, batch_size: int, max_len: int, device=None, dtype=None) -> State:
        return {
            "conv": torch.zeros(batch_size, self.conv_dim, self.conv_size - 1, device=device, dtype=dtype),
            "ssm": torch.zeros(batch_size, self.num_heads, self.head_dim, self.state_size, device=device,
                               dtype=torch.float32),
        }
