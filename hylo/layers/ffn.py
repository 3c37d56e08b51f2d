"""SwiGLU MLP (`ffn`): ``down(silu(gate(x)) * up(x))``; gate and up are one matrix (``gate_up_proj``: one matrix
product), and checkpoints with Llama/Qwen's separate ``gate_proj``/``up_proj`` load into it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HyloConfig
from .base import Layer, State, fuse_projection_keys


class SwiGLU(Layer):
    def __init__(self, config: HyloConfig, layer_idx: int):
        super().__init__()
        D, I = config.hidden_size, config.ffn_intermediate_size
        self.gate_up_proj = nn.Linear(D, 2 * I, bias=config.ffn_bias)  # rows: gate, then up
        self.down_proj = nn.Linear(I, D, bias=config.ffn_bias)
        self._register_load_state_dict_pre_hook(
            lambda sd, prefix, *_: fuse_projection_keys(sd, prefix, ("gate_proj", "up_proj"), "gate_up_proj"))

    def forward(self, x: torch.Tensor, state: State | None = None, offset: int = 0) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def step(self, x: torch.Tensor, state: State, pos: torch.Tensor) -> torch.Tensor:
        return self.forward(x)
