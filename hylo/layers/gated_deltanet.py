"""Gated DeltaNet token mixer (fla's ``GatedDeltaNet`` layer).

    q, k, v = silu(conv(q_proj x)), silu(conv(k_proj x)), silu(conv(v_proj x))    short causal convs
    beta = sigmoid(b_proj x);  g = -exp(A_log) * softplus(a_proj x + dt_bias)      per head, log decay <= 0
    o = gated_delta_rule(l2norm(q), l2norm(k), v, beta, g)
    out = o_proj(o_norm(o, g_proj x))                                              norm(o) * w * silu(gate)

Parameter names and shapes follow fla's layer (``A_log, dt_bias: [H]``, ``o_norm.weight: [head_v_dim]``).
Decode state: ``{"q_conv", "k_conv": [B, key_dim, K-1], "v_conv": [B, value_dim, K-1]`` (model dtype),
``"S": [B, H, head_k_dim, head_v_dim]`` float32``}``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hylo.config import HyloConfig
from hylo.layers.base import Layer, State, keep_float32
from hylo.layers.deltanet import conv_forward, conv_step, read_state, short_conv
from hylo.layers.norm import GatedRMSNorm
from hylo.ops.delta_rule import delta_rule, delta_rule_step


@torch.no_grad()
def init_decay(A_log: nn.Parameter, dt_bias: nn.Parameter, dt_min: float = 1e-3, dt_max: float = 0.1,
               dt_floor: float = 1e-4) -> None:
    """fla's Gated DeltaNet init: ``A ~ U(0, 16)`` stored as ``log A``; ``dt`` log-uniform in [dt_min, dt_max]
    (floored) stored through the inverse of softplus. ``A`` is kept >= 1e-4 so ``log A`` is finite."""
    H, dev = A_log.numel(), A_log.device
    A_log.copy_(torch.empty(H, device=dev).uniform_(0, 16).clamp_(min=1e-4).log())
    lo, hi = math.log(dt_min), math.log(dt_max)
    dt = torch.exp(torch.rand(H, device=dev) * (hi - lo) + lo).clamp(min=dt_floor)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Per-head log decay ``g = -exp(A_log) * softplus(a + dt_bias)`` in float32."""
    return -torch.exp(A_log.float()) * F.softplus(a.float() + dt_bias.float())


class GatedDeltaNet(Layer):
    def __init__(self, config: HyloConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.gdn_num_heads
        self.head_k_dim, self.head_v_dim = config.gdn_head_k_dim, config.gdn_head_v_dim
        self.key_dim = self.num_heads * self.head_k_dim
        self.value_dim = self.num_heads * self.head_v_dim
        self.conv_size = config.gdn_conv_size

        self.q_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)
        self.a_proj = nn.Linear(self.hidden_size, self.num_heads, bias=False)
        self.b_proj = nn.Linear(self.hidden_size, self.num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        keep_float32(self.A_log, self.dt_bias)
        self.q_conv1d = short_conv(self.key_dim, self.conv_size)
        self.k_conv1d = short_conv(self.key_dim, self.conv_size)
        self.v_conv1d = short_conv(self.value_dim, self.conv_size)
        self.g_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=config.norm_eps, gate_first=False)
        self.o_proj = nn.Linear(self.value_dim, self.hidden_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """fla's init for the non-Linear parameters (the model initialises the Linears)."""
        init_decay(self.A_log, self.dt_bias)
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            conv.reset_parameters()
        self.o_norm.weight.fill_(1.0)

    def _heads(self, q, k, v):
        lead = q.shape[:-1]
        return (q.view(*lead, self.num_heads, self.head_k_dim), k.view(*lead, self.num_heads, self.head_k_dim),
                v.view(*lead, self.num_heads, self.head_v_dim))

    def _out(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gate = self.g_proj(x).view(*o.shape)
        return self.o_proj(self.o_norm(o, gate).flatten(-2))

    # ------------------------------------------------------------------ Layer interface
    def forward(self, x: torch.Tensor, state: State | None = None, offset: int = 0) -> torch.Tensor:
        q = conv_forward(self.q_conv1d, self.q_proj(x), state, "q_conv")
        k = conv_forward(self.k_conv1d, self.k_proj(x), state, "k_conv")
        v = conv_forward(self.v_conv1d, self.v_proj(x), state, "v_conv")
        q, k, v = self._heads(q, k, v)
        beta = self.b_proj(x).sigmoid()
        g = decay(self.a_proj(x), self.A_log, self.dt_bias)
        o, S = delta_rule(q, k, v, beta, g, initial_state=read_state(state, "S"),
                          output_final_state=state is not None, use_qk_l2norm=True)
        if state is not None:
            state["S"].copy_(S)
        return self._out(o, x)

    def step(self, x: torch.Tensor, state: State, pos: torch.Tensor) -> torch.Tensor:
        x = x[:, 0]
        q = conv_step(self.q_conv1d, self.q_proj(x), state, "q_conv")
        k = conv_step(self.k_conv1d, self.k_proj(x), state, "k_conv")
        v = conv_step(self.v_conv1d, self.v_proj(x), state, "v_conv")
        q, k, v = self._heads(q, k, v)
        g = decay(self.a_proj(x), self.A_log, self.dt_bias)
        o = delta_rule_step(q, k, v, self.b_proj(x).sigmoid(), g, state["S"], use_qk_l2norm=True)
        return self._out(o, x)[:, None]

    def init_state(self, batch_size: int, max_len: int, device=None, dtype=None) -> State:
        K1 = self.conv_size - 1
        return {
            "q_conv": torch.zeros(batch_size, self.key_dim, K1, device=device, dtype=dtype),
            "k_conv": torch.zeros(batch_size, self.key_dim, K1, device=device, dtype=dtype),
            "v_conv": torch.zeros(batch_size, self.value_dim, K1, device=device, dtype=dtype),
            "S": torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim, device=device,
                             dtype=torch.float32),
        }
