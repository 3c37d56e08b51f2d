"""Delta rule core: chunked vs naive, gradients, decode step, dispatch, and the fla-forward / hylo-backward
Function (run on CPU with the reference standing in for fla's forward)."""

import pytest
import torch

import hylo.ops.delta_rule as D
from hylo.ops.delta_rule import (FlaGatedDeltaRule, delta_rule, delta_rule_chunked, delta_rule_naive,
                                 delta_rule_step, l2norm)

H, K, V = 2, 8, 16


def make(T, b=2, gated=True, h0=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, T, H, K, generator=g, dtype=dtype)
    k = l2norm(torch.randn(b, T, H, K, generator=g, dtype=dtype))
    v = torch.randn(b, T, H, V, generator=g, dtype=dtype)
    beta = torch.rand(b, T, H, generator=g, dtype=dtype)
    gate = -torch.rand(b, T, H, generator=g, dtype=dtype) * 2 if gated else None
    s0 = torch.randn(b, H, K, V, generator=g, dtype=dtype) if h0 else None
    return q, k, v, beta, gate, s0


@pytest.mark.parametrize("T", [64, 128, 100, 7])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_chunked_matches_naive(T, gated, with_h0):
    q, k, v, beta, g, s0 = make(T, gated=gated, h0=with_h0)
    o0, h0 = delta_rule_naive(q, k, v, beta, g, None, s0, output_final_state=True)
    o1, h1 = delta_rule_chunked(q, k, v, beta, g, None, s0, output_final_state=True)
    torch.testing.assert_close(o1, o0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h1, h0, rtol=1e-10, atol=1e-10)
    # float32 in: float32 out, close to the float64 truth
    q, k, v, beta, g, s0 = (None if t is None else t.float() for t in (q, k, v, beta, g, s0))
    o2, h2 = delta_rule_chunked(q, k, v, beta, g, initial_state=s0, output_final_state=True)
    assert o2.dtype == torch.float32 and h2.dtype == torch.float32
    torch.testing.assert_close(o2.double(), o0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h2.double(), h0, rtol=1e-4, atol=1e-4)


def test_naive_matches_textbook_rule():
    """One hand-written step of S_t = a (I - b k k^T) S + b k v^T, o = scale S^T q, in the [K, V] layout."""
    q, k, v, beta, g, s0 = make(1, b=1)
    o, S = delta_rule_naive(q, k, v, beta, g, 0.5, s0, True)
    a, b_, kk = g[0, 0, 0].exp(), beta[0, 0, 0], k[0, 0, 0]
    S_ref = a * (torch.eye(K, dtype=kk.dtype) - b_ * torch.outer(kk, kk)) @ s0[0, 0] + b_ * torch.outer(kk, v[0, 0, 0])
    torch.testing.assert_close(S[0, 0], S_ref)
    torch.testing.assert_close(o[0, 0, 0], 0.5 * S_ref.T @ q[0, 0, 0])


def test_chunked_strong_decay_is_finite():
    q, k, v, beta, g, s0 = make(90)
    g = g * 30  # per-step decay down to e^-60, chunk cumsums to ~e^-2000
    o0, h0 = delta_rule_naive(q, k, v, beta, g, None, s0, True)
    o1, h1 = delta_rule_chunked(q.float(), k.float(), v.float(), beta.float(), g.float(), None, s0.float(), True)
    assert torch.isfinite(o1).all() and torch.isfinite(h1).all()
    torch.testing.assert_close(o1.double(), o0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gated", [False, True])
def test_steps_match_parallel(gated):
    q, k, v, beta, g, s0 = (None if t is None else t.float() for t in make(37, gated=gated))
    o_par, h_par = delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True, use_qk_l2norm=True)
    state = s0.clone()
    outs = [delta_rule_step(q[:, t], k[:, t], v[:, t], beta[:, t], None if g is None else g[:, t], state,
                            use_qk_l2norm=True) for t in range(q.shape[1])]
    torch.testing.assert_close(torch.stack(outs, 1), o_par, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, h_par, rtol=1e-4, atol=1e-4)


def test_l2norm_flag_normalizes_q_and_k():
    q, k, v, beta, g, s0 = make(20)
    k = k * 3.0
    o1, h1 = delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True, use_qk_l2norm=True)
    o2, h2 = delta_rule_naive(l2norm(q), l2norm(k), v, beta, g, None, s0, True)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(h1.double(), h2)


def _loss_weights(T, b=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, T, H, V, generator=gen, dtype=torch.float64),
            torch.randn(b, H, K, V, generator=gen, dtype=torch.float64))


def _grads(fn, inputs, wo, wh):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    o, h = fn(*leaves)
    loss = (o.double() * wo).sum() + (0 if h is None else (h.double() * wh).sum())
    loss.backward()
    return [None if t is None else t.grad for t in leaves]


NAMES = "q k v beta g h0".split()


