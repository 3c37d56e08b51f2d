"""A decode block as one kernel whose programs wait on counters, not on launches (``HYLO_STEP_BLOCKS``).

Why: the kernel decode step (:mod:`hylo.engine.kernel_step`) chains 5-6 dependent kernels per attention + FFN
layer pair; on an H100 (Qwen3-0.6B shape, ``benchmarks/results/decode-timeline-h100-run7-elems16384.json``) they
take ~22 us for 31.5 MB, where the copy bandwidth would need ~10.5. What helped so far was work before each
kernel's PDL wait (weights into registers, :mod:`hylo.ops.gemv`'s preloading GEMV). Here the stages of one block
are the programs of one kernel, in stage order, each taking its place from a ticket counter when it starts:

1. a program takes a ticket (an atomic add): tickets follow the order in which programs start, so every program
   of an earlier stage has started (is resident or done) before any program of a later one;
2. it loads its tile of weights into registers (nothing it waits for is needed for that);
3. it waits for the kernel before (PDL) and lets the next kernel launch (which happens once every program of
   this one has started), then, in a later stage, waits until the stage before has counted all its programs done
   (a spin on a counter in global memory);
4. it computes and stores its outputs, then counts itself done in its stage (a release).

So the boundary between two stages is a counter, not a grid's drain and the next grid's launch, and a stage's
programs hold their weights before the stage before ends. The last program to finish resets the counters for the
next launch. Results equal the GEMV chain's (:func:`hylo.ops.gemv.gemv_ref`; the same roundings and sums per
output).

- :func:`decode_ffn_block`: the SwiGLU FFN block, ``y = x + down(silu(gate) * up)`` with
  ``[gate | up] = gate_up(rms_norm(x))``: stage 1 (tiles of gate/up rows) writes the activations to a small
  buffer, stage 2 (tiles of the down projection's rows) reads them, adds the residual.
- :func:`workspace`: the counters and buffers of one block, made once per runner (outside graph capture).

Under ``TRITON_INTERPRET=1`` (CPU tests) programs run one at a time in order, so every wait is already met; the
spin is compiled only for the GPU (tests compile it for sm_90).

``HYLO_STEP_BLOCKS`` (:func:`set_step_blocks`, :func:`step_blocks_mode`): ``off`` (default until timed) or
``ffn`` (the kernel step's FFN blocks as this kernel). ``HYLO_BLOCK_TILE`` (weights per program, 16384) and
``HYLO_BLOCK_WARPS`` (4) and ``HYLO_BLOCK_NAP`` (1: sleep 64 ns between polls of a counter; 0) are for timing.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from hylo.ops.backend import Choice, triton_interpreting
from hylo.ops.gemv import gemv_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the kernel step keeps its GEMV chain
    triton = None

_BLOCKS = Choice("kernel step's blocks as counter-chained kernels", "HYLO_STEP_BLOCKS", ("off", "ffn", "on"), "off")
set_step_blocks, get_step_blocks, step_blocks_mode = _BLOCKS.set, _BLOCKS.get, _BLOCKS.use

TILE_ELEMS = int(os.environ.get("HYLO_BLOCK_TILE", 16384))  # weights per program (a power of two)
WARPS = int(os.environ.get("HYLO_BLOCK_WARPS", 4))
NAP = os.environ.get("HYLO_BLOCK_NAP", "0") == "1"  # a 64-ns sleep between polls of a stage counter
N_COUNTERS = 8  # ticket, one per stage done, programs finished (the attention block uses 5)


def decode_ffn_block_ref(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, norm_weight: torch.Tensor,
                         eps: float, b_gate_up: torch.Tensor | None = None,
                         b_down: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel step's two GEMVs: ``x + down(silu(gate) * up)``, ``[gate | up] = gate_up(rms_norm(x))``."""
    gu = gemv_ref(x, w_gate_up, b_gate_up, norm_weight, eps)
    return gemv_ref(gu, w_down, b_down, residual=x, swiglu=True)


