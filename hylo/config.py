"""`HyloConfig`: one config for every hylo hybrid, serialized as Hugging Face `config.json`.

The layer pattern names one operator per layer. Both the list form
``["deltanet", "ffn", "mamba2", "ffn", "attn", "ffn"]`` and Nemotron-Flash's short form
``"d f m2 f a f"`` are accepted and normalised to the long names.

Every field is validated in ``__init__`` so a bad config fails with one clear
:class:`HyloConfigError` (naming field, value and what is allowed) before any tensor is built.
"""

from __future__ import annotations

from typing import Any, Sequence

from transformers import PretrainedConfig

# Canonical operator names and the aliases accepted in a pattern.
OPERATORS = ("attn", "swa", "mamba2", "deltanet", "gdn", "jet", "ffn")
TOKEN_MIXERS = ("attn", "swa", "mamba2", "deltanet", "gdn", "jet")
ALIASES = {
    "a": "attn", "attn": "attn", "attention": "attn",
    "swa": "swa", "s": "swa",
    "m2": "mamba2", "mamba2": "mamba2",
    "d": "deltanet", "deltanet": "deltanet",
    "gdn": "gdn", "gated_deltanet": "gdn",
    "jet": "jet", "j": "jet", "jetblock": "jet",
    "f": "ffn", "ffn": "ffn", "mlp": "ffn",
}


