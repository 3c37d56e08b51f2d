"""Attention's output projection added into a float32 sum, for the kernel decode step (``hylo.engine.kernel_step``,
``HYLO_STEP_ATTN_OUT``): with attention in the same kernel (:func:`decode_attn_out`, ``fused``) or after the split
attention, merging its partials (:func:`decode_attn_split_out`, ``split``).

Why: in the kernel step an attention block is three dependent kernels after its q/k/v GEMV (split attention,
combine, output GEMV), and at short contexts each costs about as much as its launch, drain and the round trip of
its inputs through L2 (H100, Qwen3-0.6B shape, 80-slot cache: 4.1, 1.9 and 2.7 us per layer,
``benchmarks/results/attn-out-h100-run1.json``). Here the output projection is split by query head instead of by
output: program ``(b, h, t)`` gets query head ``h``'s attention output, multiplies it by the tile
``W_o[t*BN:(t+1)*BN, h*Dh:(h+1)*Dh]`` and adds the product into a float32 sum ``acc [B, N]`` with atomics. The next
kernel, a GEMV that needs the whole residual stream anyway (:func:`hylo.ops.gemv.gemv_direct` with ``acc``), adds
the sum to the stream after its PDL wait: nothing waits on the atomics but the PDL wait that the next kernel has
in any case. ``fused``: one launch replaces three; ``split``: two (no combine kernel). Timings: the kernel step's
module doc (``fused`` gains at short positions only, ``split`` matched the chain).

Before the PDL wait each program loads its weight tile. After it, with ``fused``, its q and its KV head's new key
and value from the projection (qk-norm, RoPE) and the cache's first block of slots, in one round of loads; it
patches the new slot into the blocks it reads and (one program per KV head) writes it to the cache. Every program
of a KV head reads the whole valid cache, ``H / Hkv * ceil(N / BN)`` times in all (mostly from L2): cheap at short
contexts only. With ``split`` it reads the head's partial softmaxes and merges them as the combine kernel does.

Roundings are the chain's (:func:`hylo.ops.decode_attention.decode_qkv_attention`, then the output GEMV with its
residual): attention's output rounded to the dtype, the projection summed in float32 and rounded before the
residual add. The float32 sum's order is the atomics' arrival order, so the last bits can differ from run to run.
:func:`decode_attn_out_ref` spells it out.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from hylo.ops.backend import triton_interpreting

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# weights per program's tile of W_o (BN = TILE_ELEMS / Dh outputs): 16384 (32 KB of bf16), as the preloading GEMV
TILE_ELEMS = int(os.environ.get("HYLO_ATTN_OUT_TILE", 16384))
# cache slots per block (a power of two >= 16) and warps per program: 64 and 4 were the fastest timed on H100s
# (Qwen3-0.6B shape, benchmarks/results/attn-out-h100-run2.json; 128-slot blocks or 8 warps were slower)
BLOCK = int(os.environ.get("HYLO_ATTN_OUT_BLOCK", 64))
WARPS = int(os.environ.get("HYLO_ATTN_OUT_WARPS", 4))
# the first block of cached slots loaded before the PDL wait (with the weight tile) instead of after it: no gain on
# an H100 (0.643 against 0.640 ms/token with FFN split, benchmarks/results/attn-out-h100-run6-io.json), so off
PRE_KV = os.environ.get("HYLO_ATTN_OUT_PREKV", "0") == "1"
INTERP_BLOCK, INTERP_BN = 16, 8  # the interpreter's: small, so tests cross block and tile edges


def decode_attn_out_ref(qkv, num_heads, q_norm, k_norm, eps, inv_freq, k, v, pos, ring, w_o, b_o):
    """The chain's computation in PyTorch (float32 attention): q/k/v preparation and cache write
    (:func:`hylo.ops.decode_qkv.decode_qkv_ref`), attention rounded to the dtype, then ``o_proj`` in float32."""
    from hylo.ops.decode_attention import decode_attention_ref
    from hylo.ops.decode_qkv import decode_qkv_ref

    q = decode_qkv_ref(qkv, num_heads, k.shape[1], q_norm, k_norm, eps, inv_freq, k, v, pos, ring)
    o = decode_attention_ref(q, k, v, pos).reshape(qkv.shape[0], -1)
    out = o.float() @ w_o.float().T
    return out if b_o is None else out + b_o.float()


def tile_rows(head_dim: int) -> int:
    """Outputs per program (``BN``): :data:`TILE_ELEMS` weights per tile, at least one row."""
    return INTERP_BN if triton_interpreting() else max(1, TILE_ELEMS // head_dim)


if triton is not None:
    # core ops only (see hylo.ops.decode_attention: the interpreter cannot call Triton's wrapped jit helpers)

    def _attn_out_kernel(qkv, k, v, pos, qw, kw, inv_freq, eps, qk_scale, L, m_part, l_part, acc_part, o_in, w,
                         bias, acc, N, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                         BN: tl.constexpr, NSPLIT: tl.constexpr, NSP: tl.constexpr, FUSED: tl.constexpr,
                         HAS_BIAS: tl.constexpr, QK_NORM: tl.constexpr, RING: tl.constexpr, PRE_KV: tl.constexpr,
                         PDL: tl.constexpr, INTERP: tl.constexpr):
        # One program: query head h of row b (pid = b * H + h), output tile t: attention's output for the head,
        # times the tile W_o[t*BN:(t+1)*BN, h*D:(h+1)*D], added into acc. FUSED: the attention itself (q/k/v from
        # the projection, the whole cache); else the merge of the head's NSPLIT partial softmaxes from
        # hylo.ops.decode_attention's split kernel (with one split, its output o). Softmax in base 2 (qk_scale
        # holds log2(e) / sqrt(D)), float32.
        pid, t = tl.program_id(0), tl.program_id(1)
        b = pid // H
        h = pid % H
        dt = w.dtype.element_ty
        d = tl.arange(0, D)
        rows = t * BN + tl.arange(0, BN)
        m_n = rows < N
        # before the wait (nothing the kernel before writes is read here): the weight tile
        wt = tl.load(w + rows[:, None].to(tl.int64) * (H * D) + h * D + d[None, :], mask=m_n[:, None], other=0.0)
        if HAS_BIAS:
            bo = tl.load(bias + rows, mask=m_n, other=0.0).to(tl.float32)
        if FUSED:
            kvh = h // (H // HKV)
            p_b = tl.load(pos + b)
            n = tl.minimum(p_b.to(tl.int32) + 1, L)  # valid slots 0..n-1
            slot = p_b % L if RING else p_b
            kv = (b * HKV + kvh).to(tl.int64) * L * D
            s0v = tl.arange(0, BLOCK)
            pd = (d + D // 2) % D  # rotate-half: each channel's partner and its sign
            sgn = tl.where(d < D // 2, -1.0, 1.0)
            # RoPE's angles and the norm weights do not come from the kernel before either
            f = p_b.to(tl.float32) * tl.load(inv_freq + d % (D // 2))
            c = tl.cos(f).to(dt).to(tl.float32)
            sn = tl.sin(f).to(dt).to(tl.float32)
            if QK_NORM:
                wq, wq2 = tl.load(qw + d).to(tl.float32), tl.load(qw + pd).to(tl.float32)
                wk, wk2 = tl.load(kw + d).to(tl.float32), tl.load(kw + pd).to(tl.float32)
            if PRE_KV:  # the cache's first block before the wait too (earlier steps wrote it)
                kb0 = tl.load(k + kv + s0v[:, None] * D + d[None, :], mask=(s0v < n)[:, None], other=0.0)
                vb0 = tl.load(v + kv + s0v[:, None] * D + d[None, :], mask=(s0v < n)[:, None], other=0.0)
            if PDL:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
            # after the wait, loads issued together: the projection and (without PRE_KV) the first block of cached
            # slots (earlier steps wrote them; the new slot is patched in below)
            src = qkv + b.to(tl.int64) * (H + 2 * HKV) * D
            xq, xq2 = tl.load(src + h * D + d).to(tl.float32), tl.load(src + h * D + pd).to(tl.float32)
            xk, xk2 = tl.load(src + (H + kvh) * D + d).to(tl.float32), tl.load(src + (H + kvh) * D + pd).to(tl.float32)
            v_new = tl.load(src + (H + HKV + kvh) * D + d)
            if not PRE_KV:
                kb0 = tl.load(k + kv + s0v[:, None] * D + d[None, :], mask=(s0v < n)[:, None], other=0.0)
                vb0 = tl.load(v + kv + s0v[:, None] * D + d[None, :], mask=(s0v < n)[:, None], other=0.0)
            if QK_NORM:  # rms_norm: float32, cast, then times the weight (a product in the dtype)
                rq = 1.0 / tl.sqrt((tl.reduce(xq * xq, 0, tl.standard._sum_combine) / D + eps).to(tl.float32))
                rk = 1.0 / tl.sqrt((tl.reduce(xk * xk, 0, tl.standard._sum_combine) / D + eps).to(tl.float32))
                xq = (wq * (xq * rq).to(dt).to(tl.float32)).to(dt).to(tl.float32)
                xq2 = (wq2 * (xq2 * rq).to(dt).to(tl.float32)).to(dt).to(tl.float32)
                xk = (wk * (xk * rk).to(dt).to(tl.float32)).to(dt).to(tl.float32)
                xk2 = (wk2 * (xk2 * rk).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            # RoPE: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype
            qt = ((xq * c).to(dt).to(tl.float32) + (sgn * xq2 * sn).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            qt = (qt * qk_scale).to(tl.float32)
            k_new = ((xk * c).to(dt).to(tl.float32) + (sgn * xk2 * sn).to(dt).to(tl.float32)).to(dt)
            own = (t == 0) & (h % (H // HKV) == 0)  # one program per KV head writes the new slot
            tl.store(k + kv + slot * D + d, k_new, mask=own & (d < D))
            tl.store(v + kv + slot * D + d, v_new, mask=own & (d < D))

            # the first block (loaded before the wait), with the new slot patched in: it may not be in memory yet
            kb = tl.where((s0v == slot)[:, None], k_new[None, :], kb0).to(tl.float32)
            vb = tl.where((s0v == slot)[:, None], v_new[None, :], vb0).to(tl.float32)
            sc = tl.where(s0v < n, tl.reduce(kb * qt[None, :], 1, tl.standard._sum_combine), float("-inf"))
            m_i = tl.reduce(sc, 0, tl.standard._elementwise_max)  # finite: slot 0 is valid
            p = tl.exp2(sc - m_i)
            l_i = tl.reduce(p, 0, tl.standard._sum_combine)
            o_acc = tl.reduce(p[:, None] * vb, 0, tl.standard._sum_combine)
            end = n
            if INTERP:  # the interpreter keeps scalars as 1-element arrays, which range() refuses
                end, _ = end.handle.data.item(), 0  # (a tuple assignment keeps the int)
            for s_start in range(BLOCK, end, BLOCK):  # the rest, if any; dynamic bound: nothing past pos is read
                s = s_start + s0v
                m_s = s < n
                kb = tl.load(k + kv + s[:, None] * D + d[None, :], mask=m_s[:, None], other=0.0)
                vb = tl.load(v + kv + s[:, None] * D + d[None, :], mask=m_s[:, None], other=0.0)
                new = (s == slot)[:, None]
                kb = tl.where(new, k_new[None, :], kb).to(tl.float32)
                vb = tl.where(new, v_new[None, :], vb).to(tl.float32)
                sc = tl.where(m_s, tl.reduce(kb * qt[None, :], 1, tl.standard._sum_combine), float("-inf"))
                m_new = tl.maximum(m_i, tl.reduce(sc, 0, tl.standard._elementwise_max))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(sc - m_new)
                l_i = l_i * alpha + tl.reduce(p, 0, tl.standard._sum_combine)
                o_acc = o_acc * alpha + tl.reduce(p[:, None] * vb, 0, tl.standard._sum_combine)
                m_i = m_new
            o = (o_acc / l_i).to(dt).to(tl.float32)  # attention's output, in the dtype as the chain stores it
        else:
            if PDL:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
            if NSPLIT == 1:
                o = tl.load(o_in + pid * D + d).to(tl.float32)
            else:
                sp = tl.arange(0, NSP)
                m_sp = sp < NSPLIT
                m = tl.load(m_part + pid * NSPLIT + sp, mask=m_sp, other=float("-inf"))
                lsum = tl.load(l_part + pid * NSPLIT + sp, mask=m_sp, other=0.0)
                part = tl.load(acc_part + (pid * NSPLIT + sp)[:, None] * D + d[None, :], mask=m_sp[:, None],
                               other=0.0)
                wsp = tl.exp2(m - tl.reduce(m, 0, tl.standard._elementwise_max))  # finite: split 0 has slot 0
                out = tl.reduce(wsp[:, None] * part, 0, tl.standard._sum_combine) / tl.reduce(wsp * lsum, 0,
                                                                                              tl.standard._sum_combine)
                o = out.to(dt).to(tl.float32)  # rounded as the chain's combine kernel stores it

        # this head's share of the tile's outputs, added to the float32 sum (the bias once, by head 0's programs);
        # the next GEMV adds the sum to the residual stream after its PDL wait (hylo.ops.gemv, acc)
        share = tl.reduce(wt.to(tl.float32) * o[None, :], 1, tl.standard._sum_combine)
        if HAS_BIAS:
            share += tl.where(h == 0, bo, 0.0)
        tl.atomic_add(acc + b * N + rows, share, mask=m_n, sem="relaxed", scope="gpu")


@functools.lru_cache(maxsize=None)
def _jit(interpret: bool):
    return triton.jit(_attn_out_kernel)


def _check(qkv, H, k, w_o, acc, q_norm, k_norm) -> None:
    B, Hkv, L, Dh = k.shape
    N = w_o.shape[0]
    if qkv.shape != (B, (H + 2 * Hkv) * Dh) or qkv.dtype != k.dtype or not qkv.is_contiguous():
        raise ValueError(f"decode_attn_out: qkv {tuple(qkv.shape)} {qkv.dtype} does not match {H} query heads and "
                         f"caches {tuple(k.shape)} {k.dtype} (contiguous, one dtype)")
    if w_o.shape != (N, H * Dh) or w_o.dtype != k.dtype or not w_o.is_contiguous():
        raise ValueError(f"decode_attn_out: w_o must be [N, {H * Dh}] {k.dtype} contiguous, got {tuple(w_o.shape)} "
                         f"{w_o.dtype}")
    if acc.shape != (B, N) or acc.dtype != torch.float32 or not acc.is_contiguous():
        raise ValueError(f"decode_attn_out: acc must be [{B}, {N}] float32 contiguous, got {tuple(acc.shape)} "
                         f"{acc.dtype}")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("decode_attn_out: pass both q_norm and k_norm, or neither")


def _launch(qkv, H, q_norm, k_norm, eps, inv_freq, k, v, pos, ring, w_o, b_o, acc, pdl, merge=None) -> None:
    """The kernel on grid (rows x heads, output tiles): fused, or with ``merge = (max, sum, acc partials, o,
    splits)`` from the split attention."""
    B, Hkv, L, Dh = k.shape
    N = w_o.shape[0]
    interp = triton_interpreting()
    bn = tile_rows(Dh)
    m, lsum, part, o, nsplit = merge or (qkv, qkv, qkv, qkv, 1)  # qkv: unused pointers
    qw, kw = (q_norm, k_norm) if q_norm is not None else (qkv, qkv)
    launch = {} if interp else {"num_warps": WARPS, **({"launch_pdl": True} if pdl else {})}
    _jit(interp)[(B * H, -(-N // bn))](
        qkv, k, v, pos, qw, kw, inv_freq, float(eps), math.log2(math.e) / math.sqrt(Dh), L, m, lsum, part, o, w_o,
        qkv if b_o is None else b_o, acc, N, H=H, HKV=Hkv, D=Dh, BLOCK=INTERP_BLOCK if interp else BLOCK, BN=bn,
        NSPLIT=nsplit, NSP=triton.next_power_of_2(nsplit), FUSED=merge is None, HAS_BIAS=b_o is not None,
        QK_NORM=q_norm is not None, RING=ring, PRE_KV=PRE_KV and merge is None, PDL=pdl and not interp,
        INTERP=interp, **launch)


def decode_attn_split_out(qkv: torch.Tensor, num_heads: int, q_norm: torch.Tensor | None,
                          k_norm: torch.Tensor | None, eps: float, inv_freq: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, pos: torch.Tensor, ring: bool, w_o: torch.Tensor, b_o: torch.Tensor | None,
                          acc: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """:func:`decode_attn_out`'s result in two kernels, at any context length: the split-KV attention
    (:func:`hylo.ops.decode_attention.decode_qkv_attention` without its combine kernel), then one that merges each
    head's partials and adds their product with a tile of ``w_o`` into ``acc`` (grid: rows x heads x tiles).
    Replaces the chain's combine and output GEMV. Returns ``acc``."""
    if triton is None:
        raise RuntimeError("hylo.ops.decode_attn_out needs Triton")
    _check(qkv, num_heads, k, w_o, acc, q_norm, k_norm)
    from hylo.ops.decode_attention import decode_qkv_attention

    o, (m, lsum, part), nsplit = decode_qkv_attention(qkv, num_heads, q_norm, k_norm, eps, inv_freq, k, v, pos, ring,
                                                      pdl, merge=False)
    _launch(qkv, num_heads, None, None, 0.0, inv_freq, k, v, pos, False, w_o, b_o, acc, pdl,
            (m, lsum, part, o, nsplit))
    return acc


def decode_attn_out(qkv: torch.Tensor, num_heads: int, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                    eps: float, inv_freq: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                    ring: bool, w_o: torch.Tensor, b_o: torch.Tensor | None, acc: torch.Tensor,
                    pdl: bool = False) -> torch.Tensor:
    """Adds ``o_proj(attention) [B, N]`` (float32, bias included) into ``acc`` (zero before; see the module doc)
    for ``qkv [B, (H + 2 Hkv) Dh]``, writing the new key and value into ``k, v [B, Hkv, L, Dh]`` at slot ``pos``
    (``pos % L`` with ``ring``). ``w_o [N, H Dh]`` contiguous, ``b_o [N]`` or ``None``; ``pdl``: programmatic
    dependent launch (ignored under the interpreter). Returns ``acc``."""
    if triton is None:
        raise RuntimeError("hylo.ops.decode_attn_out needs Triton")
    _check(qkv, num_heads, k, w_o, acc, q_norm, k_norm)
    _launch(qkv, num_heads, q_norm, k_norm, eps, inv_freq, k, v, pos, ring, w_o, b_o, acc, pdl)
    return acc
