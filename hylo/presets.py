"""Named model shapes from the papers (NOTES.md), for `hylo model info`, profiling and the search.

Only shapes: weights are random unless imported. Sizes not given in public sources are marked (inferred).
"""

from __future__ import annotations

from .config import HyloConfig

NEMOTRON_FLASH_1B = "d f m2 f a f m2 f d f m2 f a f m2 f d f m2 f d f m2 f"
NEMOTRON_FLASH_3B = ("d f m2 f a f m2 f d f m2 f a f m2 f d f m2 f a f m2 f d f m2 f d f m2 f d f m2 f")


def _jet_pattern(n_layers: int, full: set[int], swa: set[int]) -> str:
    ops = ["a" if i in full else "swa" if i in swa else "jet" for i in range(n_layers)]
    return " ".join(f"{op} f" for op in ops)


PRESETS: dict[str, dict] = {
    # every operator, tiny: the CPU demo and tests
    "tiny-all": dict(vocab_size=512, hidden_size=64, layers="a f swa f m2 f d f gdn f jet f", attn_num_heads=4,
                     attn_num_kv_heads=2, swa_window=16, mamba2_head_dim=16, mamba2_state_size=16,
                     mamba2_chunk_size=16, num_meta_tokens=4),
    "nemotron-flash-1b": dict(vocab_size=131072, hidden_size=2048, layers=NEMOTRON_FLASH_1B, attn_num_heads=16,
                              attn_num_kv_heads=4, ffn_intermediate_size=6144, deltanet_num_heads=16,
                              deltanet_head_dim=128, mamba2_expand=2, mamba2_head_dim=64, mamba2_state_size=128,
                              num_meta_tokens=256, tie_word_embeddings=True),
    "nemotron-flash-3b": dict(vocab_size=131072, hidden_size=3072, layers=NEMOTRON_FLASH_3B, attn_num_heads=24,
                              attn_num_kv_heads=6, ffn_intermediate_size=9216, deltanet_num_heads=24,
                              deltanet_head_dim=128, mamba2_expand=2, mamba2_head_dim=64, mamba2_state_size=128,
                              num_meta_tokens=256, tie_word_embeddings=True),
    # Jet-Nemotron-2B on Qwen2.5-1.5B's shape: full attention at 14, 19; SWA (1152) at 20, 21; JetBlock elsewhere
    "jet-nemotron-2b": dict(vocab_size=151936, hidden_size=1536, layers=_jet_pattern(28, {14, 19}, {20, 21}),
                            attn_num_heads=12, attn_num_kv_heads=2, attn_head_dim=128, attn_qkv_bias=True,
                            swa_window=1152, ffn_intermediate_size=8960, jet_num_heads=12, jet_head_k_dim=96,
                            jet_head_v_dim=256, rope_theta=1e6, norm_eps=1e-6, tie_word_embeddings=True),
    # Qwen3-0.6B's shape, all attention (baseline for latency comparisons)
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, layers=" ".join(["a f"] * 28), attn_num_heads=16,
                       attn_num_kv_heads=8, attn_head_dim=128, attn_qk_norm=True, ffn_intermediate_size=3072,
                       rope_theta=1e6, norm_eps=1e-6, tie_word_embeddings=True),
}


def preset(name: str, **overrides) -> HyloConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return HyloConfig(**{**PRESETS[name], **overrides})
