"""Weight normalization: which matrices, which axis, and the invariants after optimizer steps."""

import torch

from hylo import HybridLM, HyloConfig
from hylo.weightnorm import normalize_weights, weight_norm_targets


def model(tied=True, layers="a f swa f"):
    torch.manual_seed(0)
    cfg = HyloConfig(vocab_size=64, hidden_size=32, layers=layers, attn_num_heads=4, swa_window=4,
                     weight_norm=True, tie_word_embeddings=tied, num_meta_tokens=2)
    return HybridLM(cfg)


def check_invariants(m):
    names = {n: d for n, _, d in weight_norm_targets(m)}
    assert names["layers.0.mixer.qkv_proj.weight"] == 1 and names["layers.0.mixer.o_proj.weight"] == 0
    assert names["layers.1.mixer.gate_up_proj.weight"] == 1 and names["layers.1.mixer.down_proj.weight"] == 0
    for _, w, dim in weight_norm_targets(m):
        torch.testing.assert_close(w.norm(dim=dim), torch.ones(w.shape[1 - dim]), atol=1e-5, rtol=0)


def test_targets_and_axes_after_steps():
    m = model(tied=False)
    assert "lm_head.weight" in {n for n, _, _ in weight_norm_targets(m)}
    check_invariants(m)  # already projected at init
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, 64, (2, 12))
    for _ in range(3):
        loss = m(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        q = m.layers[0].mixer.qkv_proj.weight
        assert not torch.allclose(q.norm(dim=1), torch.ones(q.shape[0]), atol=1e-4)  # the step moved off the sphere
        normalize_weights(m)
        check_invariants(m)


def test_tied_embedding_not_projected_but_logits_use_unit_rows():
    m = model(tied=True)
    assert "lm_head.weight" not in {n for n, _, _ in weight_norm_targets(m)}
    emb = m.embed_tokens.weight
    assert not torch.allclose(emb.norm(dim=1), torch.ones(64))
    h = torch.randn(1, 3, 32)
    ref = h @ (emb / emb.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(m.logits(h), ref, atol=1e-5, rtol=1e-5)


def test_vectors_untouched():
    m = model()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.fill_(3.0)
    normalize_weights(m)
    assert all(torch.all(p == 3.0) for n, p in m.named_parameters() if p.dim() == 1)


def test_logits_follow_updates_that_do_not_bump_versions():
    """The fused AdamW changes weights without bumping their version counters (on CUDA the trainer's optimizer is
    fused): logits without grad must still use the new unit-row head, equal to the training path's. A cache keyed
    on versions failed this on the H100 (a stale head in the trainer's validation loss)."""
    m = model()
    h = torch.randn(2, 3, 32)
    with torch.no_grad():
        a = m.logits(h)
    opt = torch.optim.AdamW(m.parameters(), lr=0.5, fused=True)
    m.lm_head.weight.grad = torch.randn_like(m.lm_head.weight)
    v = m.lm_head.weight._version
    opt.step()
    with torch.no_grad():
        b = m.logits(h)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, m.logits(h).detach())
    w = m.lm_head.weight
    torch.testing.assert_close(b, torch.nn.functional.linear(h, w / w.norm(dim=1, keepdim=True)))
    assert w._version == v  # the premise: the fused step did not bump the version


def test_inference_head_cache_follows_weight_updates():
    """Without grad: same logits as the training path, and an in-place update is seen at the next call."""
    m = model()
    h = torch.randn(2, 3, 32)
    with torch.no_grad():
        a = m.logits(h)
    torch.testing.assert_close(a, m.logits(h).detach())
    with torch.no_grad():
        m.lm_head.weight.mul_(torch.rand(64, 1) + 0.5).add_(0.1)
        b = m.logits(h)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, m.logits(h).detach())
