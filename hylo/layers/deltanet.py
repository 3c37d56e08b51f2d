"""DeltaNet token mixer (fla's ``DeltaNet`` layer as used by Nemotron-Flash).

    q, k, v = silu(conv(q_proj x)), silu(conv(k_proj x)), silu(conv(v_proj x))    short causal convs, width 4
    beta = sigmoid(b_proj x)
    o = delta_rule(l2norm(q), l2norm(k), v, beta)                                   per head, no decay
    out = o_proj(o_norm(o))                                                         RMSNorm per head, no gate

Parameter names and shapes follow fla's layer (``q_conv1d.weight: [key_dim, 1, K]`` like its
``ShortConvolution``, ``o_norm.weight: [head_v_dim]``) so Nemotron-Flash checkpoints map by name.
Decode state: ``{"q_conv", "k_conv": [B, key_dim, K-1], "v_conv": [B, value_dim, K-1]`` (model dtype),
``"S": [B, H, head_k_dim, head_v_dim]`` float32 (fla's ``[K, V]`` layout)``}``.
"""

from __future__ import annotations

import torch
from torch import nn

from hylo.config import HyloConfig
from hylo.layers.base import Layer, State
from hylo.layers.norm import RMSNorm
from hylo.ops.conv import causal_conv1d, causal_conv1d_step
from hylo.ops.delta_rule import delta_rule, delta_rule_step


def short_conv(dim: int, kernel_size: int) -> nn.Conv1d:
    """Depthwise conv with fla ``ShortConvolution``'s weight layout ``[dim, 1, K]`` (used causally, no bias)."""
    return nn.Conv1d(dim, dim, kernel_size, groups=dim, padding=kernel_size - 1, bias=False)


def conv_forward(conv: nn.Conv1d, x: torch.Tensor, state: State | None, key: str) -> torch.Tensor:
    """Causal SiLU conv over ``x [B, T, C]``; continues from and updates ``state[key]`` when given."""
    y, new = causal_conv1d(x, conv.weight.squeeze(1), None, None if state is None else state[key], activation="silu")
    if state is not None:
        state[key].copy_(new)
    return y


def read_state(state: State | None, key: str) -> torch.Tensor | None:
    """``state[key]`` as an op input: a copy when autograd is on, because the layer overwrites the state in place
    after the op, which may have saved that input for its backward."""
    if state is None:
        return None
    return state[key].clone() if torch.is_grad_enabled() else state[key]


def conv_step(conv: nn.Conv1d, x: torch.Tensor, state: State, key: str) -> torch.Tensor:
    return causal_conv1d_step(x, conv.weight.squeeze(1), None, state[key], activation="silu")


class DeltaNet(Layer):
    def __init__(self, config: HyloConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.deltanet_num_heads
        self.head_k_dim = self.head_v_dim = config.deltanet_head_dim
        self.key_dim = self.value_dim = self.num_heads * self.head_k_dim
        self.conv_size = config.deltanet_conv_size

        self.q_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)
        self.b_proj = nn.Linear(self.hidden_size, self.num_heads, bias=False)
        self.q_conv1d = short_conv(self.key_dim, self.conv_size)
        self.k_conv1d = short_conv(self.key_dim, self.conv_size)
        self.v_conv1d = short_conv(self.value_dim, self.conv_size)
        self.o_norm = RMSNorm(self.head_v_dim, eps=config.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, self.hidden_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """fla's init for the non-Linear parameters: PyTorch's default conv init, unit norm weight."""
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            conv.reset_parameters()
        self.o_norm.weight.fill_(1.0)

    def _heads(self, q, k, v):
        lead = q.shape[:-1]
        return (q.view(*lead, self.num_heads, self.head_k_dim), k.view(*lead, self.num_heads, self.head_k_dim),
                v.view(*lead, self.num_heads, self.head_v_dim))

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.o_norm(o).flatten(-2))

    # ------------------------------------------------------------------ Layer interface
    def forward(self, x: torch.Tensor, state: State | None = None, offset: int = 0) -> torch.Tensor:
        q = conv_forward(self.q_conv1d, self.q_proj(x), state, "q_conv")
        k = conv_forward(self.k_conv1d, self.k_proj(x), state, "k_conv")
        v = conv_forward(self.v_conv1d, self.v_proj(x), state, "v_conv")
        q, k, v = self._heads(q, k, v)
        beta = self.b_proj(x).sigmoid()
        o, S = delta_rule(q, k, v, beta, initial_state=read_state(state, "S"),
                          output_final_state=state is not None, use_qk_l2norm=True)
        if state is not None:
            state["S"].copy_(S)
        return self._out(o)

    def step(self, x: torch.Tensor, state: State, pos: torch.Tensor) -> torch.Tensor:
        x = x[:, 0]
        q = conv_step(self.q_conv1d, self.q_proj(x), state, "q_conv")
        k = conv_step(self.k_conv1d, self.k_proj(x), state, "k_conv")
        v = conv_step(self.v_conv1d, self.v_proj(x), state, "v_conv")
        q, k, v = self._heads(q, k, v)
        o = delta_rule_step(q, k, v, self.b_proj(x).sigmoid(), None, state["S"], use_qk_l2norm=True)
        return self._out(o)[:, None]

    def init_state(self, batch_size: int, max_len: int, device=None, dtype=None) -> State:
        K1 = self.conv_size - 1
        return {
            "q_conv": torch.zeros(batch_size, self.key_dim, K1, device=device, dtype=dtype),
            "k_conv": torch.zeros(batch_size, self.key_dim, K1, device=device, dtype=dtype),
            "v_conv": torch.zeros(batch_size, self.value_dim, K1, device=device, dtype=dtype),
            "S": torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim, device=device,
                             dtype=torch.float32),
        }
