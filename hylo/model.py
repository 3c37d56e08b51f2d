"""`HybridLM`: a decoder-only language model whose layers follow a hybrid pattern.

    tokens -> embed -> [meta tokens ++ x] -> N x (x + op_i(RMSNorm(x))) -> RMSNorm -> lm_head -> logits

Each layer is one operator (attention, SWA, Mamba2, DeltaNet, Gated DeltaNet, JetBlock or SwiGLU FFN),
pre-norm with a residual add, as in Nemotron-Flash. Meta tokens (Hymba / Nemotron-Flash) are learned
embeddings prepended to every sequence; their logits are never returned and, for decoding, their
per-layer state is computed once per set of weights and copied into each new cache.

The class is a Hugging Face ``PreTrainedModel`` (``save_pretrained`` / ``from_pretrained`` /
``generate``) and also exposes the three calls the engine and trainer use directly:
``forward`` (training, prefill), ``new_cache`` and ``decode_step``.

``generate`` runs on a :class:`HybridCache` (KV and recurrent states together) that ``forward`` creates on the
first step; transformers' own ``DynamicCache`` is never used, since it holds only key/value pairs.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import HybridCache
from .config import HyloConfig
from .layers import Layer, layer_class
from .layers.norm import RMSNorm
from .ops.linear_ce import linear_cross_entropy

# attention's and the FFN's projections as older checkpoints stored them (now qkv_proj and gate_up_proj)
_SEPARATE_PROJ = re.compile(r"\.mixer\.(q|k|v|gate|up)_proj\.(weight|bias)$")

# Linear layers whose output is added to the residual stream (scaled init; column weight-norm).
RESIDUAL_WRITERS = ("o_proj", "out_proj", "down_proj")


class Block(nn.Module):
    """Pre-norm residual block around one operator."""

    def __init__(self, config: HyloConfig, layer_idx: int):
        super().__init__()
        self.op = config.layers[layer_idx]
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mixer: Layer = layer_class(self.op)(config, layer_idx)

    def forward(self, x, state=None, offset: int = 0):
        return x + self.mixer(self.norm(x), state, offset)

    def step(self, x, state, pos):
        return x + self.mixer.step(self.norm(x), state, pos)


# transformers 5.25 renamed the decode cache ``past_key_values`` -> ``cache`` (generate's inputs, model outputs)
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def _one_cache(cache, past_key_values):
    """The decode cache passed under either name (both only if they are the same object); a hylo HybridCache."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the decode cache once, as cache or as past_key_values")
    cache = cache if cache is not None else past_key_values
    if cache is not None and not isinstance(cache, HybridCache):
        raise TypeError(f"the decode cache must be a hylo HybridCache (model.new_cache), got {type(cache).__name__}")
    return cache


