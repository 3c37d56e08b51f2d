"""LM head + cross-entropy (hylo.ops.linear_ce): the reference and the fused chunked form (its PyTorch kernel; fla's
Triton kernels are checked on the GPU by benchmarks/train_throughput.py) against plain F.cross_entropy, forward and
backward, with ignored targets, a computed (normalized) weight, a tied embedding, and under torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from hylo import HybridLM, HyloConfig
from hylo.ops import linear_ce
from hylo.ops.linear_ce import fused_linear_ce, linear_cross_entropy, resolve

N, D, V = 37, 16, 53  # N not a multiple of the chunks below


def inputs(seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g).mul_(0.5).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    if ignore:
        t[torch.randperm(N, generator=g)[:9]] = -100
    return h, w, t


def normalized(w):
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-6)


def loss_and_grads(fn, h, w, t, norm=False, scale=1.0):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, normalized(w) if norm else w, t)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


def plain(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100)


@pytest.mark.parametrize("norm", [False, True])
def test_reference_is_plain_cross_entropy(norm):
    h, w, t = inputs()
    want = loss_and_grads(plain, h, w, t, norm)
    got = loss_and_grads(lambda *a: linear_cross_entropy(*a, impl="ref"), h, w, t, norm)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert want[2].abs().sum() > 0


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("chunk", [1, 8, 100])
def test_fused_matches_reference(norm, chunk):
    """Loss, dh and dweight (through the normalization, to the parameter), ignored rows, a scaled loss."""
    h, w, t = inputs()
    want = loss_and_grads(plain, h, w, t, norm, scale=0.25)
    got = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk=chunk, impl="fused"), h, w, t, norm, scale=0.25)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert got[1][t == -100].abs().max() == 0  # ignored rows get no gradient
    assert got[1][t != -100].abs().min() > 0


def test_fused_bf16_autocast_close_to_reference():
    """Under autocast both run the matmuls in bf16; gradients come back in the inputs' float32."""
    h, w, t = inputs(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = loss_and_grads(plain, h, w, t, norm=True)
        got = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk=8, impl="fused"), h, w, t, norm=True)
    assert got[1].dtype == got[2].dtype == torch.float32
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=3e-2)


def test_all_ignored_gives_zero():
    h, w, t = inputs(ignore=False)
    t[:] = -100
    loss, dh, dw = loss_and_grads(lambda *a: linear_cross_entropy(*a, impl="fused"), h, w, t)
    assert loss == 0 and dh.abs().max() == 0 and dw.abs().max() == 0
    assert torch.isnan(linear_cross_entropy(h, w, t, impl="ref"))  # F.cross_entropy's own convention


def test_no_grad_loss_only():
    """Without gradients (evaluation) the fused setting computes the loss alone, chunked; same value."""
    h, w, t = inputs(3)
    with torch.no_grad():
        got = linear_cross_entropy(h, w, t, chunk=6, impl="fused")
        want = plain(h, w, t)
    torch.testing.assert_close(got, want)
    assert got.grad_fn is None


def test_op_returns_unit_gradients():
    """The custom op's outputs are the loss and its gradients for a loss gradient of 1."""
    h, w, t = inputs(4)
    loss, dh, dw = fused_linear_ce(h.detach(), w.detach(), t, -100, 7, "torch")
    _, gh, gw = loss_and_grads(plain, h, w, t)
    torch.testing.assert_close(dh, gh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dw, gw, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="kernel 'cuda'"):
        fused_linear_ce(h.detach(), w.detach(), t, -100, 7, "cuda")


def test_fused_compiles_without_graph_break():
    h, w, t = inputs(5)
    fn = torch.compile(lambda h, w, t: linear_cross_entropy(h, normalized(w), t, chunk=8, impl="fused"),
                       fullgraph=True, backend="aot_eager")
    got = loss_and_grads(fn, h, w, t)
    want = loss_and_grads(plain, h, w, t, norm=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_selection_and_errors(monkeypatch):
    h, w, t = inputs()
    assert resolve(h) == "ref"  # CPU: auto takes the reference
    assert resolve(h, "fused") == "torch"  # no fla kernels on the CPU: the PyTorch loop
    with linear_ce.use_impl("fused"):
        assert resolve(h) == "torch"
    assert linear_ce.get_impl() == "auto"
    monkeypatch.setattr(linear_ce, "use_fast", lambda x: True)  # as on CUDA with fla
    assert resolve(h) == "fla"
    with pytest.raises(ValueError, match="'fast'.*auto"):
        linear_cross_entropy(h, w, t, impl="fast")
    with pytest.raises(ValueError, match="targets must be"):
        linear_cross_entropy(h, w, t[:-1], impl="ref")
    with pytest.raises(ValueError, match="one dtype"):
        linear_cross_entropy(h, w.double(), t, impl="fused")


@pytest.mark.parametrize("compiled", [False, True])
def test_model_loss_fused_equals_reference(compiled):
    """HybridLM(targets=...): tied embedding + weight normalization, so the head weight is computed from the
    embedding; the fused form gives the reference's loss and parameter gradients, eager and compiled."""
    cfg = dict(vocab_size=97, hidden_size=32, layers="a f", attn_num_heads=4, weight_norm=True,
               tie_word_embeddings=True)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    tgt = ids.roll(-1, 1)
    tgt[:, -1] = -100
    out = {}
    for name in ("ref", "fused"):
        torch.manual_seed(0)
        model = HybridLM(HyloConfig(**cfg))
        assert model.lm_head.weight is model.embed_tokens.weight
        if compiled:
            model.compile(backend="aot_eager")
        with linear_ce.use_impl(name):
            loss = model(input_ids=ids, targets=tgt).loss
        loss.backward()
        out[name] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(out["fused"][0], out["ref"][0])
    assert out["ref"][1]["embed_tokens.weight"].abs().sum() > 0
    for n, g in out["ref"][1].items():
        torch.testing.assert_close(out["fused"][1][n], g, atol=1e-5, rtol=1e-4, msg=n)
