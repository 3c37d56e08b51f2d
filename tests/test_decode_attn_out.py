"""Attention with its output projection in one kernel (hylo.ops.decode_attn_out, HYLO_STEP_ATTN_OUT): against
the chain's reference computation under Triton's interpreter, inside the kernel step against the runner's usual
step, and compiled for sm_90 with PDL on the CPU."""

import pytest
import torch

from hylo.engine import DecodeRunner, kernel_step
from hylo.ops import decode_attention as dattn
from hylo.ops import decode_attn_out as dao
from hylo.ops import gemv as G
from hylo.ops.rope import inv_freq

triton = pytest.importorskip("triton")


def _case(dtype, qk_norm, ring, bias, B=2, H=4, Hkv=2, Dh=16, L=40, N=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, (H + 2 * Hkv) * Dh, generator=g).to(dtype)
    qn, kn = ((1 + 0.3 * torch.randn(2, Dh, generator=g)).to(dtype) if qk_norm else (None, None))
    kc = torch.randn(B, Hkv, L, Dh, generator=g).to(dtype)
    vc = torch.randn(B, Hkv, L, Dh, generator=g).to(dtype)
    pos = torch.tensor([3, L + 5 if ring else 37])  # row 1: three blocks of 16 slots (wrapped with a ring)
    w = (torch.randn(N, H * Dh, generator=g) / 8).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    r = torch.randn(B, N, generator=g).to(dtype)
    return qkv, qn, kn, inv_freq(Dh, 10000.0), kc, vc, pos, w, b, r


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm,ring,bias,pre_kv", [(True, False, False, False), (False, True, True, False),
                                                      (True, True, False, False), (True, False, True, True),
                                                      (True, True, False, True)])
def test_attn_out_matches_reference(interp, monkeypatch, dtype, qk_norm, ring, bias, pre_kv):
    """The float32 sum and both caches equal the reference's (q/k/v preparation, attention, output projection)
    over three output tiles (the last one partial: 20 outputs in tiles of 8) and, for row 1, three blocks of slots;
    a second call adds the same again (the sum is left for the caller to zero). ``pre_kv``: the first block loaded
    before the PDL wait (HYLO_ATTN_OUT_PREKV), the new slot still patched in."""
    monkeypatch.setattr(dao, "PRE_KV", pre_kv)
    qkv, qn, kn, f, kc, vc, pos, w, b, _ = _case(dtype, qk_norm, ring, bias)
    k_ref, v_ref = kc.clone(), vc.clone()
    ref = dao.decode_attn_out_ref(qkv, 4, qn, kn, 1e-6, f, k_ref, v_ref, pos, ring, w, b)
    assert dao.tile_rows(16) == 8
    acc = torch.zeros(2, 20)
    k2, v2 = kc.clone(), vc.clone()
    assert dao.decode_attn_out(qkv, 4, qn, kn, 1e-6, f, k2, v2, pos, ring, w, b, acc) is acc
    # float32: summation order only; bf16: the interpreter truncates float32 -> bf16 where torch rounds
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=6e-2)
    torch.testing.assert_close(acc, ref, **tol)
    torch.testing.assert_close(k2.float(), k_ref.float(), **tol)
    torch.testing.assert_close(v2, v_ref)  # v is copied, not rounded
    changed = (k2 != kc).any(-1).any(1)  # [B, L]: one slot per row written
    slots = pos % kc.shape[2] if ring else pos
    assert changed.sum() == 2 and changed[torch.arange(2), slots].all()
    dao.decode_attn_out(qkv, 4, qn, kn, 1e-6, f, k2, v2, pos, ring, w, b, acc)
    torch.testing.assert_close(acc, 2 * ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L,min_split", [(40, 64), (256, 64)])  # one split (o written directly); 4 splits
def test_split_attention_then_combine_and_projection(interp, monkeypatch, dtype, L, min_split):
    """decode_attn_split_out (split attention, then one kernel merging each head's partials into its share of the
    output projection) adds the reference's projection into the sum, and writes the caches as the reference."""
    monkeypatch.setattr(dattn, "MIN_SPLIT", min_split)
    qkv, qn, kn, f, kc, vc, pos, w, b, _ = _case(dtype, True, False, True, L=L)
    k_ref, v_ref = kc.clone(), vc.clone()
    ref = dao.decode_attn_out_ref(qkv, 4, qn, kn, 1e-6, f, k_ref, v_ref, pos, False, w, b)
    assert dattn.num_splits(L, 4) == (1 if L == 40 else 4)
    acc = torch.zeros(2, 20)
    assert dao.decode_attn_split_out(qkv, 4, qn, kn, 1e-6, f, kc, vc, pos, False, w, b, acc) is acc
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=6e-2)
    torch.testing.assert_close(acc, ref, **tol)
    torch.testing.assert_close(kc.float(), k_ref.float(), **tol)
    torch.testing.assert_close(vc, v_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_adds_the_pending_sum_first(interp, dtype):
    """The preloading GEMV with ``acc``: its input is ``x + acc`` rounded as a GEMV's residual add, written to
    ``h_out``, then normed and multiplied as usual."""
    g = torch.Generator().manual_seed(3)
    x, acc = torch.randn(2, 24, generator=g).to(dtype), torch.randn(2, 24, generator=g)
    w, nw = torch.randn(40, 24, generator=g).to(dtype), (1 + 0.1 * torch.randn(24, generator=g)).to(dtype)
    h_out = torch.empty_like(x)
    y = G.gemv_direct(x, w, None, nw, 1e-6, acc=acc, h_out=h_out)
    h = (acc.to(dtype).float() + x.float()).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=6e-2)
    torch.testing.assert_close(h_out, h, **tol)
    torch.testing.assert_close(y.float(), G.gemv_ref(h, w, None, nw, 1e-6).float(), **tol)
    with pytest.raises(ValueError, match="acc"):
        G.gemv_direct(x, w, None, nw, 1e-6, acc=acc[:1], h_out=h_out)


