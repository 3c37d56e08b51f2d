"""JetBlock's dynamic conv: reference vs an explicit loop, state continuation, decode step, and the Triton
kernels (forward and backward) run by Triton's CPU interpreter."""

import pytest
import torch

from hylo.ops.dynamic_conv import dynamic_conv, dynamic_conv_ref, dynamic_conv_step

C, KC = 5, 4


def make(T, b=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, C, generator=g, dtype=dtype)
    w = torch.randn(b, T, C, KC, generator=g, dtype=dtype)
    s = torch.randn(b, C, KC - 1, generator=g, dtype=dtype)
    return x, w, s


def loop_conv(x, w, state):
    """y_t[c] = sum_j w_t[c, j] x_{t-K+1+j}[c], reading the state for negative positions."""
    b, T, _ = x.shape
    hist = state.transpose(1, 2)  # [b, K-1, C]: positions -(K-1) .. -1
    y = torch.zeros_like(x)
    for t in range(T):
        for j in range(KC):
            p = t - KC + 1 + j
            xp = x[:, p] if p >= 0 else hist[:, p + KC - 1]
            y[:, t] += w[:, t, :, j] * xp
    return y


@pytest.mark.parametrize("T", [1, 2, 9])
@pytest.mark.parametrize("with_state", [False, True])
def test_ref_matches_loop(T, with_state):
    x, w, s = make(T)
    s = s if with_state else None
    y, new = dynamic_conv_ref(x, w, s)
    torch.testing.assert_close(y, loop_conv(x, w, torch.zeros_like(make(1)[2]) if s is None else s))
    full = torch.cat([torch.zeros(2, C, KC - 1, dtype=x.dtype) if s is None else s, x.transpose(1, 2)], -1)
    torch.testing.assert_close(new, full[..., -(KC - 1):])


def test_state_continuation_and_step():
    x, w, s = make(12)
    y, new = dynamic_conv_ref(x, w, s)
    y1, st = dynamic_conv_ref(x[:, :5], w[:, :5], s)  # prefill a prefix ...
    y2, st = dynamic_conv_ref(x[:, 5:7], w[:, 5:7], st)  # ... continue in pieces ...
    st = st.clone()
    ys = [dynamic_conv_step(x[:, t], w[:, t], st) for t in range(7, 12)]  # ... then decode
    torch.testing.assert_close(torch.cat([y1, y2, torch.stack(ys, 1)], 1), y)
    torch.testing.assert_close(st, new)


def test_public_entry_uses_reference_on_cpu():
    x, w, s = make(6)
    for a, b in zip(dynamic_conv(x, w, s), dynamic_conv_ref(x, w, s)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("T,with_state,dtype", [(3, True, torch.float32), (70, True, torch.float32),
                                                (70, False, torch.float32), (9, True, torch.bfloat16)])
def test_triton_interpreter_matches_ref(monkeypatch, T, with_state, dtype):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from hylo.ops.dynamic_conv import dynamic_conv_triton

    x, w, s = (t.to(dtype) for t in make(T, seed=T))
    s = s if with_state else None
    g = torch.Generator().manual_seed(9)
    dy, dn = torch.randn(2, T, C, generator=g).to(dtype), torch.randn(2, C, KC - 1, generator=g).to(dtype)

    def run(fn):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, s)]
        y, new = fn(*leaves)
        ((y.float() * dy.float()).sum() + (new.float() * dn.float()).sum()).backward()
        return [y, new] + [None if t is None else t.grad for t in leaves]

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, a, b in zip("y state dx dw dstate".split(), run(dynamic_conv_triton), run(dynamic_conv_ref)):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=name)
