"""Blocks as one kernel (hylo.ops.decode_block): each against the references and the kernel step's chain of
kernels (Triton's interpreter, where programs run in ticket order), and the GPU-only parts (PDL waits, the spin on
the stage counters) compiled for sm_90."""

import pytest
import torch

from hylo.ops import decode_attention as dattn
from hylo.ops import decode_block as DB
from hylo.ops import gemv as G
from hylo.ops.decode_qkv import decode_qkv_ref
from hylo.ops.rope import inv_freq

triton = pytest.importorskip("triton")


def _ffn_case(dtype, bias, M=3, D=48, I=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = r(M, D).to(dtype)
    wgu, wd = (0.2 * r(2 * I, D)).to(dtype), (0.2 * r(D, I)).to(dtype)
    nw = (1 + 0.1 * r(D)).to(dtype)
    biases = (r(2 * I).to(dtype), r(D).to(dtype)) if bias else (None, None)
    return x, wgu, wd, nw, biases


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_ffn_block_matches_the_gemv_chain(interp, dtype, bias):
    """The FFN block kernel equals the kernel step's two preloading GEMVs bit for bit (same roundings, same sums)
    and the float32 reference closely; several programs per stage; a second launch finds its counters reset and
    gives the same result."""
    x, wgu, wd, nw, (bgu, bd) = _ffn_case(dtype, bias)
    ws = DB.ffn_workspace(x.device, dtype, 4, 80)
    assert DB.rows_per_tile(2 * 48) == 2 and DB.rows_per_tile(80) == 2
    chain = G.gemv_direct(G.gemv_direct(x, wgu, bgu, nw, 1e-6, preload=True), wd, bd, residual=x, swiglu=True,
                          preload=True)
    for _ in range(2):
        y = DB.decode_ffn_block(x, wgu, wd, nw, 1e-6, ws, bgu, bd)
        assert torch.equal(y, chain)
        assert ws.counters.tolist() == [0] * DB.N_COUNTERS
    if dtype == torch.float32:
        torch.testing.assert_close(y, DB.decode_ffn_block_ref(x, wgu, wd, nw, 1e-6, bgu, bd), rtol=1e-5, atol=1e-5)


def _attn_case(dtype, cap, ring, qk_norm, bias, M=2, D=48, H=4, Hkv=2, Dh=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w = dict(x=r(M, D).to(dtype), w_qkv=(0.2 * r((H + 2 * Hkv) * Dh, D)).to(dtype),
             w_o=(0.2 * r(D, H * Dh)).to(dtype), norm_weight=(1 + 0.1 * r(D)).to(dtype))
    w["q_norm"], w["k_norm"] = ((1 + 0.3 * r(Dh)).to(dtype), (1 + 0.3 * r(Dh)).to(dtype)) if qk_norm else (None, None)
    w["b_qkv"], w["b_o"] = (r((H + 2 * Hkv) * Dh).to(dtype), r(D).to(dtype)) if bias else (None, None)
    k, v = r(M, Hkv, cap, Dh).to(dtype), r(M, Hkv, cap, Dh).to(dtype)
    pos = torch.tensor([3, cap + 5] if ring else [3, cap - 3])  # one row wrapped with a ring buffer
    return w, k, v, pos, inv_freq(Dh, 10000.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cap", [8, 64])  # one split; 4 splits (MIN_SPLIT 16) and a combine stage
@pytest.mark.parametrize("ring,qk_norm,bias", [(False, True, False), (True, False, True)])
def test_attn_block_matches_the_kernel_chain(interp, dtype, cap, ring, qk_norm, bias):
    """The attention block kernel against the kernel step's chain (q/k/v GEMV, split kernel with its q/k/v
    preparation and the combine, output GEMV with the residual): output and caches bit for bit; float32 also
    against the references. Launched twice: counters reset, same result."""
    w, k, v, pos, f = _attn_case(dtype, cap, ring, qk_norm, bias)
    x, qn, kn = w["x"], w["q_norm"], w["k_norm"]
    k1, v1 = k.clone(), v.clone()
    qkv = G.gemv_direct(x, w["w_qkv"], w["b_qkv"], w["norm_weight"], 1e-6, preload=True)
    o = dattn.decode_qkv_attention(qkv, 4, qn, kn, 1e-6, f, k1, v1, pos, ring)
    chain = G.gemv_direct(o.view(2, -1), w["w_o"], w["b_o"], residual=x, preload=True)
    ws = DB.attn_workspace(x.device, dtype, 2, 4, 2, 16, cap)
    assert int(ws.bufs["nsplit"]) == (1 if cap == 8 else 4)
    k2, v2 = k.clone(), v.clone()
    for _ in range(2):
        y = DB.decode_attn_block(x, w["w_qkv"], w["w_o"], w["norm_weight"], 1e-6, 4, qn, kn, 1e-6, f, k2, v2, pos,
                                 ring, ws, w["b_qkv"], w["b_o"])
        assert torch.equal(y, chain) and torch.equal(k2, k1) and torch.equal(v2, v1)
        assert ws.counters.tolist() == [0] * DB.N_COUNTERS
    assert not torch.equal(k2, k)
    if dtype == torch.float32:
        k3, v3 = k.clone(), v.clone()
        q = decode_qkv_ref(G.gemv_ref(x, w["w_qkv"], w["b_qkv"], w["norm_weight"], 1e-6), 4, 2, qn, kn, 1e-6, f,
                           k3, v3, pos, ring)
        ref = G.gemv_ref(dattn.decode_attention_ref(q, k3, v3, pos).reshape(2, -1), w["w_o"], w["b_o"], residual=x)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def _ptx_lines(fn, signature: dict, constexprs: dict) -> list[str]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=triton.jit(fn), signature={**signature, **{k: "constexpr" for k in constexprs}},
                    constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"launch_pdl": True}).asm["ptx"].splitlines()


def test_block_kernels_compile_for_sm90():
    """Compiled for an H100: the ticket (an atomic) before any load, weights before the PDL wait, the spin on the
    stage counters (volatile loads), reads of other programs' writes past L1 (.cg), the optional back-off."""
    pytest.importorskip("triton.backends.nvidia")
    ffn_sig = {n: "*bf16" for n in ("x", "wgu", "bgu", "wd", "bd", "nw", "y", "hbuf")}
    ffn_sig.update(cnt="*i32", M="i32", eps="fp32")
    attn_sig = {n: "*bf16" for n in ("x", "wqkv", "bqkv", "wo", "bo", "nw", "qw", "kw")}
    attn_sig.update(inv_freq="*fp32", k="*bf16", v="*bf16", pos="*i64", y="*bf16", qkv_buf="*bf16", o_buf="*bf16",
                    m_part="*fp32", l_part="*fp32", acc_part="*fp32", cnt="*i32", M="i32", L="i32", eps="fp32",
                    qk_eps="fp32", qk_scale="fp32")
    cases = [(DB._ffn_block_kernel, ffn_sig, dict(D=1024, DP=1024, I=3072, IP=4096, HAS_BIAS=False, PDL=True,
                                                  INTERP=False, BI=8, BN=4, NAP=False)),
             (DB._attn_block_kernel, attn_sig, dict(D=1024, DP=1024, HKV=8, G=2, GP=2, HD=128, HAS_BIAS=False,
                                                    QK_NORM=True, RING=False, PDL=True, INTERP=False, BQ=16, BO=8,
                                                    BLOCK=16, NSPLIT=5, NSP=8, HOP=2048, NAP=True))]
    for fn, sig, cx in cases:
        lines = _ptx_lines(fn, sig, cx)
        atom = next(i for i, ln in enumerate(lines) if "atom.global" in ln)
        wait = next(i for i, ln in enumerate(lines) if "griddepcontrol.wait" in ln)
        assert not any("ld.global" in ln for ln in lines[:atom])
        assert any("ld.global" in ln for ln in lines[atom:wait])
        assert any("ld.volatile.global" in ln for ln in lines) and any(".cg" in ln for ln in lines)
        assert any("nanosleep" in ln for ln in lines) == cx["NAP"]
