"""Operator registry: one module per operator, looked up by its canonical config name."""

from __future__ import annotations

import importlib

from .base import Layer, State

_REGISTRY = {
    "attn": "hylo.layers.attention:Attention",
    "swa": "hylo.layers.attention:SlidingWindowAttention",
    "mamba2": "hylo.layers.mamba2:Mamba2",
    "deltanet": "hylo.layers.deltanet:DeltaNet",
    "gdn": "hylo.layers.gated_deltanet:GatedDeltaNet",
    "jet": "hylo.layers.jetblock:JetBlock",
    "ffn": "hylo.layers.ffn:SwiGLU",
}


def layer_class(op: str) -> type[Layer]:
    """The Layer class implementing canonical operator ``op``."""
    module, name = _REGISTRY[op].split(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["Layer", "State", "layer_class"]
