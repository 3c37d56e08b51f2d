"""Hugging Face integration: Auto-class registration, save/load round trip, and `generate` on a HybridCache."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

import hylo
from hylo import HybridCache, HybridLM, HyloConfig
from hylo.model import _CACHE_FIELD

VOCAB = 101


def tiny(layers="a f swa f", meta=3, tie_word_embeddings=False, **kw):
    """A small hybrid whose greedy continuations are diverse (not "repeat the last token", as at init, where the
    residual stream dominates) and depend on the meta tokens: unit-variance embeddings, matrices scaled by
    1/sqrt(fan-in), random (not unit) norm weights."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, layers=layers, attn_num_heads=4, attn_num_kv_heads=2, swa_window=6,
               num_meta_tokens=meta, tie_word_embeddings=tie_word_embeddings)
    model = HybridLM(HyloConfig(**{**cfg, **kw})).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name in ("embed_tokens.weight", "meta_tokens"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def greedy_by_full_forwards(model, ids, n):
    """The reference continuation: argmax of a full (cache-free) forward over the whole sequence, n times."""
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    return seq


def prompt(batch=2, length=5, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- registration and round trip
def test_auto_classes_know_hylo():
    # registered by `import hylo` itself (nothing in the tests registers before this check)
    assert CONFIG_MAPPING["hylo"] is HyloConfig and MODEL_FOR_CAUSAL_LM_MAPPING[HyloConfig] is HybridLM
    cfg = AutoConfig.for_model("hylo", vocab_size=50, hidden_size=32, layers="a f", attn_num_heads=4)
    assert isinstance(cfg, HyloConfig)
    assert type(AutoModelForCausalLM.from_config(cfg)) is HybridLM
    hylo.hf.register_auto_classes()  # idempotent: a second call must not raise


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip(tmp_path, tie):
    model = tiny(meta=3, weight_norm=True, tie_word_embeddings=tie)
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "hylo" and saved["architectures"] == ["HybridLM"]
    assert "auto_map" not in saved  # loading needs `import hylo`, not remote code
    assert saved["num_meta_tokens"] == 3 and saved["weight_norm"] is True and saved["tie_word_embeddings"] is tie
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "meta_tokens" in keys
    assert ("lm_head.weight" in keys) is (not tie)  # a tied head is stored once

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is HybridLM
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert strip(loaded.config) == strip(model.config)
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) is tie
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = prompt()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


# ----------------------------------------------------------------------------- generate
@pytest.mark.parametrize("meta", [0, 4])
def test_greedy_generate_equals_manual_argmax_loop(meta):
    model = tiny(meta=meta)
    ids = prompt(batch=2, length=5)
    ref = greedy_by_full_forwards(model, ids, 14)  # 19 tokens: past the SWA window, the cache grows twice
    out = model.generate(ids, max_new_tokens=14, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(model.generate(ids, max_new_tokens=14, do_sample=False, use_cache=False), ref)


def test_generate_rows_are_independent():
    model = tiny()
    ids = prompt(batch=3, length=6, seed=3)
    both = model.generate(ids, max_new_tokens=8, do_sample=False)
    for i in range(3):
        assert torch.equal(model.generate(ids[i:i + 1], max_new_tokens=8, do_sample=False), both[i:i + 1])


def test_generate_with_user_cache_and_continuation():
    model = tiny()
    ids = prompt()
    ref = greedy_by_full_forwards(model, ids, 10)
    cache = model.new_cache(2, 32)
    first = model.generate(ids, **{_CACHE_FIELD: cache}, max_new_tokens=4, do_sample=False)
    assert torch.equal(first, ref[:, :9]) and cache.get_seq_length() == 8  # the last token is not yet consumed
    more = torch.cat([first, prompt(length=3, seed=5)], 1)  # 4 tokens the cache has not seen
    rest = model.generate(more, **{_CACHE_FIELD: cache}, max_new_tokens=6, do_sample=False)
    assert torch.equal(rest, greedy_by_full_forwards(model, more, 6))
    with pytest.raises(ValueError, match="whole sequence"):  # only the new tokens: ambiguous, refused
        model.generate(more[:, -2:], **{_CACHE_FIELD: cache}, max_new_tokens=2)


def test_generate_stops_at_eos_and_pads():
    model = tiny()
    ids = prompt()
    ref = greedy_by_full_forwards(model, ids, 10)
    new = ref[0, 5:]
    k = next(i for i in range(2, 10) if new[i] not in new[:i])  # a token row 0 first emits at step k >= 2
    eos, pad = int(new[k]), 0
    out = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(out[0, :5 + k + 1], ref[0, :5 + k + 1])
    assert (out[0, 5 + k + 1:] == pad).all()
    row1 = ref[1, 5:5 + out.shape[1] - 5]  # row 1 keeps going until it emits eos or the batch ends
    stop = next((i for i, t in enumerate(row1) if t == eos), len(row1) - 1)
    assert torch.equal(out[1, 5:5 + stop + 1], row1[:stop + 1])


def test_sampling_is_reproducible_with_a_seed():
    model = tiny(meta=2)
    ids = prompt()
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0)
    torch.manual_seed(7)
    a = model.generate(ids, **kw)
    torch.manual_seed(7)
    b = model.generate(ids, **kw)
    torch.manual_seed(8)
    c = model.generate(ids, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, greedy_by_full_forwards(model, ids, 12))


def test_beam_search_with_cache_equals_without():
    """Beam search reorders the cache rows (reorder_cache); recomputing every step from scratch is the reference."""
    model = tiny()
    ids = prompt()
    kw = dict(max_new_tokens=10, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


def test_padded_batches_are_refused():
    model = tiny()
    ids = prompt()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match="padded"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3)


def test_unsupported_generate_uses_are_refused():
    model = tiny()
    ids = prompt()
    with pytest.raises(ValueError, match="stateful"):  # recurrent states cannot be rolled back
        model.generate(ids, assistant_model=model, max_new_tokens=3)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model.generate(inputs_embeds=model.embed_tokens(ids), max_new_tokens=3)
    with pytest.raises(TypeError, match="HybridCache"):
        model(ids, past_key_values=DynamicCache())
    assert isinstance(getattr(model(ids, use_cache=True), _CACHE_FIELD), HybridCache)
    assert isinstance(model(ids, cache=model.new_cache(2, 16)).logits, torch.Tensor)  # either name is taken
    with pytest.raises(ValueError, match="once"):
        model(ids, cache=model.new_cache(2, 16), past_key_values=model.new_cache(2, 16))
