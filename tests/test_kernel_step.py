"""The kernel decode step (HYLO_KERNEL_STEP=on): the q/k/v kernel against the model's own code, the whole step
against the runner's usual step (Triton's interpreter), and the PDL variants compiled for sm_90 on the CPU."""

import pytest
import torch

from hylo import HybridLM
from hylo.config import HyloConfig
from hylo.engine import DecodeRunner, kernel_step
from hylo.layers.attention import Attention
from hylo.ops import decode_attention as dattn
from hylo.ops import gemv as G
from hylo.ops import pdl
from hylo.ops.decode_qkv import decode_qkv_ref
from hylo.ops.rope import inv_freq

triton = pytest.importorskip("triton")


def _qkv_case(dtype, qk_norm, ring, cap, B=2, H=4, Hkv=2, Dh=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, (H + 2 * Hkv) * Dh, generator=g).to(dtype)
    norms = (1 + 0.3 * torch.randn(2, Dh, generator=g)).to(dtype) if qk_norm else (None, None)
    kc = torch.randn(B, Hkv, cap, Dh, generator=g).to(dtype)
    vc = torch.randn(B, Hkv, cap, Dh, generator=g).to(dtype)
    # rows at different positions; with a ring buffer one row has wrapped (slot pos % cap)
    pos = torch.tensor([3, cap + 5] if ring else [3, cap - 70 if cap > 70 else cap - 2])[:B]
    return qkv, norms[0], norms[1], inv_freq(Dh, 10000.0), kc, vc, pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("cap,early", [(8, "on"), (256, "on"), (256, "off")])  # one split; 4 splits
def test_fused_qkv_attention_matches_reference(interp, monkeypatch, dtype, qk_norm, ring, cap, early):
    """decode_qkv_attention (the split kernel with the q/k/v preparation in its prologue) against the reference
    preparation followed by the reference attention: output and both caches. ``early``: each split's first K/V
    block loaded before the new slot is written, which is then patched in (HYLO_ATTN_EARLY_KV)."""
    monkeypatch.setattr(dattn, "MIN_SPLIT", 64)  # 4 splits of 64 slots keep the interpreter quick
    monkeypatch.setattr(dattn._EARLY, "value", early)
    qkv, qn, kn, f, kc, vc, pos = _qkv_case(dtype, qk_norm, ring, cap)
    assert dattn.num_splits(cap, 4) == (1 if cap == 8 else 4)
    kc2, vc2 = kc.clone(), vc.clone()
    q_ref = decode_qkv_ref(qkv, 4, 2, qn, kn, 1e-6, f, kc, vc, pos, ring)
    o_ref = dattn.decode_attention_ref(q_ref, kc, vc, pos)
    o = dattn.decode_qkv_attention(qkv, 4, qn, kn, 1e-6, f, kc2, vc2, pos, ring)
    # float32: exact up to cos/sin/sqrt implementations; bf16: the interpreter truncates float32 -> bf16 where
    # torch rounds to nearest (a bf16 ulp is 2^-8 relative), so a wider tolerance
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(kc2.float(), kc.float(), **tol)
    torch.testing.assert_close(vc2, vc)  # v is copied, not rounded
    torch.testing.assert_close(o.float(), o_ref.float(), **tol)
    _, _, _, _, kc0, _, _ = _qkv_case(dtype, qk_norm, ring, cap)
    slots = pos % cap if ring else pos
    changed = (kc2 != kc0).any(-1).any(1)  # [B, cap]: the slots written
    assert changed.sum() == 2 and changed[torch.arange(2), slots].all()


