"""Import a Llama, Qwen2 or Qwen3 checkpoint as an all-attention hylo :class:`HybridLM` (PostNAS starts here).

A transformers decoder layer ``i`` (attention + MLP) becomes two hylo layers, so the pattern is ``"a f a f ..."``:

    layers.{i}.input_layernorm           -> layers.{2i}.norm
    layers.{i}.self_attn.{q,k,v}_proj    -> layers.{2i}.mixer.qkv_proj (rows concatenated)
    layers.{i}.self_attn.o_proj          -> layers.{2i}.mixer.o_proj             (+ q_norm / k_norm for Qwen3)
    layers.{i}.post_attention_layernorm  -> layers.{2i+1}.norm
    layers.{i}.mlp.{gate,up}_proj        -> layers.{2i+1}.mixer.gate_up_proj (rows concatenated)
    layers.{i}.mlp.down_proj             -> layers.{2i+1}.mixer.down_proj
    embed_tokens, norm, lm_head          -> the same names (lm_head omitted when tied)

Anything the hylo model cannot reproduce exactly is refused with :class:`ConversionError` naming the source
config field (rope scaling, partial rotary, sliding-window layers, an activation other than SiLU, an unknown
``model_type``), and every source tensor must be consumed, so a variant with extra weights fails loudly rather
than importing silently wrong.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Iterable

import torch
from transformers import AutoConfig, GenerationConfig, PretrainedConfig, PreTrainedModel

from .config import HyloConfig
from .model import HybridLM

SUPPORTED = ("llama", "qwen2", "qwen3")

# ``model.layers.{i}.{part}.{rest}`` in the source -> hylo layer 2i (attention part) or 2i+1 (MLP part)
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(input_layernorm|self_attn|post_attention_layernorm|mlp)\.(.+)$")
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # buffer saved by old transformers versions


class ConversionError(ValueError):
    """The source checkpoint has a feature hylo cannot represent exactly; ``field`` names the source config field
    (``"weights"`` when the tensors themselves do not match)."""

    def __init__(self, field: str, value: Any, why: str):
        self.field, self.value = field, value
        what = "source weights" if field == "weights" else f"source config field '{field}' = {value!r}"
        super().__init__(f"cannot import: {what}: {why}")


# ----------------------------------------------------------------------------- config
def _rope_theta(src: PretrainedConfig) -> float:
    """RoPE base of the source, refusing any rope type other than the default (unscaled) one."""
    params = getattr(src, "rope_parameters", None) or getattr(src, "rope_scaling", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):  # per-layer-type parameters
        raise ConversionError("rope_parameters", params, "per-layer-type RoPE parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        field = "rope_parameters" if getattr(src, "rope_parameters", None) else "rope_scaling"
        raise ConversionError(field, params, f"rope type {rope_type!r} is not supported (only 'default')")
    partial = params.get("partial_rotary_factor", getattr(src, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConversionError("partial_rotary_factor", partial, "hylo rotates the whole head (factor 1.0)")
    theta = params.get("rope_theta", getattr(src, "rope_theta", None))
    if theta is None:
        raise ConversionError("rope_theta", None, "no RoPE base found in rope_parameters or rope_theta")
    return float(theta)


def hylo_config(src: PretrainedConfig) -> HyloConfig:
    """The :class:`HyloConfig` of an all-attention hylo model equal to the Llama / Qwen2 / Qwen3 ``src``."""
    mt = getattr(src, "model_type", None)
    if mt not in SUPPORTED:
        raise ConversionError("model_type", mt, f"supported model types are {list(SUPPORTED)}")
    act = getattr(src, "hidden_act", "silu")
    if act != "silu":
        raise ConversionError("hidden_act", act, "hylo's FFN is SwiGLU (silu)")
    if getattr(src, "use_sliding_window", False):
        raise ConversionError("use_sliding_window", True, "sliding-window layers are not imported; "
                                                          "only full attention maps 1:1")
    layer_types = getattr(src, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ConversionError("layer_types", layer_types, "only 'full_attention' layers are supported")
    heads = src.num_attention_heads
    head_dim = getattr(src, "head_dim", None) or src.hidden_size // heads
    if mt == "qwen2":  # Qwen2: bias on q/k/v always, none on o
        qkv_bias, o_bias = True, False
    else:  # Llama / Qwen3: `attention_bias` covers q, k, v and o
        qkv_bias = o_bias = bool(getattr(src, "attention_bias", False))
    return HyloConfig(
        vocab_size=src.vocab_size,
        hidden_size=src.hidden_size,
        layers=" ".join(["a f"] * src.num_hidden_layers),
        attn_num_heads=heads,
        attn_num_kv_heads=getattr(src, "num_key_value_heads", None) or heads,
        attn_head_dim=head_dim,
        attn_qk_norm=mt == "qwen3",
        attn_qkv_bias=qkv_bias,
        attn_o_bias=o_bias,
        rope_theta=_rope_theta(src),
        ffn_intermediate_size=src.intermediate_size,
        ffn_bias=bool(getattr(src, "mlp_bias", False)),
        norm_eps=src.rms_norm_eps,
        tie_word_embeddings=bool(getattr(src, "tie_word_embeddings", False)),
        max_position_embeddings=getattr(src, "max_position_embeddings", 1 << 20),
        initializer_range=getattr(src, "initializer_range", 0.02),
        bos_token_id=getattr(src, "bos_token_id", None),
        eos_token_id=getattr(src, "eos_token_id", None),
        pad_token_id=getattr(src, "pad_token_id", None),
    )


# ----------------------------------------------------------------------------- weights
def hylo_name(name: str) -> str | None:
    """The hylo parameter name for a source parameter name (``model.`` prefix optional); None to skip it."""
    if _IGNORED.search(name):
        return None
    if name.startswith("model."):
        name = name[len("model."):]
    m = _LAYER_KEY.match(name)
    if m is None:
        return name  # embed_tokens.weight, norm.weight, lm_head.weight (anything else fails the strict load)
    i, part, rest = int(m.group(1)), m.group(2), m.group(3)
    if part == "input_layernorm":
        return f"layers.{2 * i}.norm.{rest}"
    if part == "self_attn":
        return f"layers.{2 * i}.mixer.{rest}"
    if part == "post_attention_layernorm":
        return f"layers.{2 * i + 1}.norm.{rest}"
    return f"layers.{2 * i + 1}.mixer.{rest}"


def checkpoint_tensors(path: Path) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) of a local transformers checkpoint: safetensors (single or sharded) or pytorch .bin."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        index = path / f"{single}.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (path / single).exists():
            files = [single]
        else:
            continue
        for f in files:
            if f.endswith(".safetensors"):
                from safetensors.torch import load_file

                yield from load_file(str(path / f)).items()
            else:
                yield from torch.load(path / f, map_location="cpu", weights_only=True).items()
        return
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or their sharded index) in {path}")


def from_transformers(path_or_model: str | Path | PreTrainedModel, dtype: torch.dtype | None = None) -> HybridLM:
    """Import a Llama / Qwen2 / Qwen3 model (a local checkpoint directory or an in-memory ``PreTrainedModel``,
    the ``*ForCausalLM`` or its base model) as an all-attention :class:`HybridLM` with the same outputs.

    ``dtype``: the dtype of the result; None keeps the source's (the checkpoint's ``dtype`` in config.json,
    or the in-memory model's). The source's generation config (eos, sampling defaults) is carried over.
    """
    if isinstance(path_or_model, PreTrainedModel):
        src_cfg = path_or_model.config
        tensors = path_or_model.state_dict().items()
        src_dtype = path_or_model.dtype
        gen = getattr(path_or_model, "generation_config", None)
        gen = copy.deepcopy(gen) if gen is not None else None
    else:
        path = Path(path_or_model)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a transformers checkpoint directory (no config.json)")
        with open(path / "config.json") as f:
            mt = json.load(f).get("model_type")
        if mt not in SUPPORTED:  # before AutoConfig, which would fail on a type it does not know
            raise ConversionError("model_type", mt, f"supported model types are {list(SUPPORTED)}")
        src_cfg = AutoConfig.from_pretrained(str(path))
        tensors = checkpoint_tensors(path)
        src_dtype = getattr(src_cfg, "dtype", None) or getattr(src_cfg, "torch_dtype", None)
        if isinstance(src_dtype, str):
            src_dtype = getattr(torch, src_dtype)
        gen = GenerationConfig.from_pretrained(str(path)) if (path / "generation_config.json").exists() else None

    config = hylo_config(src_cfg)
    target = dtype or src_dtype
    state: dict[str, torch.Tensor] = {}
    for name, t in tensors:
        new = hylo_name(name)
        if new is not None:
            state[new] = t.to(target) if target is not None and t.is_floating_point() else t
    if target is None:  # a config without dtype: the first floating tensor's decides
        target = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
        state = {k: t.to(target) if t.is_floating_point() else t for k, t in state.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding is the head (transformers does the same)

    with torch.device("meta"):  # no random init: every parameter comes from the checkpoint
        model = HybridLM(config)
    # the layers' load hooks concatenate q/k/v and gate/up into hylo's fused matrices
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = sorted(set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if missing or unexpected:
        raise ConversionError("weights", None, f"they do not map onto the hylo model: missing {missing[:8]}, "
                                               f"unexpected {sorted(unexpected)[:8]}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a buffer or parameter that no checkpoint tensor filled (would be garbage)
        raise ConversionError("weights", None, f"nothing filled {left[:8]}")
    model.config.dtype = target
    if gen is not None:
        model.generation_config = gen
    return model.eval()