@pytest.mark.parametrize("K,swiglu,bias", [(48, True, True), (40, False, False), (64, False, True)])
def test_gemv_into_a_float32_sum(interp, K, swiglu, bias):
    """``out_acc``: the products (SwiGLU of the input, bias) are added into a float32 sum, K split in chunks of
    its largest power-of-two divisor (48: 3 of 16; 40: 5 of 8 is too small and refused; 64: one)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2 * K if swiglu else K, generator=g)
    w, b = torch.randn(20, K, generator=g), (torch.randn(20, generator=g) if bias else None)
    start = torch.randn(2, 20, generator=g)
    out = start.clone()
    if G.split_chunk(K) < 16:
        with pytest.raises(ValueError, match="chunks"):
            G.gemv_direct(x, w, b, swiglu=swiglu, out_acc=out)
        return
    assert G.gemv_direct(x, w, b, swiglu=swiglu, out_acc=out) is out
    torch.testing.assert_close(out, start + G.gemv_ref(x, w, b, swiglu=swiglu), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out_acc"):
        G.gemv_direct(x, w, b, swiglu=swiglu, out_acc=out, residual=start)


def test_attn_out_checks_its_inputs(interp):
    qkv, qn, kn, f, kc, vc, pos, w, b, _ = _case(torch.float32, True, False, False)
    acc = torch.zeros(2, 20)
    with pytest.raises(ValueError, match="w_o"):
        dao.decode_attn_out(qkv, 4, qn, kn, 1e-6, f, kc, vc, pos, False, w[:, :32], b, acc)
    with pytest.raises(ValueError, match="acc"):
        dao.decode_attn_out(qkv, 4, qn, kn, 1e-6, f, kc, vc, pos, False, w, b, acc[:, :8])
    with pytest.raises(ValueError, match="both"):
        dao.decode_attn_out(qkv, 4, qn, None, 1e-6, f, kc, vc, pos, False, w, b, acc)


@pytest.mark.parametrize("layers,attn_out,ffn_split,glu", [
    ("a f swa f", "fused", "off", "down"), ("a swa f a", "fused", "on", "down"), ("a f f swa f", "off", "on", "down"),
    ("a f swa f", "split", "on", "down"), ("a swa f a", "split", "off", "down"), ("a f swa f", "fused", "off", "up"),
    ("a f f swa f", "off", "on", "up")])
def test_kernel_step_with_sums_same_logits_as_the_runner_step(interp, monkeypatch, layers, attn_out, ffn_split, glu):
    """The kernel step with blocks that leave float32 sums (HYLO_STEP_ATTN_OUT, HYLO_STEP_FFN_SPLIT; attention, a
    wrapping sliding window, FFN, meta tokens; rows at different positions): 7 steps give the usual step's logits
    and caches (float32). In ``a swa f a`` the sliding window's q/k/v GEMV adds attention's sum, and the last block
    (attention) is the chain's; in ``a f f swa f`` an FFN adds the FFN's sum before it. ``split``: split attention
    (2 splits of 8 slots past position 16), its partials merged in the projection's kernel; ``fused``: one kernel.
    ``glu=up`` (HYLO_STEP_GLU): SwiGLU in the gate/up GEMV, after a sum (``fused``) and into one (FFN split)."""
    from test_kernel_step import _attn_ffn_model

    monkeypatch.setattr(dattn, "MIN_SPLIT", 8)
    model = _attn_ffn_model(layers)
    ids = torch.tensor([[3, 4], [5, 6], [7, 1], [2, 2], [9, 8], [1, 0], [4, 4]])
    with G.gemv_mode("on"), dattn.decode_attn_mode("on"):
        with kernel_step.kernel_step_mode("off"):
            ref_runner = DecodeRunner(model, 2, 40)
        ref_runner.set_positions([0, 20])
        ref = [ref_runner.step(t) for t in ids]
        with kernel_step.kernel_step_mode("on"), kernel_step.step_attn_out_mode(attn_out), \
                kernel_step.step_ffn_split_mode(ffn_split), kernel_step.step_glu_mode(glu):
            runner = DecodeRunner(model, 2, 40)
        assert runner.glu_up == (glu == "up")
        ws = runner.sums_ws
        assert runner.kernel_step and ws["attn"] == (None if attn_out == "off" else attn_out)
        assert ws["ffn"] == (ffn_split == "on")
        runner.set_positions([0, 20])
        got = [runner.step(t) for t in ids]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for st, st_ref in zip(runner.cache.states, ref_runner.cache.states):
        for name in st:
            torch.testing.assert_close(st[name], st_ref[name], rtol=1e-5, atol=1e-5)
    with G.gemv_mode("on"), kernel_step.kernel_step_mode("on"):
        default = DecodeRunner(model, 2, 40)  # fused attention by default, no FFN split
    assert default.sums_ws["attn"] == "fused" and not default.sums_ws["ffn"]
    assert default.fused_limit == kernel_step.FUSED_MAX_POS


def test_attn_out_compiles_for_sm90_with_pdl():
    """The PDL wait and signal and the float32 atomic adds are in the sm_90 code."""
    pytest.importorskip("triton.backends.nvidia")
    from test_kernel_step import _ptx

    sig = {"qkv": "*bf16", "k": "*bf16", "v": "*bf16", "pos": "*i64", "qw": "*bf16", "kw": "*bf16",
           "inv_freq": "*fp32", "eps": "fp32", "qk_scale": "fp32", "L": "i32", "m_part": "*fp32", "l_part": "*fp32",
           "acc_part": "*fp32", "o_in": "*bf16", "w": "*bf16", "bias": "*bf16", "acc": "*fp32", "N": "i32"}
    for fused in (True, False):
        ce = dict(H=16, HKV=8, D=128, BLOCK=64, BN=128, NSPLIT=1 if fused else 5, NSP=1 if fused else 8,
                  FUSED=fused, HAS_BIAS=True, QK_NORM=True, RING=False, PRE_KV=fused, PDL=True, INTERP=False)
        ptx = _ptx(dao._jit(False), sig, ce)
        assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
        assert "red.global.gpu.relaxed.add.f32" in ptx or "atom.global.gpu.relaxed.add.f32" in ptx


def test_runner_leaves_the_fused_kernel_past_its_limit(interp, monkeypatch):
    """HYLO_STEP_ATTN_OUT=fused: the runner computes steps below FUSED_MAX_POS (absolute positions, meta tokens
    included) with the fused kernel and the later ones with the chain's attention; the logits are the usual
    step's throughout (float32), and so are the engine's greedy tokens across the limit."""
    from test_kernel_step import _attn_ffn_model

    from hylo.engine import Engine, SamplingParams

    monkeypatch.setattr(dattn, "MIN_SPLIT", 8)
    monkeypatch.setattr(kernel_step, "FUSED_MAX_POS", 7)
    calls = []
    fused = dao.decode_attn_out
    monkeypatch.setattr(dao, "decode_attn_out", lambda *a, **k: calls.append(1) or fused(*a, **k))
    model = _attn_ffn_model("a f a f")  # meta tokens: 2
    ids = torch.tensor([[3], [5], [7], [2], [9], [1], [4], [6]])
    with G.gemv_mode("on"), dattn.decode_attn_mode("on"):
        with kernel_step.kernel_step_mode("off"):
            ref_runner = DecodeRunner(model, 1, 40)
        ref = [ref_runner.step(t) for t in ids]
        with kernel_step.kernel_step_mode("on"), kernel_step.step_attn_out_mode("fused"), \
                kernel_step.step_ffn_split_mode("on"):
            runner = DecodeRunner(model, 1, 40)
            assert runner.fused_limit == 7
            got = []
            for t in ids:  # absolute positions 2..9: the first five below the limit
                got.append(runner.step(t))
            assert len(calls) == 5 * 2  # two attention layers
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            prompt = [3, 5, 7, 2]  # decoding from absolute position 6: the first step fused, the next 4 not
            calls.clear()
            want = Engine(model, max_batch_size=1, max_seq_len=24).generate([prompt],
                                                                         SamplingParams(max_new_tokens=6))
            assert len(calls) == 2
            with kernel_step.kernel_step_mode("off"):
                ref_out = Engine(model, max_batch_size=1, max_seq_len=24).generate([prompt],
                                                                                  SamplingParams(max_new_tokens=6))
        assert want[0].token_ids == ref_out[0].token_ids