@pytest.mark.parametrize("ring", [False, True])
def test_fused_qkv_attention_with_larger_blocks(interp, monkeypatch, ring):
    """BLOCK_SLOTS = 32 (the block a GPU timing may pick; the interpreter's own is 16): 4 splits of 64 slots in 2
    blocks each, the first loaded early and patched with the new slot; and one split over the whole cache (no
    combine kernel). Output and caches equal the reference's."""
    monkeypatch.setattr(dattn, "BLOCK_SLOTS", 32)
    assert dattn._launch_config(2, 16)[0] == 32
    for min_split in (64, 512):
        monkeypatch.setattr(dattn, "MIN_SPLIT", min_split)
        qkv, qn, kn, f, kc, vc, pos = _qkv_case(torch.float32, True, ring, 256)
        kc2, vc2 = kc.clone(), vc.clone()
        o_ref = dattn.decode_attention_ref(decode_qkv_ref(qkv, 4, 2, qn, kn, 1e-6, f, kc, vc, pos, ring), kc, vc, pos)
        o = dattn.decode_qkv_attention(qkv, 4, qn, kn, 1e-6, f, kc2, vc2, pos, ring)
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kc2, kc, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(dattn, "BLOCK_SLOTS", 48)
    with pytest.raises(ValueError, match="power of two"):
        dattn._launch_config(2, 16)


def test_qkv_reference_is_the_layers_own_step():
    """decode_qkv_ref reproduces Attention._heads and step_heads' cache write (bf16, qk-norm, GQA)."""
    torch.manual_seed(0)
    cfg = HyloConfig(vocab_size=64, hidden_size=32, layers=["attn"], attn_num_heads=4, attn_num_kv_heads=2,
                     attn_head_dim=8, attn_qk_norm=True)
    lay = Attention(cfg, 0).to(torch.bfloat16)
    with torch.no_grad():
        lay.q_norm.weight.normal_(1, 0.3)
        lay.k_norm.weight.normal_(1, 0.3)
        qkv = lay.qkv_proj(torch.randn(2, 1, 32, dtype=torch.bfloat16))
        pos = torch.tensor([2, 5])
        q, k, v = lay._heads(qkv, pos[:, None])
        st = lay.init_state(2, 8, dtype=torch.bfloat16)
        q2 = decode_qkv_ref(qkv[:, 0], 4, 2, lay.q_norm.weight, lay.k_norm.weight, lay.q_norm.eps,
                            inv_freq(8, lay.rope_theta), st["k"], st["v"], pos, ring=False)
    assert torch.equal(q2, q)
    assert torch.equal(st["k"][torch.arange(2), :, pos], k[:, :, 0])
    assert torch.equal(st["v"][torch.arange(2), :, pos], v[:, :, 0])


def _attn_ffn_model(layers="a f swa f", meta=2, seed=0):
    torch.manual_seed(seed)
    cfg = HyloConfig(vocab_size=96, hidden_size=32, layers=layers, attn_num_heads=4, attn_num_kv_heads=2,
                     attn_head_dim=16, attn_qk_norm=True, swa_window=4, ffn_intermediate_size=48,
                     num_meta_tokens=meta)
    model = HybridLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("fuse", ["plain", "norm+residual", "swiglu"])
