"""SwiGLU MLP (`ffn`): ``down(silu(gate(x)) * up(x))``, Llama/Qwen naming so checkpoints map 1:1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HyloConfig
from .base import Layer, State


class SwiGLU(Layer):
    def __init__(self, config: HyloConfig, layer_idx: int):
        super().__init__()
        D, I = config.hidden_size, config.ffn_intermediate_size
        self.gate_proj = nn.Linear(D, I, bias=config.ffn_bias)
        self.up_proj = nn.Linear(D, I, bias=config.ffn_bias)
        self.down_proj = nn.Linear(I, D, bias=config.ffn_bias)

    def forward(self, x: torch.Tensor, state: State | None = None, offset: int = 0) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def step(self, x: torch.Tensor, state: State, pos: torch.Tensor) -> torch.Tensor:
        return self.forward(x)
