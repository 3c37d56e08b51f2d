"""Importing Llama / Qwen2 / Qwen3 checkpoints: same logits and the same generations as transformers itself."""

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from hylo import HybridLM
from hylo.convert import ConversionError, from_transformers

VOCAB = 97
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None)

# name -> (model class, config): biases on and off, tied and untied, Qwen3 with head_dim 24 != 64 / 4
SOURCES = {
    "llama-untied-bias": (LlamaForCausalLM, lambda: LlamaConfig(**SMALL, num_hidden_layers=3, attention_bias=True,
                                                                mlp_bias=True, rope_theta=5e5,
                                                                tie_word_embeddings=False)),
    "llama-tied": (LlamaForCausalLM, lambda: LlamaConfig(**SMALL, num_hidden_layers=2, tie_word_embeddings=True)),
    "qwen2-tied": (Qwen2ForCausalLM, lambda: Qwen2Config(**SMALL, num_hidden_layers=2, tie_word_embeddings=True)),
    "qwen2-untied": (Qwen2ForCausalLM, lambda: Qwen2Config(**SMALL, num_hidden_layers=3, rope_theta=1e6,
                                                           tie_word_embeddings=False)),
    "qwen3-untied": (Qwen3ForCausalLM, lambda: Qwen3Config(**SMALL, num_hidden_layers=2, head_dim=24,
                                                           tie_word_embeddings=False)),
    "qwen3-tied": (Qwen3ForCausalLM, lambda: Qwen3Config(**SMALL, num_hidden_layers=2, head_dim=24,
                                                         attention_bias=True, tie_word_embeddings=True)),
}


def source(name):
    """A transformers model built by transformers itself, with every parameter random: non-zero biases and
    non-unit norm weights (q_norm / k_norm included), so a mis-mapped or dropped tensor changes the logits.
    Embeddings are small when tied, else greedy decoding just repeats the last token (its own embedding wins)."""
    cls, cfg = SOURCES[name]
    torch.manual_seed(0)
    model = cls(cfg()).eval()
    emb_std = 0.1 if model.config.tie_word_embeddings else 1.0
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif n.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in n:
                p.copy_(emb_std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def ids(batch=2, length=9, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(SOURCES))
@pytest.mark.parametrize("via", ["memory", "directory"])
def test_import_matches_transformers(name, via, tmp_path):
    src = source(name)
    if via == "directory":
        src.save_pretrained(tmp_path, max_shard_size="40KB" if name == "llama-untied-bias" else "1GB")  # + shards
        model = from_transformers(tmp_path)
    else:
        model = from_transformers(src)
    assert type(model) is HybridLM
    assert model.config.layers == ["attn", "ffn"] * src.config.num_hidden_layers
    assert (model.lm_head.weight is model.embed_tokens.weight) is src.config.tie_word_embeddings
    x = ids()
    with torch.no_grad():
        ref, got = src(x).logits, model(x).logits
    assert (ref - got).abs().max().item() < 1e-4
    want = src.generate(x, max_new_tokens=12, do_sample=False)
    assert len(set(want[:, 9:].flatten().tolist())) > 4  # a real continuation, not one repeated token
    assert torch.equal(model.generate(x, max_new_tokens=12, do_sample=False), want)


def test_sampling_and_beam_search_match_transformers():
    src = source("qwen3-untied")
    model = from_transformers(src)
    x = ids(length=6)
    kw = dict(max_new_tokens=10, do_sample=True, top_k=0, num_return_sequences=2)
    torch.manual_seed(3)
    want = src.generate(x, **kw)
    torch.manual_seed(3)
    assert torch.equal(model.generate(x, **kw), want)
    beams = dict(max_new_tokens=8, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(x, **beams), src.generate(x, **beams))


def test_generation_config_and_eos_carry_over():
    src = source("llama-tied")
    x = ids()
    free = src.generate(x, max_new_tokens=10, do_sample=False)
    src.generation_config.eos_token_id = int(free[0, 12])  # row 0 stops early, row 1 at most when it emits it
    src.generation_config.pad_token_id = 0
    model = from_transformers(src)
    assert model.generation_config.eos_token_id == src.generation_config.eos_token_id
    want = src.generate(x, max_new_tokens=10)
    assert (want[0, 13:] == 0).all()
    assert torch.equal(model.generate(x, max_new_tokens=10), want)


def test_dtype_and_round_trip_through_save_pretrained(tmp_path):
    src = source("qwen2-untied")
    model = from_transformers(src)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    half = from_transformers(src, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert (half(x).logits.float() - model(x).logits).abs().max() < 0.5


def rope_scaled_llama():
    return LlamaForCausalLM(LlamaConfig(**{**SMALL, "max_position_embeddings": 16384}, num_hidden_layers=1,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192}))


@pytest.mark.parametrize("make, field", [
    (rope_scaled_llama, "rope"),
    (lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, num_hidden_layers=1, use_sliding_window=True, sliding_window=8,
                                          max_window_layers=0)), "use_sliding_window"),
    (lambda: MistralForCausalLM(MistralConfig(**SMALL, num_hidden_layers=1)), "model_type"),
    (lambda: LlamaForCausalLM(LlamaConfig(**SMALL, num_hidden_layers=1, hidden_act="gelu")), "hidden_act"),
    (lambda: LlamaForSequenceClassification(LlamaConfig(**SMALL, num_hidden_layers=1)), "score.weight"),
])
@pytest.mark.parametrize("via", ["memory", "directory"])
def test_unsupported_checkpoints_are_refused_naming_the_field(make, field, via, tmp_path):
    src = make()
    if via == "directory":
        src.save_pretrained(tmp_path)
        src = tmp_path
    with pytest.raises(ConversionError, match=field):
        from_transformers(src)
