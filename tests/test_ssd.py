"""SSD core: chunked vs naive, gradients, decode step, and the fla-forward / hylo-backward Function (on CPU)."""

import functools

import pytest
import torch

import hylo.ops.ssd as S
from hylo.ops.ssd import SSDFlaForward, fla_forward, ssd, ssd_chunked, ssd_naive, ssd_step

H, P, G, N = 4, 8, 2, 16


def make(T, b=2, dtype=torch.float64, seed=0, h0=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, H, P, generator=g, dtype=dtype)
    dt = (torch.rand(b, T, H, generator=g, dtype=dtype) * 0.5 + 0.01)
    A = -(torch.rand(H, generator=g, dtype=dtype) * 4 + 0.5)
    B = torch.randn(b, T, G, N, generator=g, dtype=dtype)
    C = torch.randn(b, T, G, N, generator=g, dtype=dtype)
    s0 = torch.randn(b, H, P, N, generator=g, dtype=dtype) if h0 else None
    return x, dt, A, B, C, s0


def simple_gla_ref(q, k, v, g, scale, initial_state=None, output_final_state=False):
    """fla's documented ``chunk_simple_gla`` semantics: S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale q_t S_t."""
    b, T, Hh, K = q.shape
    Sx = q.new_zeros(b, Hh, K, v.shape[-1], dtype=torch.float64) if initial_state is None else initial_state.double()
    q, k, v, g = q.double(), k.double(), v.double(), g.double()
    out = []
    for t in range(T):
        Sx = g[:, t].exp()[..., None, None] * Sx + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], Sx))
    return torch.stack(out, 1).to(v.dtype), (Sx.float() if output_final_state else None)


@pytest.mark.parametrize("T", [32, 37, 5])
@pytest.mark.parametrize("with_h0", [False, True])
def test_chunked_matches_naive(T, with_h0):
    x, dt, A, B, C, s0 = make(T, h0=with_h0)
    y0, h0 = ssd_naive(x, dt, A, B, C, s0, output_final_state=True)
    y1, h1 = ssd_chunked(x, dt, A, B, C, chunk_size=16, initial_state=s0, output_final_state=True)
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h1, h0, rtol=1e-10, atol=1e-10)
    # float32 inputs: float32 outputs, close to the float64 truth
    y2, h2 = ssd_chunked(*(t.float() for t in (x, dt, A, B, C)), chunk_size=16,
                         initial_state=None if s0 is None else s0.float(), output_final_state=True)
    assert y2.dtype == torch.float32 and h2.dtype == torch.float32
    torch.testing.assert_close(y2.double(), y0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h2.double(), h0, rtol=1e-4, atol=1e-4)


def test_chunked_strong_decay_is_finite():
    x, dt, A, B, C, s0 = make(40)
    y0, h0 = ssd_naive(x, dt * 20, A, B, C, s0, True)  # exp(dt*A) down to ~e^-90
    y1, h1 = ssd_chunked(x.float(), (dt * 20).float(), A.float(), B.float(), C.float(), 16, s0.float(), True)
    assert torch.isfinite(y1).all()
    torch.testing.assert_close(y1.double(), y0, rtol=1e-4, atol=1e-4)


def _grads(fn, inputs, wy, wh):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y, h = fn(*leaves)
    ((y.double() * wy).sum() + (h.double() * wh).sum()).backward()
    return [t.grad for t in leaves]


def _loss_weights(T):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, T, H, P, generator=g, dtype=torch.float64), torch.randn(2, H, P, N, generator=g,
                                                                                  dtype=torch.float64)


@pytest.mark.parametrize("T", [32, 21])
def test_chunked_grads_match_float64_naive(T):
    inputs = make(T)
    wy, wh = _loss_weights(T)
    ref = _grads(lambda *a: ssd_naive(*a[:5], a[5], True), inputs, wy, wh)
    got = _grads(lambda *a: ssd_chunked(*a[:5], 16, a[5], True), [t.float() for t in inputs], wy, wh)
    for name, r, g in zip("x dt A B C h0".split(), ref, got):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4, msg=name)