@pytest.mark.parametrize("T,gated", [(70, True), (64, False)])
def test_chunked_grads_match_float64_naive(T, gated):
    inputs = make(T, gated=gated)
    wo, wh = _loss_weights(T)
    ref = _grads(lambda q, k, v, b, g, s: delta_rule_naive(q, k, v, b, g, None, s, True), inputs, wo, wh)
    got = _grads(lambda q, k, v, b, g, s: delta_rule_chunked(q, k, v, b, g, None, s, True),
                 [None if t is None else t.float() for t in inputs], wo, wh)
    for name, r, g in zip(NAMES, ref, got):
        if r is None:
            continue
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r, rtol=1e-3, atol=1e-3, msg=f"grad of {name}")


def test_chunked_gradcheck():
    q, k, v, beta, g, s0 = make(6, b=1, seed=3)
    small = (q[:, :, :1, :3], k[:, :, :1, :3], v[:, :, :1, :2], beta[..., :1], g[..., :1], s0[:, :1, :3, :2])
    fn = lambda *a: delta_rule_chunked(*a[:5], 0.7, a[5], True, chunk_size=4)  # 2 chunks, padded tail
    assert torch.autograd.gradcheck(fn, tuple(t.detach().requires_grad_() for t in small))


# ----------------------------------------------------------------------------------------- fast-path logic
def _ref_fwd(q, k, v, beta, g, scale, initial_state, output_final_state):
    """Stands in for fla's forward on CPU (same signature as the Function's ``fwd``)."""
    with torch.no_grad():
        o, h = delta_rule_naive(q, k, v, beta, g, scale, initial_state, output_final_state)
    return o, (h.float() if h is not None else None)


@pytest.mark.parametrize("final", [True, False])
def test_custom_backward_function_matches_autograd(final):
    """FlaGatedDeltaRule's backward (recompute in float32) vs plain autograd of the naive recurrence."""
    inputs = make(45, seed=5)
    wo, wh = _loss_weights(45)
    ref = _grads(lambda q, k, v, b, g, s: delta_rule_naive(q, k, v, b, g, 0.3, s, final), inputs, wo, wh)
    fn = lambda q, k, v, b, g, s: FlaGatedDeltaRule.apply(q, k, v, b, g, s, 0.3, final, _ref_fwd)
    got = _grads(fn, [t.float() for t in inputs], wo, wh)
    for name, r, g in zip(NAMES, ref, got):
        torch.testing.assert_close(g.double(), r, rtol=1e-3, atol=1e-3, msg=f"grad of {name}")


def test_custom_backward_function_dtypes_and_partial_grads():
    """bf16 inputs get bf16 grads; inputs without requires_grad (and no initial state) get none."""
    q, k, v, beta, g, _ = (None if t is None else t.to(torch.bfloat16) for t in make(20))
    g = g.float()  # layers pass the decay in float32
    q.requires_grad_(), v.requires_grad_(), g.requires_grad_()
    o, h = FlaGatedDeltaRule.apply(q, k, v, beta, g, None, None, False, lambda *a: _ref_fwd(*a[:5], K ** -0.5,
                                                                                           *a[6:]))
    assert h is None and o.dtype == torch.bfloat16
    o.float().square().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and v.grad.dtype == torch.bfloat16 and g.grad.dtype == torch.float32
    assert k.grad is None and beta.grad is None
    assert torch.isfinite(q.grad.float()).all() and g.grad.abs().sum() > 0


