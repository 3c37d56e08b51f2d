"""Whole model: cached prefill + decode ≡ one full forward (every operator, meta tokens), growth, init."""

import pytest
import torch

from hylo import HybridLM, HyloConfig
from hylo.presets import preset


def tiny(layers, meta=3, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=101, hidden_size=32, layers=layers, attn_num_heads=4, attn_num_kv_heads=2, swa_window=6,
                mamba2_head_dim=16, mamba2_state_size=8, mamba2_chunk_size=8, num_meta_tokens=meta)
    return HybridLM(HyloConfig(**{**base, **kw})).eval()


def perturb(model, seed=1):
    """Random values in every parameter, so zero-initialised parts (e.g. JetBlock's generator) are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


PATTERNS = ["a f swa f", "tiny-all"]


def build(pattern, meta=3):
    if pattern == "tiny-all":
        torch.manual_seed(0)
        return HybridLM(preset("tiny-all", num_meta_tokens=meta)).eval()
    return tiny(pattern, meta)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("meta", [0, 4])
def test_prefill_decode_equals_forward(pattern, meta):
    model = perturb(build(pattern, meta))
    ids = torch.randint(0, model.config.vocab_size, (2, 21))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 21)
        pre = model(ids[:, :9], past_key_values=cache).logits
        steps = [model.decode_step(ids[:, t], cache) for t in range(9, 21)]
    got = torch.cat([pre, torch.stack(steps, 1)], 1)
    torch.testing.assert_close(got, full, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_chunked_prefill_and_growable_cache(pattern):
    model = perturb(build(pattern, 2))
    ids = torch.randint(0, model.config.vocab_size, (1, 30))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(1, 4, growable=True)  # must grow several times
        parts = [model(ids[:, a:b], past_key_values=cache).logits for a, b in ((0, 5), (5, 17), (17, 30))]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-4, rtol=2e-4)
    assert cache.get_seq_length() == 30


def test_meta_tokens_change_outputs_and_are_stripped():
    model = perturb(tiny("a f swa f", meta=4))
    ids = torch.randint(0, 101, (1, 7))
    logits = model(ids).logits
    assert logits.shape == (1, 7, 101)
    with torch.no_grad():
        model.meta_tokens.add_(1.0)
    assert not torch.allclose(model(ids).logits, logits)


def test_meta_state_computed_once_per_weights(monkeypatch):
    model = perturb(tiny("a f swa f", meta=4))
    calls = []
    real = model.layers[0].forward
    monkeypatch.setattr(model.layers[0], "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.new_cache(2, 8)
    model.new_cache(3, 16)
    assert len(calls) == 1  # second cache reused the template
    with torch.no_grad():
        model.meta_tokens.mul_(2)
    model.new_cache(1, 8)
    assert len(calls) == 2  # weights changed: recomputed


def test_cache_too_small_is_a_clear_error():
    model = tiny("a f")
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="larger max_len"):
        model(torch.zeros(1, 6, dtype=torch.long), past_key_values=cache)


def test_padded_batch_refused():
    model = tiny("a f")
    with pytest.raises(ValueError, match="padded"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]))


def test_loss_is_shifted_cross_entropy():
    model = tiny("a f", meta=0)
    ids = torch.randint(0, 101, (2, 9))
    out = model(ids, labels=ids)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 101), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)


def test_targets_give_the_trainers_loss_without_logits():
    """``targets`` (next tokens, unshifted) give mean cross-entropy over every position, -100 ignored, with meta
    tokens stripped, and the same gradients as the loss computed from the logits."""
    torch.manual_seed(0)
    m = HybridLM(preset("tiny-all"))
    x, y = torch.randint(0, 512, (2, 9)), torch.randint(0, 512, (2, 9))
    y[0, 3] = -100
    out = m(x, targets=y)
    ref = torch.nn.functional.cross_entropy(m(x).logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref)
    g1 = torch.autograd.grad(out.loss, m.embed_tokens.weight)[0]
    g2 = torch.autograd.grad(ref, m.embed_tokens.weight)[0]
    torch.testing.assert_close(g1, g2)


def test_init_keeps_residual_stream_bounded_at_depth():
    """With the scaled residual init the output RMS of a 48-layer stack stays within a small factor of its input."""
    torch.manual_seed(0)
    model = HybridLM(HyloConfig(vocab_size=50, hidden_size=64, layers=" ".join(["a f"] * 24), attn_num_heads=4))
    x = model.embed_tokens(torch.randint(0, 50, (2, 32)))
    h = x
    with torch.no_grad():
        for b in model.layers:
            h = b(h)
    ratio = (h.pow(2).mean().sqrt() / x.pow(2).mean().sqrt()).item()
    assert 0.5 < ratio < 3.0, ratio
    # residual writers are initialised smaller than readers
    blk = model.layers[0].mixer
    assert blk.o_proj.weight.std() < 0.5 * blk.qkv_proj.weight.std()


def test_separate_projection_keys_load_into_the_fused_matrices(tmp_path):
    """Attention's q/k/v and the FFN's gate/up are one matrix each; a state dict with the separate Llama/Qwen
    names (and older hylo checkpoints) loads into them and gives the same outputs."""
    torch.manual_seed(0)
    cfg = HyloConfig(vocab_size=64, hidden_size=32, layers="a f swa f", attn_num_heads=4, attn_num_kv_heads=2,
                     swa_window=4, attn_qkv_bias=True)
    src = HybridLM(cfg).eval()
    old = {}
    for k, t in src.state_dict().items():
        if ".qkv_proj." in k:
            q, kk, v = t.split([32, 16, 16], dim=0)
            for part, piece in (("q_proj", q), ("k_proj", kk), ("v_proj", v)):
                old[k.replace("qkv_proj", part)] = piece.clone()
        elif ".gate_up_proj." in k:
            g, u = t.chunk(2, dim=0)
            old[k.replace("gate_up_proj", "gate_proj")] = g.clone()
            old[k.replace("gate_up_proj", "up_proj")] = u.clone()
        else:
            old[k] = t.clone()
    assert any(".k_proj.bias" in k for k in old) and not any("qkv" in k or "gate_up" in k for k in old)
    torch.manual_seed(1)
    dst = HybridLM(cfg).eval()
    dst.load_state_dict(old)  # strict: every key consumed
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(dst(ids).logits, src(ids).logits)
    # the same through transformers' loader (which skips the separate tensors on its own)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    src.save_pretrained(tmp_path)
    old.pop("lm_head.weight", None)  # tied
    save_file(old, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(loaded.eval()(ids).logits, src(ids).logits)