def test_step_matches_naive():
    x, dt, A, B, C, s0 = make(9, dtype=torch.float32)
    y0, h0 = ssd_naive(x, dt, A, B, C, s0, True)
    state = s0.clone()
    ys = [ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state) for t in range(9)]
    torch.testing.assert_close(torch.stack(ys, 1), y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, h0, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ fast path logic, fla replaced by a reference
fake_fla = functools.partial(fla_forward, impl=simple_gla_ref)


@pytest.mark.parametrize("with_h0", [False, True])
def test_fla_mapping(with_h0):
    """q=C, k=B, v=dt*x, g=dt*A, scale=1 and the transposed state reproduce SSD."""
    x, dt, A, B, C, s0 = make(13, dtype=torch.float32, h0=with_h0)
    y0, h0 = ssd_naive(x, dt, A, B, C, s0, True)
    y1, h1 = fake_fla(x, dt, A, B, C, s0, True)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-5)


def test_value_padding_is_exact(monkeypatch):
    """Heads narrower than 64 go to fla with zero value columns (a Hopper masked-load workaround); the outputs, final
    state and every gradient equal the unpadded call's, and the kernel sees a multiple of 64 only when padding."""
    seen = []

    def spy(**kw):
        seen.append(kw["v"].shape[-1])
        return simple_gla_ref(**kw)

    def run(pad: str):
        monkeypatch.setenv("HYLO_SSD_PAD_V", pad)
        leaves = [t.clone().requires_grad_() for t in make(9, dtype=torch.float64)]
        y, h = fla_forward(*leaves[:5], leaves[5], True, impl=spy, pad_value=True)
        (y.square().sum() + (h * 0.3).sum()).backward()
        return y, h, [t.grad for t in leaves]

    y0, h0, g0 = run("0")
    y1, h1, g1 = run("1")
    assert seen == [P, 64] and h1.shape == h0.shape == (2, H, P, N)
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(h1, h0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)
    assert S.value_pad(64) == 0 and S.value_pad(96) == 32
    fla_forward(*make(5)[:5], impl=spy)  # a forward-only call is not padded
    assert seen[-1] == P


@pytest.mark.parametrize("T,final", [(32, True), (21, True), (21, False)])
def test_custom_backward_function(T, final):
    inputs = make(T, dtype=torch.float32)
    wy, wh = _loss_weights(T)
    wh = wh if final else wh * 0
    ref = _grads(lambda *a: ssd_naive(*a[:5], a[5], True), [t.double() for t in inputs], wy, wh)

    def fn(*a):
        y, h = SSDFlaForward.apply(*a, final, 16, fake_fla)
        return y, (h if final else a[5] * 0)
    got = _grads(fn, inputs, wy, wh)
    for name, r, g in zip("x dt A B C h0".split(), ref, got):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4, msg=name)


def test_custom_backward_bf16_and_partial_grads():
    x, dt, A, B, C, _ = make(20, dtype=torch.float32)
    x, B, C = (t.bfloat16().requires_grad_() for t in (x, B, C))
    y, h = SSDFlaForward.apply(x, dt, A, B, C, None, False, 16, fake_fla)  # dt, A, h0 need no grad
    assert h is None and y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all() and B.grad.abs().sum() > 0


@pytest.mark.parametrize("mode,fla_bwd,path", [("auto", True, "fla"), ("auto", False, "triton"),
                                               ("torch", True, "torch"), ("triton", False, "triton"),
                                               ("recompute", False, "recompute"), ("fla", False, "fla")])
def test_ssd_dispatch_with_fake_fast_path(monkeypatch, mode, fla_bwd, path):
    """With the fast path forced and fla stubbed, ``ssd`` takes the backward HYLO_GATED_BWD names (auto: fla's
    own where it runs, else fla's blocks with hylo's dqkwg) and the gradients are right."""
    calls = []

    def fake_fla_any(x, dt, A, B, C, initial_state=None, output_final_state=False, impl=None, pad_value=False):
        calls.append("fla" if impl is None else None)
        return fla_forward(x, dt, A, B, C, initial_state, output_final_state, impl=impl or simple_gla_ref,
                           pad_value=pad_value)

    def fake_hylo(q, k, v, g, scale=None, initial_state=None, output_final_state=False, dqkwg="triton"):
        calls[-1] = dqkwg
        return simple_gla_ref(q, k, v, g, scale, initial_state, output_final_state)

    monkeypatch.setenv("HYLO_GATED_BWD", mode)
    monkeypatch.setattr(S, "use_fast", lambda x: True)
    monkeypatch.setattr(S, "fla_forward", fake_fla_any)
    monkeypatch.setattr(S, "chunk_simple_gla", fake_hylo)
    monkeypatch.setattr(S, "fla_backward_supported", lambda *_: fla_bwd)
    orig = SSDFlaForward.apply
    monkeypatch.setattr(SSDFlaForward, "apply", lambda *a: calls.append("recompute") or orig(*a))
    inputs = make(19, dtype=torch.float32)
    wy, wh = _loss_weights(19)
    ref = _grads(lambda *a: ssd_naive(*a[:5], a[5], True), [t.double() for t in inputs], wy, wh)
    got = _grads(lambda *a: ssd(*a[:5], chunk_size=16, initial_state=a[5], output_final_state=True), inputs, wy, wh)
    assert calls[0] == path, calls
    for r, g in zip(ref, got):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # no backward needed: fla's op, whatever the mode
        ssd(*inputs[:5], initial_state=inputs[5])
    assert calls[-1] == "fla"