def test_dispatch(monkeypatch):
    """On the fast path: fla's own op when its backward runs (or no grad is needed); else, by HYLO_GATED_BWD,
    fla's blocks with hylo's dqkwg (auto / triton / torch), the recompute Function, or fla's op regardless."""
    calls, hylo_calls = [], []

    def fake_fla(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False,
                 use_qk_l2norm=False):
        calls.append(use_qk_l2norm)
        if use_qk_l2norm:
            q, k = l2norm(q), l2norm(k)
        return _ref_fwd(q, k, v, beta, g, scale, initial_state, output_final_state)

    def fake_hylo(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                  use_qk_l2norm_in_kernel=False, dqkwg="triton"):
        hylo_calls.append((dqkwg, use_qk_l2norm_in_kernel))
        return delta_rule_chunked(l2norm(q), l2norm(k), v, beta, g, scale, initial_state, output_final_state)

    monkeypatch.delenv("HYLO_GATED_BWD", raising=False)
    monkeypatch.setenv("HYLO_PAD_HEADS", "0")  # routing only; head padding has its own test
    monkeypatch.setattr(D, "use_fast", lambda x, needs_fla=True: True)
    monkeypatch.setattr(D, "fla_forward", fake_fla)
    monkeypatch.setattr(D, "chunk_gated_delta_rule", fake_hylo)
    monkeypatch.setattr(D, "fla_gated_backward_supported", lambda *a: False)
    q, k, v, beta, g, s0 = (t.float() for t in make(30))
    q.requires_grad_()
    o_ref, _ = delta_rule_naive(l2norm(q), l2norm(k), v, beta, g, None, s0)

    o, h = delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True, use_qk_l2norm=True)
    assert hylo_calls == [("triton", True)] and calls == []  # auto, fla's backward refused: hylo's dqkwg
    torch.testing.assert_close(o, o_ref)
    for mode, dqkwg in (("torch", "torch"), ("triton", "triton")):
        monkeypatch.setenv("HYLO_GATED_BWD", mode)
        delta_rule(q, k, v, beta, g, initial_state=s0, use_qk_l2norm=True)
        assert hylo_calls[-1] == (dqkwg, True)
    monkeypatch.setenv("HYLO_GATED_BWD", "recompute")
    o, h = delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True, use_qk_l2norm=True)
    assert type(o.grad_fn).__name__ == "FlaGatedDeltaRuleBackward" and calls == [False] and len(hylo_calls) == 3
    torch.testing.assert_close(o, o_ref)
    monkeypatch.setenv("HYLO_GATED_BWD", "fla")  # fla's op even where it refuses the backward
    delta_rule(q, k, v, beta, g, use_qk_l2norm=True)
    assert calls == [False, True]
    monkeypatch.setenv("HYLO_GATED_BWD", "recompute")
    with torch.no_grad():  # no backward needed: fla's op directly, l2norm in its kernel, whatever the mode
        delta_rule(q, k, v, beta, g, use_qk_l2norm=True)
    assert calls == [False, True, True]
    delta_rule(q, k, v, beta, None, use_qk_l2norm=True)  # float32 without gates: fla refuses it, reference runs
    assert calls == [False, True, True]
    monkeypatch.setenv("HYLO_GATED_BWD", "auto")
    monkeypatch.setattr(D, "fla_gated_backward_supported", lambda *a: True)
    o, _ = delta_rule(q, k, v, beta, g, use_qk_l2norm=True)
    assert calls == [False, True, True, True] and len(hylo_calls) == 3


def test_backward_detection_override(monkeypatch):
    pytest.importorskip("fla.utils")
    monkeypatch.setenv("HYLO_DELTA_FLA_BWD", "0")
    assert D.fla_gated_backward_supported(None, None, None, None, None) is False
    monkeypatch.setenv("HYLO_DELTA_FLA_BWD", "1")
    assert D.fla_gated_backward_supported(None, None, None, None, None) is True
    monkeypatch.delenv("HYLO_DELTA_FLA_BWD")
    monkeypatch.setattr(D, "_fla_gated_bwd_blocked", lambda: False)  # not Hopper / new Triton: fla's own bwd
    assert D.fla_gated_backward_supported(None, None, None, None, None) is True


def test_narrow_heads_are_padded_exactly_for_a_gated_backward(monkeypatch):
    """Gated calls whose backward will run get key/query and value heads zero-padded to multiples of 64 before
    fla's kernels (head_pad: a Hopper fault workaround); outputs, final state and every gradient equal the unpadded
    call's, and forward-only or ungated calls are not padded."""
    seen = []

    def spy(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
            use_qk_l2norm_in_kernel=False, dqkwg="triton"):
        seen.append((k.shape[-1], v.shape[-1], None if initial_state is None else tuple(initial_state.shape[-2:])))
        if use_qk_l2norm_in_kernel:
            q, k = l2norm(q), l2norm(k)
        return delta_rule_chunked(q, k, v, beta, g, scale, initial_state, output_final_state)

    monkeypatch.delenv("HYLO_GATED_BWD", raising=False)
    monkeypatch.setattr(D, "use_fast", lambda x, needs_fla=True: True)
    monkeypatch.setattr(D, "chunk_gated_delta_rule", spy)
    monkeypatch.setattr(D, "fla_gated_backward_supported", lambda *a: False)

    def run(pad: str):
        monkeypatch.setenv("HYLO_PAD_HEADS", pad)
        leaves = [t.clone().requires_grad_() for t in make(37, dtype=torch.float64)]
        q, k, v, beta, g, s0 = leaves
        o, h = delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True, use_qk_l2norm=True)
        (o.square().sum() + (h * 0.3).sum()).backward()
        return o, h, [t.grad for t in leaves]

    o0, h0, g0 = run("0")
    o1, h1, g1 = run("1")
    assert seen == [(K, V, (K, V)), (64, 64, (64, 64))] and h1.shape == h0.shape == (2, H, K, V)
    torch.testing.assert_close(o1, o0)
    torch.testing.assert_close(h1, h0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)
    assert D.head_pad(64) == 0 and D.head_pad(32) == 32 and D.head_pad(96) == 32
    monkeypatch.setattr(D, "fla_forward", lambda q, k, v, *a: seen.append((k.shape[-1], v.shape[-1])) or
                        delta_rule_chunked(q, k, v, *a[:4]))
    q, k, v, beta, g, s0 = make(9, dtype=torch.float32)
    with torch.no_grad():  # no backward: fla's forward as it is
        delta_rule(q, k, v, beta, g, initial_state=s0)
    assert seen[-1] == (K, V)