class HybridLM(PreTrainedModel, GenerationMixin):
    config_class = HyloConfig
    base_model_prefix = "hylo"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}
    _is_stateful = True  # recurrent states cannot be rolled back: transformers refuses assisted decoding
    main_input_name = "input_ids"

    def __init__(self, config: HyloConfig):
        config.validate()  # fields may have been edited since the config was built
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.num_meta_tokens = config.num_meta_tokens
        if self.num_meta_tokens:
            self.meta_tokens = nn.Parameter(torch.empty(config.num_meta_tokens, config.hidden_size))
        self.layers = nn.ModuleList(Block(config, i) for i in range(len(config.layers)))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._meta_template: tuple | None = None
        self.post_init()
        if config.weight_norm:
            from .weightnorm import normalize_weights

            normalize_weights(self)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader, plus checkpoints written before attention's q/k/v and the FFN's gate/up became one
        matrix each: transformers skips their separate tensors (it would leave the fused ones random), so they are
        read again from the local files and loaded through the layers' key-fusing hooks."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        old = [k for k in info.get("unexpected_keys", ()) if _SEPARATE_PROJ.search(k)]
        if old:
            from .convert import checkpoint_tensors

            path = Path(str(args[0] if args else kwargs.get("pretrained_model_name_or_path")))
            try:
                state = dict(checkpoint_tensors(path)) if path.is_dir() else None
            except FileNotFoundError:
                state = None
            if state is None:
                raise ValueError(f"{path}: a checkpoint with separate q/k/v or gate/up projections ({old[0]}, ...) "
                                 "can only be upgraded from a local checkpoint folder")
            state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
            p = next(model.parameters())
            state = {k: v.to(device=p.device, dtype=p.dtype if v.is_floating_point() else v.dtype)
                     for k, v in state.items()}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if k != "lm_head.weight"]:
                raise ValueError(f"{path}: the checkpoint does not match the model after fusing the projections: "
                                 f"missing {missing[:4]}, unexpected {unexpected[:4]}")
            model.tie_weights()
            info["unexpected_keys"] = [k for k in info["unexpected_keys"] if k not in old]
            info["missing_keys"] = []
        return (model, info) if want_info else model

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) everywhere; residual-writing projections scaled by 1/sqrt(2·layers)
        (GPT-2 / nanoGPT) so the residual stream does not grow with depth; operator-specific parameters
        (A_log, dt_bias, convs, norms, JetBlock's generator) by the operator's own ``reset_parameters``."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            s = std / math.sqrt(2 * len(self.config.layers)) if getattr(module, "_hylo_residual", False) else std
            nn.init.normal_(module.weight, 0.0, s)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Layer) and hasattr(module, "reset_parameters"):
            module.reset_parameters()  # runs after its children's Linear init (children are visited first)
        elif isinstance(module, HybridLM) and module.num_meta_tokens:
            nn.init.normal_(module.meta_tokens, 0.0, std)

    def post_init(self):
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and name.split(".")[-1] in RESIDUAL_WRITERS:
                m._hylo_residual = True
        super().post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # ------------------------------------------------------------------ core
    def head_weight(self) -> torch.Tensor:
        """The LM head's weight as the logits use it: with weight normalization, unit-norm rows (Nemotron-Flash).

        Computed at every call: a cache keyed on the weight's version counter went stale on CUDA, where the fused
        AdamW step updates the tied embedding without bumping it. Decoding normalizes once per runner instead
        (:class:`hylo.engine.DecodeRunner`)."""
        w = self.lm_head.weight
        if self.config.weight_norm:
            w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-6)
        return w

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.head_weight())

    def hidden_states(self, input_ids=None, inputs_embeds=None, cache: HybridCache | None = None) -> torch.Tensor:
        """Final-normed hidden states ``[B, T, D]`` for the real tokens (meta tokens stripped)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if cache is None:
            n = self.num_meta_tokens
            if n:
                x = torch.cat([self.meta_tokens.to(x.dtype).expand(B, n, -1), x], dim=1)
            for block in self.layers:
                x = block(x)
            return self.norm(x[:, n:])
        if cache.batch_size != B:
            raise ValueError(f"cache was made for batch {cache.batch_size}, got batch {B}")
        cache.ensure_capacity(cache.seq_len + T, self)
        offset = cache.seq_len
        for block, st in zip(self.layers, cache.states):
            x = block(x, st, offset)
        cache.advance(T)
        return self.norm(x)

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0, return_dict=True,
                targets=None, cache=None, **kwargs):
        """Hugging Face style forward. ``labels`` (same shape as ``input_ids``, -100 ignored) are shifted inside.
        The decode cache comes as ``cache`` (transformers >= 5.25's name) or ``past_key_values`` (before); the
        output holds it under the name the installed transformers uses.

        ``targets`` (the trainer's form: already the next tokens, same shape as ``input_ids``) returns only the
        mean cross-entropy, with ``logits=None``, from :func:`hylo.ops.linear_ce.linear_cross_entropy`: on CUDA
        with fla, the head and the loss fused in chunks (no ``[B*T, V]`` logits; the gradients flow through
        :meth:`head_weight`, so weight normalization and the tied embedding get theirs); elsewhere the plain
        logits + float32 cross-entropy. Under ``torch.compile`` the fused form is one custom op in the graph (no
        graph break), run eagerly by fla; ``HYLO_LINEAR_CE=ref`` forces the plain form.
        """
        if targets is not None:
            h = self.hidden_states(input_ids, inputs_embeds)
            loss = linear_cross_entropy(h.flatten(0, 1), self.head_weight(), targets.flatten(), ignore_index=-100)
            return CausalLMOutputWithPast(loss=loss, logits=None)
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("HybridLM.forward does not take padded batches (attention_mask has zeros): "
                             "recurrent operators have no notion of padding. Use hylo's engine for ragged batches.")
        cache = _one_cache(cache, past_key_values)
        if use_cache and cache is None:
            ref = input_ids if input_ids is not None else inputs_embeds
            cache = self.new_cache(ref.shape[0], max_len=max(ref.shape[1], 1) * 2, growable=True)
        if cache is not None and input_ids is not None and input_ids.shape[1] == 1 and cache.seq_len > 0:
            h = self.norm(self._step(self.embed_tokens(input_ids), cache))
        else:
            h = self.hidden_states(input_ids, inputs_embeds, cache)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.logits(h[:, keep])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    # ------------------------------------------------------------------ generate (transformers)
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """False: generate must not create a ``DynamicCache``; ``forward`` creates a :class:`HybridCache` instead."""
        return False

    def generate(self, *args, **kwargs):
        """transformers' ``generate``, refusing what a recurrent state cannot do: assisted and prompt-lookup
        decoding roll the cache back after rejected tokens (transformers' own refusal depends on its version)."""
        if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
            raise ValueError("HybridLM.generate cannot do assisted / prompt-lookup decoding: hylo's recurrent "
                             "states are stateful and cannot be rolled back after rejected tokens")
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, logits_to_keep=None, cache=None,
                                      **kwargs):
        """Inputs of one generate step: the tokens of ``input_ids`` (the whole sequence so far) that the cache has
        not consumed yet. Computed from the cache itself, so it does not depend on transformers' bookkeeping
        (``cache_position`` before 5.6, ``next_sequence_length`` after). Without a cache: the whole sequence."""
        if inputs_embeds is not None:
            raise ValueError("HybridLM.generate takes input_ids; inputs_embeds are not supported")
        past_key_values = _one_cache(cache, past_key_values)
        seen = 0 if past_key_values is None else past_key_values.get_seq_length()
        if seen >= input_ids.shape[1]:
            raise ValueError(f"input_ids must hold the whole sequence: the cache already holds {seen} tokens, "
                             f"input_ids has {input_ids.shape[1]}")
        inputs = {"input_ids": input_ids[:, seen:], _CACHE_FIELD: past_key_values,
                  "attention_mask": attention_mask, "use_cache": use_cache}
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs

    # ------------------------------------------------------------------ decoding
    def _step(self, x: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        cache.ensure_capacity(cache.seq_len + 1, self)
        for block, st in zip(self.layers, cache.states):
            x = block.step(x, st, cache.pos)
        cache.advance(1)
        return x

    def decode_step(self, input_ids: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        """One token per row (``input_ids: [B]`` or ``[B, 1]``) -> logits ``[B, V]``. Static shapes; rows may sit at
        different positions (``cache.pos``)."""
        x = self.embed_tokens(input_ids.view(-1, 1))
        return self.logits(self.norm(self._step(x, cache)))[:, 0]

    def new_cache(self, batch_size: int, max_len: int, growable: bool = False) -> HybridCache:
        """An empty decode cache for ``max_len`` real tokens, seeded with the meta-token state."""
        p = next(self.parameters())
        n = self.num_meta_tokens
        states = [b.mixer.init_state(batch_size, n + max_len, device=p.device, dtype=p.dtype) for b in self.layers]
        cache = HybridCache(states, batch_size, n + max_len, num_meta_tokens=n, growable=growable)
        if n:
            template = self._meta_state()
            for b, src, dst in zip(self.layers, template, states):
                b.mixer.copy_state(src, dst, n)
            cache.advance(n)
        return cache

    @torch.no_grad()
    def _meta_state(self) -> list:
        """Per-layer state after the meta tokens, batch 1; computed once per set of weights (keyed on the
        parameters' version counters: an optimizer that updates in place without bumping them, like torch's fused
        AdamW, needs ``torch.autograd.graph.increment_version`` after its step, as hylo's trainer does)."""
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if self._meta_template is None or self._meta_template[0] != key:
            p = self.meta_tokens
            n = self.num_meta_tokens
            states = [b.mixer.init_state(1, n, device=p.device, dtype=p.dtype) for b in self.layers]
            x = p[None]
            for block, st in zip(self.layers, states):
                x = block(x, st, 0)
            self._meta_template = (key, states)
        return self._meta_template[1]

    # ------------------------------------------------------------------ info
    def num_parameters_by_operator(self) -> dict[str, int]:
        out: dict[str, int] = {"embedding": self.embed_tokens.weight.numel()}
        if not self.config.tie_word_embeddings:
            out["lm_head"] = self.lm_head.weight.numel()
        if self.num_meta_tokens:
            out["meta_tokens"] = self.meta_tokens.numel()
        for b in self.layers:
            out[b.op] = out.get(b.op, 0) + sum(p.numel() for p in b.parameters())
        out["final_norm"] = self.norm.weight.numel()
        return out