def test_ssd_cpu_uses_chunked():
    x, dt, A, B, C, s0 = make(20, dtype=torch.float32)
    y0, h0 = ssd_chunked(x, dt, A, B, C, 16, s0, True)
    y1, h1 = ssd(x, dt, A, B, C, chunk_size=16, initial_state=s0, output_final_state=True)
    assert torch.equal(y0, y1) and torch.equal(h0, h1)


# ------------------------------------------------------------------ against fla's own code (skipped without fla)
def test_mapping_against_fla_naive_and_detection(monkeypatch):
    naive = pytest.importorskip("fla.ops.simple_gla.naive")
    import fla.utils as fu

    x, dt, A, B, C, s0 = make(11, dtype=torch.float32)
    y0, h0 = ssd_naive(x, dt, A, B, C, s0, True)
    y1, h1 = fla_forward(x, dt, A, B, C, s0, True, impl=naive.naive_recurrent_simple_gla)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-5)

    detect = S.fla_backward_supported.__wrapped__
    monkeypatch.delenv("HYLO_SSD_FLA_BWD", raising=False)
    monkeypatch.setattr(fu, "IS_NVIDIA_HOPPER", True)
    monkeypatch.setattr(fu, "TRITON_ABOVE_3_4_0", True)
    monkeypatch.setattr(fu, "TRITON_ABOVE_3_7_1", False)
    assert detect(False) is False  # our H100: Triton 3.6 -> fla's gated backward raises
    monkeypatch.setattr(fu, "TRITON_ABOVE_3_7_1", True)
    assert detect(False) is True
    monkeypatch.setattr(fu, "TRITON_ABOVE_3_7_1", False)
    monkeypatch.setattr(fu, "IS_NVIDIA_HOPPER", False)
    assert detect(False) is True  # e.g. A100
    monkeypatch.setenv("HYLO_SSD_FLA_BWD", "0")
    assert detect(False) is False


def test_group_to_head_mapping():
    """Head h reads group h // (H // G) (mamba_ssm / HF layout), checked against explicit per-head B, C."""
    x, dt, A, B, C, s0 = make(7)
    idx = torch.arange(H) // (H // G)
    y0, h0 = ssd_naive(x, dt, A, B[:, :, idx], C[:, :, idx], s0, True)
    y1, h1 = ssd_chunked(x, dt, A, B, C, 4, s0, True)
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(h1, h0)


def test_compiled_backward_falls_back_to_eager(monkeypatch):
    """With HYLO_SSD_COMPILE_BWD=1 a failing compile warns once and the eager recompute gives the gradients."""
    def broken(*a, **k):
        raise RuntimeError("inductor says no")
    monkeypatch.setenv("HYLO_SSD_COMPILE_BWD", "1")
    monkeypatch.setattr(S, "_compiled_chunked", lambda: broken)
    monkeypatch.setattr(S, "_compile_failed", False)
    inputs = make(18, dtype=torch.float32)
    wy, wh = _loss_weights(18)
    ref = _grads(lambda *a: ssd_chunked(*a[:5], 16, a[5], True), inputs, wy, wh)
    with pytest.warns(UserWarning, match="compiled SSD backward failed"):
        got = _grads(lambda *a: SSDFlaForward.apply(*a, True, 16, fake_fla), inputs, wy, wh)
    assert S._compile_failed
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