@pytest.mark.parametrize("rows", [2, 3])
def test_persistent_grid_gemv_matches_reference(interp, fuse, rows):
    """A persistent grid (at most 3 programs under the interpreter, rounded down to a multiple of the rows) strides
    over rows x 10 tiles of 32 outputs (the last one partial) and gives the reference's result."""
    g = torch.Generator().manual_seed(0)
    K, N = 48, 300
    x = torch.randn(rows, 2 * K if fuse == "swiglu" else K, generator=g)
    w, bias = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    kw = {"norm_weight": 1 + 0.1 * torch.randn(K, generator=g), "eps": 1e-6,
          "residual": torch.randn(rows, N, generator=g)} if fuse == "norm+residual" else \
        {"swiglu": True} if fuse == "swiglu" else {}
    assert G.max_programs(x.device) == 3 < 2 * -(-N // G._INTERP_CONFIG["BN"])
    got = G.gemv_direct(x, w, bias, persistent=True, **kw)
    torch.testing.assert_close(got, G.gemv_ref(x, w, bias, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pdl_mode,preload", [("on", "off"), ("persistent", "off"), ("on", "on")])
def test_kernel_step_same_logits_as_the_runner_step(interp, monkeypatch, pdl_mode, preload):
    """A model of attention, sliding-window attention (window 4, so the ring buffer wraps) and FFN blocks, with
    meta tokens: 7 steps of the kernel step give the logits of the usual step (GEMV and split-KV attention on, so
    both compute the same algorithm), float32, rows at different positions, the attention split (16 slots: 2
    splits of 8); also on persistent GEMV grids and with the preloading GEMVs."""
    monkeypatch.setattr(dattn, "MIN_SPLIT", 8)
    model = _attn_ffn_model()
    ids = torch.tensor([[3, 4], [5, 6], [7, 1], [2, 2], [9, 8], [1, 0], [4, 4]])
    with G.gemv_mode("on"), dattn.decode_attn_mode("on"), pdl.pdl_mode(pdl_mode), G.gemv_preload_mode(preload):
        with kernel_step.kernel_step_mode("off"):
            ref_runner = DecodeRunner(model, 2, 16)
        ref_runner.set_positions([0, 3])
        ref = [ref_runner.step(t) for t in ids]
        with kernel_step.kernel_step_mode("on"):
            runner = DecodeRunner(model, 2, 16)
            assert runner.kernel_step and not ref_runner.kernel_step and not runner.pdl  # no PDL on the CPU
            runner.set_positions([0, 3])
            got = [runner.step(t) for t in ids]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert runner.positions() == [7, 10]
    for st, st_ref in zip(runner.cache.states, ref_runner.cache.states):
        for name in st:
            torch.testing.assert_close(st[name], st_ref[name], rtol=1e-5, atol=1e-5)


def test_kernel_step_greedy_tokens_bf16(interp):
    """bf16: greedy decoding from the kernel step follows the usual step's tokens (fed its own argmax each step)."""
    model = _attn_ffn_model(meta=0, seed=1).to(torch.bfloat16)
    with G.gemv_mode("on"), dattn.decode_attn_mode("on"):
        outs = []
        for mode in ("off", "on"):
            with kernel_step.kernel_step_mode(mode):
                r = DecodeRunner(model, 1, 16)
                t, toks, logits = torch.tensor([5]), [], []
                for _ in range(6):
                    lg = r.step(t)
                    logits.append(lg.float())
                    t = lg.argmax(-1)
                    toks.append(int(t))
                outs.append((toks, logits))
    assert outs[0][0] == outs[1][0]
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def test_applicable_says_why_not():
    model = _attn_ffn_model(layers="a f m2 f")
    head = model.head_weight()
    assert "layer 2 is 'mamba2'" in kernel_step.applicable(model, 1, head)
    model = _attn_ffn_model()
    assert kernel_step.applicable(model, 1, model.head_weight()) is None
    assert "batch 5" in kernel_step.applicable(model, 5, model.head_weight())
    with kernel_step.kernel_step_mode("on"):
        assert not DecodeRunner(model, 5, 8).kernel_step  # falls back to the usual step
        assert not DecodeRunner(model, 1, 8).kernel_step  # no GEMV on the CPU without the interpreter


def _ptx(fn, signature: dict, constexprs: dict) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"launch_pdl": True}).asm["ptx"]


def test_pdl_variants_compile_for_sm90():
    """The PDL branches are never run on the CPU: compile them for an H100 (Triton's own compiler and ptxas, no
    GPU needed) and check the instructions are there -- and absent without PDL."""
    pytest.importorskip("triton.backends.nvidia")
    gemv_sig = {"x": "*bf16", "w": "*bf16", "b": "*bf16", "y": "*bf16", "nw": "*bf16", "r": "*bf16", "best": "*i64",
                "M": "i32",
                "N": "i32", "eps": "fp32", "pf_rows": "i32", "grid_cap": "i32"}
    for on in (True, False):
        ptx = _ptx(triton.jit(G._gemv_kernel), gemv_sig,
                   dict(K=3072, XK=6144, HAS_BIAS=False, NORM=False, SWIGLU=True, RESIDUAL=True, ARGMAX=False, PDL=on,
                        INTERP=False, LINE=64, NL=64, BN=8, BK=256))
        assert ("griddepcontrol.wait" in ptx) == on and ("griddepcontrol.launch_dependents" in ptx) == on
        assert ("prefetch.global.L2" in ptx) == on
    split = triton.jit(dattn._split_kernel)
    ptx = _ptx(split, {"q": "*bf16", "k": "*bf16", "v": "*bf16", "pos": "*i64", "o": "*bf16", "m_part": "*fp32",
                       "l_part": "*fp32", "acc_part": "*fp32", "qk_scale": "fp32", "L": "i32", "qkv": "*bf16",
                       "qw": "*bf16", "kw": "*bf16", "inv_freq": "*fp32", "eps": "fp32"},
               dict(HKV=8, G=2, GP=2, D=128, BLOCK=16, NSPLIT=40, INTERP=False, PDL=True, QKV=True, QK_NORM=True,
                    RING=False, EARLY=False))
    assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
    assert "bar.sync" in ptx  # the prologue's new slot is stored before the program's threads read the cache


def test_preload_gemv_compiles_for_sm90():
    """The preloading GEMV loads its weights before the PDL wait (never run on the CPU: compiled for an H100); with
    ``GLU`` twice as many rows per program."""
    pytest.importorskip("triton.backends.nvidia")
    sig = {"x": "*bf16", "w": "*bf16", "b": "*bf16", "y": "*bf16", "nw": "*bf16", "r": "*bf16", "acc": "*fp32",
           "h_out": "*bf16", "M": "i32", "N": "i32", "eps": "fp32"}
    before = {}
    for glu in (False, True):  # GLU: the gate and the up rows, both before the wait
        ptx = _ptx(triton.jit(G._gemv_pre_kernel), sig, dict(K=1024, KP=1024, XK=1024, HAS_BIAS=False, NORM=True,
                                                            SWIGLU=False, RESIDUAL=False, ACC=True, S=1,
                                                            OUT_ACC=False, GLU=glu, PDL=True, INTERP=False, BN=8))
        lines = ptx.splitlines()
        wait = next(i for i, ln in enumerate(lines) if "griddepcontrol.wait" in ln)
        before[glu] = sum("ld.global" in ln for ln in lines[:wait])  # the weights, before the wait
    assert before[True] > before[False] > 0, before


def test_early_kv_loads_before_the_wait():
    """HYLO_ATTN_EARLY_KV: the split kernel (with the q/k/v prologue) issues the first block's K and V loads before
    its PDL wait, so more global loads precede the wait than without it (compiled for an H100, never run here)."""
    pytest.importorskip("triton.backends.nvidia")
    sig = {"q": "*bf16", "k": "*bf16", "v": "*bf16", "pos": "*i64", "o": "*bf16", "m_part": "*fp32",
           "l_part": "*fp32", "acc_part": "*fp32", "qk_scale": "fp32", "L": "i32", "qkv": "*bf16", "qw": "*bf16",
           "kw": "*bf16", "inv_freq": "*fp32", "eps": "fp32"}
    before = {}
    for early in (False, True):
        lines = _ptx(triton.jit(dattn._split_kernel), sig,
                     dict(HKV=8, G=2, GP=2, D=128, BLOCK=16, NSPLIT=5, INTERP=False, PDL=True, QKV=True,
                          QK_NORM=True, RING=False, EARLY=early)).splitlines()
        wait = next(i for i, ln in enumerate(lines) if "griddepcontrol.wait" in ln)
        before[early] = sum("ld.global" in ln for ln in lines[:wait])
    assert before[True] > before[False] > 0, before


def test_engine_with_the_kernel_step_matches_full_forwards(interp):
    """Through the engine: chunked, ragged prefill writes the caches with the model's forward, then the kernel step
    decodes (GEMV on, interpreter); greedy tokens equal the argmax of full forwards (float32)."""
    from hylo.engine import Engine, SamplingParams

    model = _attn_ffn_model(seed=2)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 9)]
    with G.gemv_mode("on"), kernel_step.kernel_step_mode("on"):
        eng = Engine(model, max_batch_size=2, max_seq_len=24, prefill_chunk=4)
        outs = eng.generate(prompts, SamplingParams(max_new_tokens=6))
        assert all(r.kernel_step for r in eng._runners.values())
    for p, o in zip(prompts, outs):
        seq, want = torch.tensor([p]), []
        with torch.no_grad():
            for _ in range(6):
                t = int(model(seq).logits[0, -1].argmax())
                want.append(t)
                seq = torch.cat([seq, torch.tensor([[t]])], 1)
        assert o.token_ids == want
