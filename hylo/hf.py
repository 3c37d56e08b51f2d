"""Hugging Face integration: hylo checkpoints load through transformers' Auto classes after ``import hylo``.

``import hylo`` calls :func:`register_auto_classes`, which maps ``model_type: "hylo"`` to :class:`HyloConfig`
(``AutoConfig``) and :class:`HyloConfig` to :class:`HybridLM` (``AutoModelForCausalLM``). A saved checkpoint is
then a plain ``config.json`` + ``model.safetensors`` (+ ``generation_config.json``) with no ``auto_map`` and no
remote code: ``AutoModelForCausalLM.from_pretrained(path)`` finds the classes through the registration.

What the round trip carries: every config field (layer pattern, ``num_meta_tokens``, ``weight_norm``, ...),
the meta-token embeddings (a parameter like any other) and the tie between ``embed_tokens`` and ``lm_head``
(``tie_word_embeddings=True`` stores the matrix once; ``_tied_weights_keys`` re-ties it on load).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .config import HyloConfig
from .model import HybridLM


def register_auto_classes() -> None:
    """Register hylo with ``AutoConfig`` and ``AutoModelForCausalLM``. Idempotent."""
    AutoConfig.register(HyloConfig.model_type, HyloConfig, exist_ok=True)
    AutoModelForCausalLM.register(HyloConfig, HybridLM, exist_ok=True)