class HyloConfigError(ValueError):
    """A config field has a value hylo cannot build a model from."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"config field '{field}' = {value!r} is invalid: {allowed}")


def parse_pattern(pattern: str | Sequence[str]) -> list[str]:
    """Normalise a layer pattern (list of names or space/comma separated string) to canonical names."""
    if isinstance(pattern, str):
        items = pattern.replace(",", " ").split()
    elif isinstance(pattern, (list, tuple)):
        items = list(pattern)
    else:
        raise HyloConfigError("layers", pattern, "a list of operator names or a string like 'd f m2 f a f'")
    allowed = f"operator names {list(OPERATORS)} or short forms {sorted(k for k in ALIASES if k not in OPERATORS)}"
    out = []
    for i, name in enumerate(items):
        if not isinstance(name, str) or name.strip().lower() not in ALIASES:
            raise HyloConfigError(f"layers[{i}]", name, allowed)
        out.append(ALIASES[name.strip().lower()])
    if not out:
        raise HyloConfigError("layers", pattern, "at least one layer")
    if not any(op in TOKEN_MIXERS for op in out):
        raise HyloConfigError("layers", pattern, f"at least one token mixer among {list(TOKEN_MIXERS)}")
    return out


class HyloConfig(PretrainedConfig):
    """Configuration of a :class:`hylo.model.HybridLM`.

    Per-operator sizes carry the operator's prefix (``attn_``, ``swa`` shares ``attn_``'s head sizes,
    ``mamba2_``, ``deltanet_``, ``gdn_``, ``jet_``, ``ffn_``). ``None`` head sizes are derived from
    ``hidden_size`` as noted on each field.
    """

    model_type = "hylo"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        layers: str | Sequence[str] = "d f m2 f a f",
        # attention / sliding-window attention
        attn_num_heads: int = 8,
        attn_num_kv_heads: int | None = None,  # None: = attn_num_heads (MHA)
        attn_head_dim: int | None = None,  # None: hidden_size // attn_num_heads
        attn_qk_norm: bool = False,  # Qwen3-style RMSNorm on q and k per head
        attn_qkv_bias: bool = False,  # Qwen2-style bias on q/k/v projections
        attn_o_bias: bool = False,
        swa_window: int = 512,
        rope_theta: float = 10000.0,
        # SwiGLU FFN
        ffn_intermediate_size: int | None = None,  # None: 3 * hidden_size (Nemotron-Flash)
        ffn_bias: bool = False,
        # Mamba2
        mamba2_expand: int = 2,
        mamba2_head_dim: int = 64,
        mamba2_state_size: int = 128,
        mamba2_n_groups: int = 1,
        mamba2_conv_size: int = 4,
        mamba2_chunk_size: int = 256,
        # DeltaNet
        deltanet_num_heads: int | None = None,  # None: = attn_num_heads
        deltanet_head_dim: int | None = None,  # None: hidden_size // heads (key and value)
        deltanet_conv_size: int = 4,
        # Gated DeltaNet
        gdn_num_heads: int | None = None,  # None: = attn_num_heads
        gdn_head_k_dim: int | None = None,  # None: hidden_size // heads
        gdn_head_v_dim: int | None = None,  # None: 2 * gdn_head_k_dim (fla default expand_v=2)
        gdn_conv_size: int = 4,
        # JetBlock
        jet_num_heads: int | None = None,  # None: = attn_num_heads
        jet_head_k_dim: int | None = None,  # None: hidden_size // heads
        jet_head_v_dim: int | None = None,  # None: 2 * jet_head_k_dim
        jet_conv_size: int = 4,
        jet_kernel_reduction: int = 8,
        # whole model
        norm_eps: float = 1e-5,
        tie_word_embeddings: bool = True,
        num_meta_tokens: int = 0,
        weight_norm: bool = False,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 1 << 20,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.layers = parse_pattern(layers)
        self.attn_num_heads = attn_num_heads
        self.attn_num_kv_heads = attn_num_heads if attn_num_kv_heads is None else attn_num_kv_heads
        self.attn_head_dim = attn_head_dim
        self.attn_qk_norm = attn_qk_norm
        self.attn_qkv_bias = attn_qkv_bias
        self.attn_o_bias = attn_o_bias
        self.swa_window = swa_window
        self.rope_theta = rope_theta
        self.ffn_intermediate_size = 3 * hidden_size if ffn_intermediate_size is None else ffn_intermediate_size
        self.ffn_bias = ffn_bias
        self.mamba2_expand = mamba2_expand
        self.mamba2_head_dim = mamba2_head_dim
        self.mamba2_state_size = mamba2_state_size
        self.mamba2_n_groups = mamba2_n_groups
        self.mamba2_conv_size = mamba2_conv_size
        self.mamba2_chunk_size = mamba2_chunk_size
        self.deltanet_num_heads = deltanet_num_heads
        self.deltanet_head_dim = deltanet_head_dim
        self.deltanet_conv_size = deltanet_conv_size
        self.gdn_num_heads = gdn_num_heads
        self.gdn_head_k_dim = gdn_head_k_dim
        self.gdn_head_v_dim = gdn_head_v_dim
        self.gdn_conv_size = gdn_conv_size
        self.jet_num_heads = jet_num_heads
        self.jet_head_k_dim = jet_head_k_dim
        self.jet_head_v_dim = jet_head_v_dim
        self.jet_conv_size = jet_conv_size
        self.jet_kernel_reduction = jet_kernel_reduction
        self.norm_eps = norm_eps
        self.num_meta_tokens = num_meta_tokens
        self.weight_norm = weight_norm
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self._fill_derived()
        self.validate()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    # ------------------------------------------------------------------ derived sizes
    def _fill_derived(self) -> None:
        h = self.hidden_size
        heads = self.attn_num_heads
        ok = isinstance(h, int) and isinstance(heads, int) and heads > 0 and h > 0
        if self.attn_head_dim is None and ok and h % heads == 0:
            self.attn_head_dim = h // heads
        for op in ("deltanet", "gdn", "jet"):
            if getattr(self, f"{op}_num_heads") is None:
                setattr(self, f"{op}_num_heads", heads)
        n = self.deltanet_num_heads
        if self.deltanet_head_dim is None and ok and isinstance(n, int) and n > 0 and h % n == 0:
            self.deltanet_head_dim = h // n
        for op in ("gdn", "jet"):
            n = getattr(self, f"{op}_num_heads")
            if getattr(self, f"{op}_head_k_dim") is None and ok and isinstance(n, int) and n > 0 and h % n == 0:
                setattr(self, f"{op}_head_k_dim", h // n)
            kd = getattr(self, f"{op}_head_k_dim")
            if getattr(self, f"{op}_head_v_dim") is None and isinstance(kd, int):
                setattr(self, f"{op}_head_v_dim", 2 * kd)

    def _positive(self, field: str, allow_zero: bool = False) -> None:
        v = getattr(self, field)
        lo = 0 if allow_zero else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise HyloConfigError(field, v, f"an integer >= {lo}")

    def _divides(self, field: str, by_field: str) -> None:
        # Called only for fields that are required to be derivable from hidden_size.
        v = getattr(self, field)
        if v is None:
            raise HyloConfigError(
                by_field, getattr(self, by_field),
                f"must divide hidden_size={self.hidden_size} (or set {field} explicitly)")

    def validate(self) -> None:
        """Raise :class:`HyloConfigError` on the first invalid field."""
        self.layers = parse_pattern(self.layers)
        used = set(self.layers)
        for f in ("vocab_size", "hidden_size", "attn_num_heads", "ffn_intermediate_size"):
            self._positive(f)
        self._positive("num_meta_tokens", allow_zero=True)
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise HyloConfigError("norm_eps", self.norm_eps, "a number > 0")
        if not (isinstance(self.initializer_range, (int, float)) and self.initializer_range > 0):
            raise HyloConfigError("initializer_range", self.initializer_range, "a number > 0")
        if used & {"attn", "swa"}:
            self._positive("attn_num_kv_heads")
            if self.attn_num_heads % self.attn_num_kv_heads:
                raise HyloConfigError("attn_num_kv_heads", self.attn_num_kv_heads,
                                      f"must divide attn_num_heads={self.attn_num_heads}")
            self._divides("attn_head_dim", "attn_num_heads")
            self._positive("attn_head_dim")
            if self.attn_head_dim % 2:
                raise HyloConfigError("attn_head_dim", self.attn_head_dim, "an even number (RoPE rotates pairs)")
            if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
                raise HyloConfigError("rope_theta", self.rope_theta, "a number > 0")
        if "swa" in used:
            self._positive("swa_window")
        if "mamba2" in used:
            for f in ("mamba2_expand", "mamba2_head_dim", "mamba2_state_size", "mamba2_n_groups",
                      "mamba2_conv_size", "mamba2_chunk_size"):
                self._positive(f)
            d_inner = self.mamba2_expand * self.hidden_size
            if d_inner % self.mamba2_head_dim:
                raise HyloConfigError("mamba2_head_dim", self.mamba2_head_dim,
                                      f"must divide mamba2_expand*hidden_size={d_inner}")
            nheads = d_inner // self.mamba2_head_dim
            if nheads % self.mamba2_n_groups:
                raise HyloConfigError("mamba2_n_groups", self.mamba2_n_groups,
                                      f"must divide the number of Mamba2 heads ({nheads})")
        if "deltanet" in used:
            self._positive("deltanet_num_heads")
            self._divides("deltanet_head_dim", "deltanet_num_heads")
            self._positive("deltanet_head_dim")
            self._positive("deltanet_conv_size")
        for op in ("gdn", "jet"):
            if op in used:
                self._positive(f"{op}_num_heads")
                self._divides(f"{op}_head_k_dim", f"{op}_num_heads")
                self._positive(f"{op}_head_k_dim")
                self._positive(f"{op}_head_v_dim")
                self._positive(f"{op}_conv_size")
        if "jet" in used:
            self._positive("jet_kernel_reduction")
            vdim = self.jet_num_heads * self.jet_head_v_dim
            if vdim % self.jet_kernel_reduction:
                raise HyloConfigError("jet_kernel_reduction", self.jet_kernel_reduction,
                                      f"must divide the JetBlock value dim ({vdim})")

    # ------------------------------------------------------------------ helpers
    @property
    def num_hidden_layers(self) -> int:  # transformers convention
        return len(self.layers)

    @property
    def pattern_short(self) -> str:
        short = {"attn": "a", "swa": "swa", "mamba2": "m2", "deltanet": "d", "gdn": "gdn", "jet": "jet", "ffn": "f"}
        return " ".join(short[op] for op in self.layers)