# ----------------------------------------------------------------------------------------- Triton
if triton is not None:

    def _ffn_block_kernel(x, wgu, bgu, wd, bd, nw, y, hbuf, cnt, M, eps, D: tl.constexpr, DP: tl.constexpr,
                          I: tl.constexpr, IP: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
                          INTERP: tl.constexpr, BI: tl.constexpr, BN: tl.constexpr, NAP: tl.constexpr):
        # Stage 1: BI gate rows and the BI up rows I further of wgu [2I, D], each program its tile; x RMS-normed
        # as the GEMV's NORM does; silu(gate) * up rounded as the model rounds it, to hbuf [M, I].
        # Stage 2: BN rows of wd [D, I]; hbuf from L2 (.cg: other programs wrote it); bias, rounding, residual x.
        # cnt (int32): [ticket, stage-1 programs done, programs finished].
        n_a: tl.constexpr = (I + BI - 1) // BI
        n_b: tl.constexpr = (D + BN - 1) // BN
        vid = tl.atomic_add(cnt, 1, sem="relaxed", scope="gpu")
        mm = M
        if INTERP:  # the interpreter keeps scalars as 1-element arrays; branches and range() need ints
            vid, mm = vid.handle.data.item(), mm.handle.data.item()
        dt = x.dtype.element_ty
        if vid < n_a:
            r = vid * BI + tl.arange(0, BI)
            m_r = r < I
            c = tl.arange(0, DP)
            m_c = c < D
            off = r[:, None].to(tl.int64) * D + c[None, :]
            m_w = m_r[:, None] & m_c[None, :]
            wg = tl.load(wgu + off, mask=m_w, other=0.0)
            wu = tl.load(wgu + I * D + off, mask=m_w, other=0.0)
            nwk = tl.load(nw + c, mask=m_c, other=0.0).to(dt).to(tl.float32)
            if HAS_BIAS:
                bg = tl.load(bgu + r, mask=m_r, other=0.0).to(tl.float32)
                bu = tl.load(bgu + I + r, mask=m_r, other=0.0).to(tl.float32)
            if PDL:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
            for m in range(0, mm):
                xk = tl.load(x + m * D + c, mask=m_c, other=0.0).to(tl.float32)
                var = (tl.reduce(xk * xk, 0, tl.standard._sum_combine) / D + eps).to(tl.float32)
                xn = ((xk * (1.0 / tl.sqrt(var))).to(dt).to(tl.float32) * nwk).to(dt).to(tl.float32)
                g = tl.reduce(wg.to(tl.float32) * xn[None, :], 1, tl.standard._sum_combine)
                u = tl.reduce(wu.to(tl.float32) * xn[None, :], 1, tl.standard._sum_combine)
                if HAS_BIAS:
                    g += bg
                    u += bu
                g = g.to(dt).to(tl.float32)
                u = u.to(dt).to(tl.float32)
                h = ((g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u).to(dt)
                tl.store(hbuf + m * I + r, h, mask=m_r)
            tl.debug_barrier()  # every thread's stores are issued before the program counts itself done
            tl.atomic_add(cnt + 1, 1, sem="release", scope="gpu")
        else:
            n = (vid - n_a) * BN + tl.arange(0, BN)
            m_n = n < D
            ci = tl.arange(0, IP)
            m_i = ci < I
            w = tl.load(wd + n[:, None].to(tl.int64) * I + ci[None, :], mask=m_n[:, None] & m_i[None, :], other=0.0)
            if HAS_BIAS:
                bias = tl.load(bd + n, mask=m_n, other=0.0).to(tl.float32)
            if PDL:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
            if not INTERP:  # (the interpreter ran every stage-1 program already)
                seen = tl.load(cnt + 1, volatile=True)
                while seen < n_a:
                    if NAP:  # back off before polling again (HYLO_BLOCK_NAP)
                        seen = tl.inline_asm_elementwise("nanosleep.u32 64; ld.volatile.global.b32 $0, [$1];", "=r,l",
                                                         [cnt + 1], dtype=tl.int32, is_pure=False, pack=1)
                    else:
                        seen = tl.load(cnt + 1, volatile=True)
                tl.atomic_add(cnt + 1, 0, sem="acquire", scope="gpu")
                tl.debug_barrier()
            for m in range(0, mm):
                hv = tl.load(hbuf + m * I + ci, mask=m_i, other=0.0, cache_modifier=".cg").to(tl.float32)
                out = tl.reduce(w.to(tl.float32) * hv[None, :], 1, tl.standard._sum_combine)
                if HAS_BIAS:
                    out += bias
                out = out.to(dt).to(tl.float32) + tl.load(x + m * D + n, mask=m_n, other=0.0).to(tl.float32)
                tl.store(y + m * D + n, out.to(dt), mask=m_n)
        # the last program to finish resets the counters for the next launch
        done = tl.atomic_add(cnt + 2, 1, sem="acq_rel", scope="gpu")
        if INTERP:
            done = done.handle.data.item()
        if done == n_a + n_b - 1:
            tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(cnt + 1, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(cnt + 2, 0, sem="relaxed", scope="gpu")


    def _attn_block_kernel(x, wqkv, bqkv, wo, bo, nw, qw, kw, inv_freq, k, v, pos, y, qkv_buf, o_buf, m_part, l_part,
                           acc_part, cnt, M, L, eps, qk_eps, qk_scale, D: tl.constexpr, DP: tl.constexpr,
                           HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr,
                           HAS_BIAS: tl.constexpr, QK_NORM: tl.constexpr, RING: tl.constexpr, PDL: tl.constexpr,
                           INTERP: tl.constexpr, BQ: tl.constexpr, BO: tl.constexpr, BLOCK: tl.constexpr,
                           NSPLIT: tl.constexpr, NSP: tl.constexpr, HOP: tl.constexpr, NAP: tl.constexpr):
        # Stages, in ticket order:
        # 1. q/k/v: BQ rows of wqkv [(H + 2 HKV) HD, D] per program, x RMS-normed (the GEMV's NORM) -> qkv_buf [M, .].
        # 2. attention: one program per (row b, KV head, split): the split kernel of hylo.ops.decode_attention with
        #    its q/k/v preparation (qk-norm, RoPE, the new k/v into the cache) and its first K/V block loaded
        #    before any wait; with one split it writes o_buf [M, H HD], else float32 partials.
        # 3. (NSPLIT > 1) combine: one program per (row, query head) merges the partials into o_buf.
        # 4. output: BO rows of wo [D, H HD] per program (the input padded to HOP), o_buf from L2, bias, rounding,
        #    the residual x -> y.
        # cnt (int32): [ticket, stage 1 done, stage 2 done, stage 3 done, programs finished].
        H: tl.constexpr = HKV * G
        NQKV: tl.constexpr = (H + 2 * HKV) * HD
        n_q: tl.constexpr = (NQKV + BQ - 1) // BQ
        n_o: tl.constexpr = (D + BO - 1) // BO
        vid = tl.atomic_add(cnt, 1, sem="relaxed", scope="gpu")
        mm = M
        if INTERP:  # the interpreter keeps scalars as 1-element arrays; branches and range() need ints
            vid, mm = vid.handle.data.item(), mm.handle.data.item()
        n_at = mm * HKV * NSPLIT
        n_c = mm * H if NSPLIT > 1 else 0
        dt = x.dtype.element_ty
        d = tl.arange(0, HD)
        if vid < n_q:
            r = vid * BQ + tl.arange(0, BQ)
            m_r = r < NQKV
            c = tl.arange(0, DP)
            m_c = c < D
            w = tl.load(wqkv + r[:, None].to(tl.int64) * D + c[None, :], mask=m_r[:, None] & m_c[None, :], other=0.0)
            nwk = tl.load(nw + c, mask=m_c, other=0.0).to(dt).to(tl.float32)
            if HAS_BIAS:
                bias = tl.load(bqkv + r, mask=m_r, other=0.0).to(tl.float32)
            if PDL:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
            for m in range(0, mm):
                xk = tl.load(x + m * D + c, mask=m_c, other=0.0).to(tl.float32)
                var = (tl.reduce(xk * xk, 0, tl.standard._sum_combine) / D + eps).to(tl.float32)
                xn = ((xk * (1.0 / tl.sqrt(var))).to(dt).to(tl.float32) * nwk).to(dt).to(tl.float32)
                out = tl.reduce(w.to(tl.float32) * xn[None, :], 1, tl.standard._sum_combine)
                if HAS_BIAS:
                    out += bias
                tl.store(qkv_buf + m * NQKV + r, out.to(dt), mask=m_r)
            tl.debug_barrier()
            tl.atomic_add(cnt + 1, 1, sem="release", scope="gpu")
        elif vid < n_q + n_at:
            t = vid - n_q
            sp = t % NSPLIT
            pid = t // NSPLIT  # = b * HKV + kvh
            b = pid // HKV
            kvh = pid % HKV
            p_b = tl.load(pos + b)
            n = tl.minimum(p_b.to(tl.int32) + 1, L)  # valid slots 0..n-1
            per = (n + NSPLIT - 1) // NSPLIT
            per = (per + BLOCK - 1) // BLOCK * BLOCK
            start = sp * per
            end = tl.minimum(start + per, n)
            if INTERP:
                start, end = start.handle.data.item(), end.handle.data.item()
            heads = tl.arange(0, GP)
            m_h = heads < G
            rows = pid * G + heads  # = b * H + kvh * G + i
            kvo = pid.to(tl.int64) * L * HD
            s_first = start + tl.arange(0, BLOCK)
            m_first = s_first < end
            kb0 = tl.load(k + kvo + s_first[:, None] * HD + d[None, :], mask=m_first[:, None], other=0.0)
            vb0 = tl.load(v + kvo + s_first[:, None] * HD + d[None, :], mask=m_first[:, None], other=0.0)
            pd = (d + HD // 2) % HD  # rotate-half: each channel's partner, and its sign
            sgn = tl.where(d < HD // 2, -1.0, 1.0)
            f = p_b.to(tl.float32) * tl.load(inv_freq + d % (HD // 2))
            cs = tl.cos(f).to(dt).to(tl.float32)
            sn = tl.sin(f).to(dt).to(tl.float32)
            hq = kvh * G + heads
            if QK_NORM:
                wq, wq2 = tl.load(qw + d).to(tl.float32), tl.load(qw + pd).to(tl.float32)
                wk, wk2 = tl.load(kw + d).to(tl.float32), tl.load(kw + pd).to(tl.float32)
            if PDL:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
            if not INTERP:
                seen = tl.load(cnt + 1, volatile=True)
                while seen < n_q:
                    if NAP:  # back off before polling again (HYLO_BLOCK_NAP)
                        seen = tl.inline_asm_elementwise("nanosleep.u32 64; ld.volatile.global.b32 $0, [$1];", "=r,l",
                                                         [cnt + 1], dtype=tl.int32, is_pure=False, pack=1)
                    else:
                        seen = tl.load(cnt + 1, volatile=True)
                tl.atomic_add(cnt + 1, 0, sem="acquire", scope="gpu")
                tl.debug_barrier()
            src = qkv_buf + b.to(tl.int64) * NQKV
            xq = tl.load(src + hq[:, None] * HD + d[None, :], mask=m_h[:, None], other=0.0,
                         cache_modifier=".cg").to(tl.float32)
            xq2 = tl.load(src + hq[:, None] * HD + pd[None, :], mask=m_h[:, None], other=0.0,
                          cache_modifier=".cg").to(tl.float32)
            xk = tl.load(src + (H + kvh) * HD + d, cache_modifier=".cg").to(tl.float32)
            xk2 = tl.load(src + (H + kvh) * HD + pd, cache_modifier=".cg").to(tl.float32)
            if QK_NORM:
                rq = 1.0 / tl.sqrt((tl.reduce(xq * xq, 1, tl.standard._sum_combine) / HD + qk_eps).to(tl.float32))
                rk = 1.0 / tl.sqrt((tl.reduce(xk * xk, 0, tl.standard._sum_combine) / HD + qk_eps).to(tl.float32))
                xq = (wq[None, :] * (xq * rq[:, None]).to(dt).to(tl.float32)).to(dt).to(tl.float32)
                xq2 = (wq2[None, :] * (xq2 * rq[:, None]).to(dt).to(tl.float32)).to(dt).to(tl.float32)
                xk = (wk * (xk * rk).to(dt).to(tl.float32)).to(dt).to(tl.float32)
                xk2 = (wk2 * (xk2 * rk).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            qr = ((xq * cs[None, :]).to(dt).to(tl.float32) + (sgn[None, :] * xq2 * sn[None, :]).to(dt).to(tl.float32)
                  ).to(dt)
            k_new = ((xk * cs).to(dt).to(tl.float32) + (sgn * xk2 * sn).to(dt).to(tl.float32)).to(dt)
            v_new = tl.load(src + (H + HKV + kvh) * HD + d, cache_modifier=".cg")
            slot = p_b % L if RING else p_b
            own = (slot >= start) & (slot < end)
            tl.store(k + kvo + slot * HD + d, k_new, mask=own & (d < HD))
            tl.store(v + kvo + slot * HD + d, v_new, mask=own & (d < HD))
            tl.debug_barrier()  # the new slot's stores before this program's threads read the cache
            new = (s_first == slot)[:, None]
            kb0 = tl.where(new, k_new[None, :], kb0)
            vb0 = tl.where(new, v_new[None, :], vb0)
            qt = (qr.to(tl.float32) * qk_scale).to(tl.float32)
            m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
            l_i = tl.full([GP], 0.0, dtype=tl.float32)
            acc = tl.full([GP, HD], 0.0, dtype=tl.float32)
            for s0 in range(start, end, BLOCK):  # dynamic bounds: nothing past pos is read
                s = s0 + tl.arange(0, BLOCK)
                m_s = s < end
                if s0 == start:  # the block loaded before the waits
                    kb = kb0.to(tl.float32)
                    vb = vb0.to(tl.float32)
                else:
                    off = kvo + s[:, None] * HD + d[None, :]
                    kb = tl.load(k + off, mask=m_s[:, None], other=0.0).to(tl.float32)
                    vb = tl.load(v + off, mask=m_s[:, None], other=0.0).to(tl.float32)
                sc = tl.reduce(qt[:, None, :] * kb[None, :, :], 2, tl.standard._sum_combine)  # [GP, BLOCK]
                sc = tl.where(m_s[None, :], sc, float("-inf"))
                m_new = tl.maximum(m_i, tl.reduce(sc, 1, tl.standard._elementwise_max))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(sc - m_new[:, None])
                l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
                acc = acc * alpha[:, None] + tl.reduce(p[:, :, None] * vb[None, :, :], 1, tl.standard._sum_combine)
                m_i = m_new
            if NSPLIT == 1:
                tl.store(o_buf + rows[:, None] * HD + d[None, :], (acc / l_i[:, None]).to(dt), mask=m_h[:, None])
            else:  # an empty split (past pos) leaves m = -inf, l = 0, acc = 0: the combine weighs it 0
                part = rows * NSPLIT + sp
                tl.store(m_part + part, m_i, mask=m_h)
                tl.store(l_part + part, l_i, mask=m_h)
                tl.store(acc_part + part[:, None] * HD + d[None, :], acc, mask=m_h[:, None])
            tl.debug_barrier()
            tl.atomic_add(cnt + 2, 1, sem="release", scope="gpu")
        elif vid < n_q + n_at + n_c:
            row = vid - n_q - n_at  # = b * H + query head
            if PDL:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
            if not INTERP:
                seen = tl.load(cnt + 2, volatile=True)
                while seen < n_at:
                    if NAP:  # back off before polling again (HYLO_BLOCK_NAP)
                        seen = tl.inline_asm_elementwise("nanosleep.u32 64; ld.volatile.global.b32 $0, [$1];", "=r,l",
                                                         [cnt + 2], dtype=tl.int32, is_pure=False, pack=1)
                    else:
                        seen = tl.load(cnt + 2, volatile=True)
                tl.atomic_add(cnt + 2, 0, sem="acquire", scope="gpu")
                tl.debug_barrier()
            spi = tl.arange(0, NSP)
            m_sp = spi < NSPLIT
            mp = tl.load(m_part + row * NSPLIT + spi, mask=m_sp, other=float("-inf"), cache_modifier=".cg")
            lp = tl.load(l_part + row * NSPLIT + spi, mask=m_sp, other=0.0, cache_modifier=".cg")
            ap = tl.load(acc_part + (row * NSPLIT + spi)[:, None] * HD + d[None, :], mask=m_sp[:, None], other=0.0,
                         cache_modifier=".cg")
            wsp = tl.exp2(mp - tl.reduce(mp, 0, tl.standard._elementwise_max))  # finite: split 0 has slot 0
            out = (tl.reduce(wsp[:, None] * ap, 0, tl.standard._sum_combine) /
                   tl.reduce(wsp * lp, 0, tl.standard._sum_combine))
            tl.store(o_buf + row * HD + d, out.to(dt))
            tl.debug_barrier()
            tl.atomic_add(cnt + 3, 1, sem="release", scope="gpu")
        else:
            K_O: tl.constexpr = H * HD
            r = (vid - n_q - n_at - n_c) * BO + tl.arange(0, BO)
            m_r = r < D
            c = tl.arange(0, HOP)
            m_c = c < K_O
            w = tl.load(wo + r[:, None].to(tl.int64) * K_O + c[None, :], mask=m_r[:, None] & m_c[None, :], other=0.0)
            if HAS_BIAS:
                bias = tl.load(bo + r, mask=m_r, other=0.0).to(tl.float32)
            if PDL:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
            if not INTERP:
                if NSPLIT > 1:
                    seen = tl.load(cnt + 3, volatile=True)
                    while seen < n_c:
                        if NAP:  # back off before polling again (HYLO_BLOCK_NAP)
                            seen = tl.inline_asm_elementwise("nanosleep.u32 64; ld.volatile.global.b32 $0, [$1];", "=r,l",
                                                             [cnt + 3], dtype=tl.int32, is_pure=False, pack=1)
                        else:
                            seen = tl.load(cnt + 3, volatile=True)
                    tl.atomic_add(cnt + 3, 0, sem="acquire", scope="gpu")
                else:
                    seen = tl.load(cnt + 2, volatile=True)
                    while seen < n_at:
                        if NAP:  # back off before polling again (HYLO_BLOCK_NAP)
                            seen = tl.inline_asm_elementwise("nanosleep.u32 64; ld.volatile.global.b32 $0, [$1];", "=r,l",
                                                             [cnt + 2], dtype=tl.int32, is_pure=False, pack=1)
                        else:
                            seen = tl.load(cnt + 2, volatile=True)
                    tl.atomic_add(cnt + 2, 0, sem="acquire", scope="gpu")
                tl.debug_barrier()
            for m in range(0, mm):
                ov = tl.load(o_buf + m * K_O + c, mask=m_c, other=0.0, cache_modifier=".cg").to(tl.float32)
                out = tl.reduce(w.to(tl.float32) * ov[None, :], 1, tl.standard._sum_combine)
                if HAS_BIAS:
                    out += bias
                out = out.to(dt).to(tl.float32) + tl.load(x + m * D + r, mask=m_r, other=0.0).to(tl.float32)
                tl.store(y + m * D + r, out.to(dt), mask=m_r)
        done = tl.atomic_add(cnt + 4, 1, sem="acq_rel", scope="gpu")
        if INTERP:
            done = done.handle.data.item()
        if done == n_q + n_at + n_c + n_o - 1:
            for i in range(0, 5):
                tl.atomic_xchg(cnt + i, 0, sem="relaxed", scope="gpu")


@functools.lru_cache(maxsize=None)
def _jit(interpret: bool):
    return triton.jit(_ffn_block_kernel), triton.jit(_attn_block_kernel)


INTERP_TILE = 256  # the interpreter's weights per program: several programs per stage in tiny test shapes


def rows_per_tile(k: int, tile: int | None = None) -> int:
    """Rows of ``k`` weights (padded to a power of two) in a tile of ``tile`` weights (default
    :data:`TILE_ELEMS`, the interpreter's :data:`INTERP_TILE`): a power of two, at least 1."""
    tile = tile or (INTERP_TILE if triton_interpreting() else TILE_ELEMS)
    return max(1, tile // triton.next_power_of_2(k))


class Workspace:
    """One block's counters (int32, zero between launches) and buffers, made outside CUDA graph capture (the
    engine builds them with its runner) and reused by every step; a block's launches must not run concurrently
    (one stream, as the decode engine runs). :func:`ffn_workspace`, :func:`attn_workspace` make them."""

    def __init__(self, device: torch.device, **bufs: torch.Tensor):
        self.counters = torch.zeros(N_COUNTERS, dtype=torch.int32, device=device)
        self.bufs = bufs


def ffn_workspace(device: torch.device, dtype: torch.dtype, rows: int, intermediate: int) -> Workspace:
    """For :func:`decode_ffn_block` of up to ``rows`` rows: the activations ``[rows, intermediate]``."""
    return Workspace(device, h=torch.empty(rows, intermediate, dtype=dtype, device=device))


def attn_workspace(device: torch.device, dtype: torch.dtype, rows: int, num_heads: int, num_kv_heads: int,
                   head_dim: int, cache_len: int) -> Workspace:
    """For :func:`decode_attn_block` of ``rows`` rows over caches of ``cache_len`` slots: the projection, the
    attention's output and, where the cache is split (:func:`hylo.ops.decode_attention.num_splits`), the
    float32 partials."""
    from hylo.ops.decode_attention import num_splits

    nsplit = num_splits(cache_len, rows * num_kv_heads)
    e = dict(dtype=dtype, device=device)
    f = dict(dtype=torch.float32, device=device)
    nh = rows * num_heads * (nsplit if nsplit > 1 else 0)
    return Workspace(device, qkv=torch.empty(rows, (num_heads + 2 * num_kv_heads) * head_dim, **e),
                     o=torch.empty(rows, num_heads * head_dim, **e), m=torch.empty(nh, **f), l=torch.empty(nh, **f),
                     acc=torch.empty(nh, head_dim, **f), nsplit=torch.tensor(nsplit), rows=torch.tensor(rows),
                     cache_len=torch.tensor(cache_len))


def decode_ffn_block(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, norm_weight: torch.Tensor,
                     eps: float, ws: Workspace, b_gate_up: torch.Tensor | None = None,
                     b_down: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """:func:`decode_ffn_block_ref` as one kernel: ``x [M, D]``, ``w_gate_up [2I, D]`` (gate rows, then up rows),
    ``w_down [D, I]``, ``norm_weight [D]``, optional biases ``[2I]`` and ``[D]``, one dtype, contiguous weights;
    ``ws``: a :class:`Workspace` of at least ``M`` rows of ``I``. ``pdl``: programmatic dependent launch
    (:mod:`hylo.ops.pdl`; ignored under the interpreter)."""
    if triton is None:
        raise RuntimeError("hylo.ops.decode_block needs Triton")
    if x.dim() != 2 or w_gate_up.dim() != 2 or w_down.dim() != 2:
        raise ValueError("decode_ffn_block takes x [M, D], w_gate_up [2I, D] and w_down [D, I]")
    M, D = x.shape
    I = w_down.shape[1]
    if w_gate_up.shape != (2 * I, D) or w_down.shape != (D, I) or norm_weight.shape != (D,):
        raise ValueError(f"decode_ffn_block: x {tuple(x.shape)}, w_gate_up {tuple(w_gate_up.shape)}, w_down "
                         f"{tuple(w_down.shape)}, norm_weight {tuple(norm_weight.shape)} do not fit D={D}, I={I}")
    if (b_gate_up is None) != (b_down is None):
        raise ValueError("decode_ffn_block: give both biases or neither")
    ts = [x, w_gate_up, w_down, norm_weight] + ([b_gate_up, b_down] if b_down is not None else [])
    if any(t.dtype != x.dtype for t in ts) or not all(t.is_contiguous() for t in ts[1:]):
        raise ValueError("decode_ffn_block needs one dtype and contiguous weights")
    h = ws.bufs["h"]
    if h.shape[0] < M or h.shape[1] != I or h.dtype != x.dtype:
        raise ValueError(f"decode_ffn_block: workspace {tuple(h.shape)} {h.dtype} does not hold {M} rows of {I} "
                         f"{x.dtype}")
    x = x.contiguous()
    y = torch.empty_like(x)
    interp = triton_interpreting()
    bi, bn = rows_per_tile(2 * D) , rows_per_tile(I)  # stage 1 holds gate and up rows: 2 rows of D per output
    has_bias = b_down is not None
    grid = (triton.cdiv(I, bi) + triton.cdiv(D, bn),)
    launch = {} if interp else {"num_warps": WARPS, **({"launch_pdl": True} if pdl else {})}
    _jit(interp)[0][grid](x, w_gate_up, b_gate_up if has_bias else x, w_down, b_down if has_bias else x, norm_weight,
                       y, h, ws.counters, M, float(eps), D=D, DP=triton.next_power_of_2(D), I=I,
                       IP=triton.next_power_of_2(I), HAS_BIAS=has_bias, PDL=pdl and not interp, INTERP=interp,
                       BI=bi, BN=bn, NAP=NAP, **launch)
    return y


def decode_attn_block(x: torch.Tensor, w_qkv: torch.Tensor, w_o: torch.Tensor, norm_weight: torch.Tensor,
                      eps: float, num_heads: int, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                      qk_eps: float, inv_freq: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                      ring: bool, ws: Workspace, b_qkv: torch.Tensor | None = None, b_o: torch.Tensor | None = None,
                      pdl: bool = False) -> torch.Tensor:
    """An attention block as one kernel: ``x + o_proj(attention(prep(qkv_proj(rms_norm(x)))))``, as the kernel
    step's chain computes it (:func:`hylo.ops.gemv.gemv_ref`, then
    :func:`hylo.ops.decode_attention.decode_qkv_attention`, then the output GEMV with the residual). ``x [M, D]``,
    ``w_qkv [(H + 2 Hkv) Dh, D]``, ``w_o [D, H Dh]``, caches ``k, v [M, Hkv, L, Dh]`` (the new key and value are
    written at ``pos``, ``pos % L`` with ``ring``), ``inv_freq [Dh/2]`` float32, ``ws`` from
    :func:`attn_workspace` for ``M`` rows and ``L`` slots. ``pdl``: programmatic dependent launch."""
    from hylo.ops.decode_attention import _launch_config

    if triton is None:
        raise RuntimeError("hylo.ops.decode_block needs Triton")
    M, D = x.shape
    _, Hkv, L, Dh = k.shape
    H = num_heads
    if (w_qkv.shape != ((H + 2 * Hkv) * Dh, D) or w_o.shape != (D, H * Dh) or norm_weight.shape != (D,)
            or k.shape[0] != M or v.shape != k.shape or H % Hkv or inv_freq.shape != (Dh // 2,)):
        raise ValueError(f"decode_attn_block: x {tuple(x.shape)}, w_qkv {tuple(w_qkv.shape)}, w_o {tuple(w_o.shape)}, "
                         f"caches {tuple(k.shape)} do not fit {H} query heads")
    if (b_qkv is None) != (b_o is None) or (q_norm is None) != (k_norm is None):
        raise ValueError("decode_attn_block: give both biases or neither, both qk-norm weights or neither")
    ts = [x, w_qkv, w_o, norm_weight, k, v] + [t for t in (b_qkv, b_o, q_norm, k_norm) if t is not None]
    if any(t.dtype != x.dtype for t in ts) or not all(t.is_contiguous() for t in ts[1:]):
        raise ValueError("decode_attn_block needs one dtype and contiguous weights and caches")
    b = ws.bufs
    if int(b["rows"]) != M or int(b["cache_len"]) != L or b["qkv"].shape[1] != w_qkv.shape[0]:
        raise ValueError(f"decode_attn_block: the workspace is for {int(b['rows'])} rows and {int(b['cache_len'])} "
                         f"slots, not {M} and {L}")
    nsplit = int(b["nsplit"])
    g = H // Hkv
    gp = triton.next_power_of_2(g)
    block, _ = _launch_config(gp, Dh)
    x = x.contiguous()
    y = torch.empty_like(x)
    interp = triton_interpreting()
    bq, bo = rows_per_tile(D), rows_per_tile(H * Dh)
    grid = (triton.cdiv(w_qkv.shape[0], bq) + M * Hkv * nsplit + (M * H if nsplit > 1 else 0) + triton.cdiv(D, bo),)
    launch = {} if interp else {"num_warps": WARPS, **({"launch_pdl": True} if pdl else {})}
    has_bias, qk = b_o is not None, q_norm is not None
    _jit(interp)[1][grid](
        x, w_qkv, b_qkv if has_bias else x, w_o, b_o if has_bias else x, norm_weight, q_norm if qk else x,
        k_norm if qk else x, inv_freq, k, v, pos, y, b["qkv"], b["o"], b["m"], b["l"], b["acc"], ws.counters, M, L,
        float(eps), float(qk_eps), math.log2(math.e) / math.sqrt(Dh), D=D, DP=triton.next_power_of_2(D), HKV=Hkv,
        G=g, GP=gp, HD=Dh, HAS_BIAS=has_bias, QK_NORM=qk, RING=ring, PDL=pdl and not interp, INTERP=interp, BQ=bq,
        BO=bo, BLOCK=block, NSPLIT=nsplit, NSP=triton.next_power_of_2(nsplit), HOP=triton.next_power_of_2(H * Dh),
        NAP=NAP, **launch)
    return y
