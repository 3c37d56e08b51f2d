"""attn / swa: parallel forward ≡ steps, chunked prefill, ring buffer, fast-path cores ≡ reference."""

import contextlib

import pytest
import torch

import hylo.layers.attention as A
from hylo import HyloConfig
from hylo.layers.attention import Attention, SlidingWindowAttention


def make(window=None, qk_norm=False, bias=False, seed=0):
    torch.manual_seed(seed)
    cfg = HyloConfig(hidden_size=32, attn_num_heads=4, attn_num_kv_heads=2, layers="a", swa_window=window or 8,
                     attn_qk_norm=qk_norm, attn_qkv_bias=bias)
    cls = SlidingWindowAttention if window else Attention
    layer = cls(cfg, 0)
    for p in layer.parameters():  # random non-trivial weights (norm weights and biases too)
        torch.nn.init.normal_(p, 0.0, 0.3)
    return layer


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("qk_norm,bias", [(False, False), (True, True)])
def test_steps_match_parallel(window, qk_norm, bias):
    layer = make(window, qk_norm, bias)
    x = torch.randn(2, 13, 32)
    full = layer(x)
    st = layer.init_state(2, 16)
    outs = [layer.step(x[:, t:t + 1], st, torch.full((2,), t)) for t in range(13)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    # the state the steps leave equals the state a parallel prefill leaves
    st2 = layer.init_state(2, 16)
    layer(x, st2)
    for k in st:
        torch.testing.assert_close(st[k], st2[k])


@pytest.mark.parametrize("window", [None, 4])
def test_prefill_then_steps_and_chunked_prefill(window):
    layer = make(window, seed=1)
    x = torch.randn(2, 17, 32)
    full = layer(x)
    st = layer.init_state(2, 17)
    parts = [layer(x[:, :3], st, 0), layer(x[:, 3:10], st, 3)]
    parts += [layer.step(x[:, t:t + 1], st, torch.full((2,), t)) for t in range(10, 17)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_swa_state_is_window_sized_and_attn_grows():
    swa, attn = make(6), make(None)
    assert swa.init_state(1, 1000)["k"].shape[2] == 6
    assert attn.init_state(1, 1000)["k"].shape[2] == 1000
    assert swa.state_bytes(1000) == swa.state_bytes(10_000) < attn.state_bytes(1000)


def test_swa_matches_explicit_window():
    """Each output only depends on the last `window` inputs."""
    layer = make(3)
    x = torch.randn(1, 10, 32)
    y = layer(x)
    x2 = x.clone()
    x2[:, :6] = torch.randn(1, 6, 32)  # positions 0..5 are outside the window of position 8 and 9
    torch.testing.assert_close(layer(x2)[:, 8:], y[:, 8:])
    assert not torch.allclose(layer(x2)[:, 7], y[:, 7])


def test_rows_at_different_positions():
    """step() with per-row positions equals running each row alone."""
    layer = make(None, seed=3)
    x = torch.randn(2, 9, 32)
    st = layer.init_state(2, 12)
    layer(x[:, :4], st, 0)
    # advance row 1 by two more tokens (row 0 idles on a dummy write it later overwrites)
    y_ref = layer(torch.cat([x[1:, :4], x[1:, 4:7]], 1))
    for t in (4, 5):
        layer.step(x[:, t:t + 1], st, torch.tensor([4, t]))
    y = layer.step(x[:, 6:7], st, torch.tensor([4, 6]))
    torch.testing.assert_close(y[1:], y_ref[:, 6:7], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[:1], layer(torch.cat([x[:1, :4], x[:1, 6:7]], 1))[:, 4:5], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_gradients_match_float64(window):
    layer = make(window, qk_norm=True, seed=4)
    x = torch.randn(2, 11, 32, requires_grad=True)
    layer(x).square().sum().backward()
    g32 = [x.grad] + [p.grad for p in layer.parameters()]
    layer64 = make(window, qk_norm=True, seed=4).double()
    x64 = x.detach().double().requires_grad_()
    layer64(x64).square().sum().backward()
    g64 = [x64.grad] + [p.grad for p in layer64.parameters()]
    for a, b in zip(g32, g64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window,tq,tk", [(None, 9, 9), (None, 1, 9), (4, 9, 9), (4, 5, 12), (3, 1, 7), (None, 5, 12),
                                            (16, 130, 130)])
def test_fast_attention_core_matches_reference(monkeypatch, window, tq, tk):
    """The SDPA / flex-attention branches (flex: windowed, Tq = Tk >= FLEX_MIN_LEN) compute the reference
    function (run eagerly on the CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, tq, 16), torch.randn(2, 2, tk, 16), torch.randn(2, 2, tk, 16)
    ref = A.attention(q, k, v, window, tk - tq)
    monkeypatch.setattr(A, "use_fast", lambda *a, **kw: True)
    monkeypatch.setattr(A, "_compiled_flex", lambda: flex_attention)
    torch.testing.assert_close(A.attention(q, k, v, window, tk - tq), ref, atol=1e-5, rtol=1e-5)


def test_flex_branch_pads_to_power_of_two(monkeypatch):
    """Windowed self-attention of different lengths reaches flex attention at one padded length (one compile),
    and the padding changes nothing: every length equals the reference."""
    from torch.nn.attention.flex_attention import flex_attention

    seen = []

    def spy(q, k, v, **kw):
        seen.append(q.shape[2])
        return flex_attention(q, k, v, **kw)

    monkeypatch.setattr(A, "use_fast", lambda *a, **kw: True)
    monkeypatch.setattr(A, "_compiled_flex", lambda: spy)
    torch.manual_seed(0)
    for T in (130, 200, 256):
        q, k, v = torch.randn(1, 4, T, 16), torch.randn(1, 2, T, 16), torch.randn(1, 2, T, 16)
        pos = torch.arange(T)
        ref = A.attention_ref(q, k, v, A.window_mask(pos, pos, 16))
        torch.testing.assert_close(A.attention(q, k, v, 16, 0), ref, atol=1e-5, rtol=1e-5)
    assert seen == [256, 256, 256]


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 1)])
def test_decode_attention_matches_reference(heads, kv_heads):
    """The fast decode kernel (grouped matmuls, no K/V expansion) equals the reference with GQA and a ragged mask."""
    torch.manual_seed(0)
    B, L, Dh = 3, 10, 8
    q, k, v = torch.randn(B, heads, 1, Dh), torch.randn(B, kv_heads, L, Dh), torch.randn(B, kv_heads, L, Dh)
    pos = torch.tensor([0, 4, 9])
    mask = (torch.arange(L)[None, :] <= pos[:, None])[:, None, None, :]
    torch.testing.assert_close(A.decode_attention(q, k, v, mask), A.attention_ref(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_sdpa_switch_validates_and_is_scoped():
    """HYLO_SDPA: unknown names are refused; a scope restores the outer value, also when left by an exception."""
    from hylo.ops import backend

    assert backend.get_sdpa() == "auto"
    with pytest.raises(ValueError, match="SDPA backend 'fa3' is invalid"):
        backend.set_sdpa("fa3")
    with backend.sdpa("math"):
        assert backend.get_sdpa() == "math"
        with pytest.raises(ValueError):
            with backend.sdpa("cudnn"):
                raise ValueError("leaves the scope")
        assert backend.get_sdpa() == "math"
    assert backend.get_sdpa() == "auto"


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)])
def test_causal_sdpa_math_matches_auto(monkeypatch, heads, kv_heads):
    """The HYLO_SDPA-selected path of causal self-attention (here the math kernel, the one the CPU runs) equals the
    plain ``auto`` call and the reference, with GQA; and runs the call under ``sdpa_kernel`` (so a forced kernel
    is really forced), with K/V passed grouped."""
    from hylo.ops import backend

    torch.manual_seed(0)
    q, k, v = torch.randn(2, heads, 9, 16), torch.randn(2, kv_heads, 9, 16), torch.randn(2, kv_heads, 9, 16)
    auto = A.causal_sdpa(q, k, v)
    ref = A.attention_ref(q, k, v, A.window_mask(torch.arange(9), torch.arange(9), None))
    torch.testing.assert_close(auto, ref, atol=1e-5, rtol=1e-5)
    seen, kernel, sdpa = [], A.sdpa_kernel, A.F.scaled_dot_product_attention
    monkeypatch.setattr(A, "sdpa_kernel", lambda backends: seen.append(backends) or kernel(backends))
    monkeypatch.setattr(A.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append(k.shape[1]) or sdpa(q, k, v, **kw))
    with backend.sdpa("math"):
        torch.testing.assert_close(A.causal_sdpa(q, k, v), auto, atol=1e-6, rtol=1e-6)
    assert seen == [A.SDPBackend.MATH, kv_heads]


def test_causal_sdpa_expands_kv_for_kernels_without_gqa(monkeypatch):
    """cuDNN / efficient get K/V expanded to the query heads (query head i reads KV head i // group, as
    ``enable_gqa`` does); flash gets them grouped. The kernels are CUDA-only, so the call is intercepted."""
    from hylo.ops import backend

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    got = {}
    monkeypatch.setattr(A, "sdpa_kernel", lambda b: contextlib.nullcontext())
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", lambda q, k, v, **kw: (k, v))
    for name in ("cudnn", "efficient", "flash"):
        with backend.sdpa(name):
            got[name] = A.causal_sdpa(q, k, v)
    for name in ("cudnn", "efficient"):
        assert torch.equal(got[name][0], k[:, [0, 0, 1, 1]]) and torch.equal(got[name][1], v[:, [0, 0, 1, 1]])
    assert got["flash"][0] is k and got["flash"][1] is v


def test_causal_sdpa_compiles_with_a_forced_kernel():
    """``sdpa_kernel`` inside the compiled graph traces (no graph break) and the switch is read at call time:
    changing it after the first compile is honoured (dynamo recompiles on its guard; cuDNN, which the CPU lacks,
    then fails instead of running the kernel compiled first)."""
    from hylo.ops import backend

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    f = torch.compile(A.causal_sdpa, backend="aot_eager", fullgraph=True)
    auto = f(q, k, v)
    with backend.sdpa("math"):
        torch.testing.assert_close(f(q, k, v), auto, atol=1e-5, rtol=1e-5)
    with backend.sdpa("cudnn"), pytest.raises(RuntimeError):
        f(q, k, v)
