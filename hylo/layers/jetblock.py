"""JetBlock (Jet-Nemotron): Gated DeltaNet with a dynamic short conv on v and no convs on q/k.

    q, k = silu(q_proj x), silu(k_proj x)
    v = silu(dynconv(v_proj x; kernels = w2(silu(w1 x))))      per-token depthwise causal kernels, width 4
    beta = sigmoid(b_proj x);  g = -exp(A_log) * softplus(a_proj x + dt_bias)
    o = gated_delta_rule(l2norm(q), l2norm(k), v, beta, g)
    out = o_proj(o_norm(o, g_proj x))                          norm(o) * w * silu(gate), per value head

The kernel generator reads the block input ``x``; its weights start at zero and ``w2``'s bias holds a static
kernel, so the block starts as a static short conv. Names and shapes follow Jet-Nemotron's public code
(``dynamic_conv1d.kernel_generator.{w1, w2}``; ``w2`` outputs ``value_dim * K`` laid out ``(channel, tap)``).
Decode state: ``{"v_conv": [B, value_dim, K-1]`` (model dtype; Jet's cache holds ``K`` inputs, ours the last
``K-1``), ``"S": [B, H, head_k_dim, head_v_dim]`` float32``}``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from hylo.config import HyloConfig
from hylo.layers.base import Layer, State, keep_float32
from hylo.layers.deltanet import read_state
from hylo.layers.gated_deltanet import decay, init_decay
from hylo.layers.norm import GatedRMSNorm
from hylo.ops.delta_rule import delta_rule, delta_rule_step
from hylo.ops.dynamic_conv import dynamic_conv, dynamic_conv_step


class DynamicShortConv(nn.Module):
    """Holds the kernel generator ``Linear(D -> C/r, no bias) -> SiLU -> Linear(-> C*K, bias)``."""

    def __init__(self, channels: int, kernel_size: int, input_size: int, reduction: int):
        super().__init__()
        self.channels, self.kernel_size = channels, kernel_size
        self.kernel_generator = nn.Sequential(OrderedDict([
            ("w1", nn.Linear(input_size, channels // reduction, bias=False)),
            ("act", nn.SiLU()),
            ("w2", nn.Linear(channels // reduction, channels * kernel_size, bias=True)),
        ]))

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token kernels ``[..., C, K]`` from the generator input ``x [..., D]``."""
        return self.kernel_generator(x).view(*x.shape[:-1], self.channels, self.kernel_size)


class JetBlock(Layer):
    def __init__(self, config: HyloConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.jet_num_heads
        self.head_k_dim, self.head_v_dim = config.jet_head_k_dim, config.jet_head_v_dim
        self.key_dim = self.num_heads * self.head_k_dim
        self.value_dim = self.num_heads * self.head_v_dim
        self.conv_size = config.jet_conv_size
        self.static_kernel_std = config.initializer_range

        self.q_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)
        self.b_proj = nn.Linear(self.hidden_size, self.num_heads, bias=False)
        self.a_proj = nn.Linear(self.hidden_size, self.num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        keep_float32(self.A_log, self.dt_bias)
        self.dynamic_conv1d = DynamicShortConv(self.value_dim, self.conv_size, self.hidden_size,
                                               config.jet_kernel_reduction)
        self.g_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=config.norm_eps, gate_first=False)
        self.o_proj = nn.Linear(self.value_dim, self.hidden_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Jet-Nemotron's init for the non-generic parameters: decay as Gated DeltaNet, generator weights
        zero and ``w2.bias`` a static kernel ~ N(0, initializer_range), unit norm weight."""
        init_decay(self.A_log, self.dt_bias)
        gen = self.dynamic_conv1d.kernel_generator
        gen.w1.weight.zero_()
        gen.w2.weight.zero_()
        gen.w2.bias.normal_(0.0, self.static_kernel_std)
        self.o_norm.weight.fill_(1.0)

    def _qk(self, x: torch.Tensor):
        lead = x.shape[:-1]
        q = F.silu(self.q_proj(x)).view(*lead, self.num_heads, self.head_k_dim)
        k = F.silu(self.k_proj(x)).view(*lead, self.num_heads, self.head_k_dim)
        return q, k

    def _out(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gate = self.g_proj(x).view(*o.shape)
        return self.o_proj(self.o_norm(o, gate).flatten(-2))

    # ------------------------------------------------------------------ Layer interface
    def forward(self, x: torch.Tensor, state: State | None = None, offset: int = 0) -> torch.Tensor:
        q, k = self._qk(x)
        v, conv_state = dynamic_conv(self.v_proj(x), self.dynamic_conv1d.kernels(x),
                                     read_state(state, "v_conv"))
        v = F.silu(v).view(*x.shape[:-1], self.num_heads, self.head_v_dim)
        beta = self.b_proj(x).sigmoid()
        g = decay(self.a_proj(x), self.A_log, self.dt_bias)
        o, S = delta_rule(q, k, v, beta, g, initial_state=read_state(state, "S"),
                          output_final_state=state is not None, use_qk_l2norm=True)
        if state is not None:
            state["v_conv"].copy_(conv_state)
            state["S"].copy_(S)
        return self._out(o, x)

    def step(self, x: torch.Tensor, state: State, pos: torch.Tensor) -> torch.Tensor:
        x = x[:, 0]
        q, k = self._qk(x)
        v = dynamic_conv_step(self.v_proj(x), self.dynamic_conv1d.kernels(x), state["v_conv"])
        v = F.silu(v).view(x.shape[0], self.num_heads, self.head_v_dim)
        g = decay(self.a_proj(x), self.A_log, self.dt_bias)
        o = delta_rule_step(q, k, v, self.b_proj(x).sigmoid(), g, state["S"], use_qk_l2norm=True)
        return self._out(o, x)[:, None]

    def init_state(self, batch_size: int, max_len: int, device=None, dtype=None) -> State:
        return {
            "v_conv": torch.zeros(batch_size, self.value_dim, self.conv_size - 1, device=device, dtype=dtype),
            "S": torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim, device=device,
                             dtype=torch.float32),
        }
