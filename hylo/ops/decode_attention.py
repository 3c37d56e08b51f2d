"""Split-KV ("flash-decoding") GQA attention for the batched decode step: one query per row over a static cache.

Why: in the compiled, CUDA-graphed decode step, :func:`hylo.layers.attention.decode_attention` costs 3-4 kernels
per layer (a matrix product, the softmax, another product) and reads the whole preallocated cache every step. One
fused kernel (plus a small combine when the cache is split) reads K and V once and only up to each row's position.

- :func:`decode_attention_ref`: float32 PyTorch reference.
- :func:`decode_attention`: the Triton kernels as the custom op ``hylo::decode_attention``
  (``torch.library.triton_op``), so ``torch.compile`` traces it and inductor sees the kernels.
- :func:`use_kernel`: whether ``Attention.step`` takes the op (``HYLO_DECODE_ATTN=on`` where :func:`supported`).
- :func:`decode_qkv_attention`: the same kernels with the step's q/k/v preparation (qk-norm, RoPE, the new k/v into
  the cache; :func:`hylo.ops.decode_qkv.decode_qkv_ref`) in the split kernel's prologue, launched directly, with
  programmatic dependent launch if asked: the kernel decode step's attention (``hylo.engine.kernel_step``). A
  merge of the partials by each KV head's last split instead of the combine kernel (``HYLO_ATTN_COMBINE``) was
  timed on an H100 and removed after ``d7c3722``, where the code remains: 0.959 vs 0.907 ms/token at an 80-slot
  cache, 1.353 vs 0.950 at 2048 (``benchmarks/results/decode-timeline-h100-run2.json``).
  With ``HYLO_ATTN_EARLY_KV=on`` (default) each split's first block of K and V is loaded before the PDL wait
  (earlier steps wrote it; the new slot is patched in registers once computed): at an 80-slot cache, 5 splits of
  one block each, the cache reads leave the critical path (the kernel step with preloading GEMVs: 0.809 against
  0.846 ms/token, ``benchmarks/results/decode-timeline-h100-run6.json``).

Inputs: ``q [B, H, 1, Dh]``, caches ``k, v [B, Hkv, L, Dh]`` (contiguous), ``pos [B]`` int >= 0: row ``b`` attends to
slots ``s <= pos[b]`` (all ``L`` slots once ``pos[b] >= L - 1``, which is what a sliding-window ring buffer needs:
see ``Attention.step``). Query heads of one KV group are adjacent (head ``h`` reads KV head ``h // (H // Hkv)``),
as SDPA's ``enable_gqa`` assumes. Scale ``1/sqrt(Dh)``; output ``[B, H, 1, Dh]`` in ``q.dtype``.

The kernel: grid ``(B * Hkv, splits)``. A program takes all ``g = H / Hkv`` query heads of its KV group (so K/V
are read once), divides the row's valid slots ``0..min(pos[b], L-1)`` evenly among the splits (in whole blocks)
and walks its share in blocks with an online softmax in float32. ``pos`` is read from device memory, so the loop
bound is dynamic: a CUDA graph captured once stays right as ``pos`` advances, blocks past ``pos`` are never read,
and a short sequence in a long cache is cheap. Scores are a broadcast multiply and a reduction, not ``tl.dot``
(``g`` is 1-8 rows). With one split the program writes the output; with several it writes float32 partials
(max, sum, unnormalised output) and a second kernel combines them per query head.

Splits (:func:`num_splits`, from static shapes only, since the grid is fixed at capture): enough programs for
about four per SM of an H100 (:data:`TARGET_PROGRAMS` = 528), at most :data:`MAX_SPLITS` = 64, and no more than
one split per :data:`MIN_SPLIT` = 16 slots of the cache. E.g. ``B = 1, Hkv = 8``: 64 splits for ``L >= 1024``
(512 programs), 32 for ``L = 512``, 5 for ``L = 80``; one split for ``B * Hkv >= 528`` or ``L < 32``. Many splits
shorten each program's serial chain of blocks (each a round trip to memory: the loads are not pipelined), which
is what bounds a short decode step. Timed on an H100 in the kernel decode step (Qwen3-0.6B shape, 28 layers,
positions 16-80, ``benchmarks/results/decode-timeline-h100.json``): with an 80-slot cache, one split (the old
``MIN_SPLIT`` of 64) cost 7.4 us per layer, 5 splits 5.4 us plus a 2.0-us combine: the step took 0.984 instead
of 0.987 ms without PDL, but 0.994 instead of 1.157 ms with PDL's persistent grid, and 0.919 with PDL (default
grid), the fastest of the run. With 2048 slots (64 splits instead of 32 while the positions are short) the combine
costs more: 1.036 instead of 1.007 ms without PDL, 0.965 with PDL. Block size and warps
(:func:`_launch_config`) are a first guess from register counts (no autotuning: it would time whatever ``pos`` its
first call had).

``HYLO_DECODE_ATTN`` (:func:`set_decode_attn`, :func:`decode_attn_mode`): ``off`` (default until timed on a GPU)
or ``on``. Under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (tests), with small fixed blocks.
"""

from __future__ import annotations

import functools
import math

import torch

from hylo.ops.backend import Choice, get_backend, triton_interpreting, triton_supported

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: Attention.step keeps its matmul path
    triton = None

TARGET_PROGRAMS = 528  # about four resident programs per SM of an H100 (132 SMs)
MAX_SPLITS = 64  # the combine kernel holds [splits, Dh] partials of one head in registers
MIN_SPLIT = 16  # cache slots per split at least: a cache shorter than 32 slots is not split
INTERP_BLOCK = 16  # the interpreter's block of slots: small, so tests cross block edges
# the split kernel's block of slots when set (a power of two >= 16), else _launch_config's choice. For timing
# (benchmarks/decode_timeline.py, ``@S/B``): with HYLO_ATTN_EARLY_KV a larger block moves more of each split's cache
# reads before the PDL wait, and with a larger MIN_SPLIT a short cache needs no combine kernel. Both lost on an
# H100 (benchmarks/results/decode-timeline-h100-run8-slots.json, Qwen3-0.6B shape, cache 80): one split in blocks
# of 64 or 32 slots 0.897 / 0.858 ms/token, MIN_SPLIT 64 with 64-slot blocks 0.896, against 0.742 (5 splits of 16)
BLOCK_SLOTS: int | None = None

_SWITCH = Choice("decode attention path", "HYLO_DECODE_ATTN", ("off", "on"), "off")
set_decode_attn, get_decode_attn, decode_attn_mode = _SWITCH.set, _SWITCH.get, _SWITCH.use
# the kernel decode step's attention: each split's first block of K/V loaded before the PDL wait
_EARLY = Choice("decode attention early K/V block", "HYLO_ATTN_EARLY_KV", ("off", "on"), "on")
set_attn_early_kv, get_attn_early_kv, attn_early_kv_mode = _EARLY.set, _EARLY.get, _EARLY.use


def supported(device: torch.device) -> bool:
    """Whether the kernel can run on ``device`` (:func:`hylo.ops.backend.triton_supported`)."""
    return triton is not None and triton_supported(device)


def use_kernel(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``Attention.step`` computes through :func:`decode_attention`: ``HYLO_DECODE_ATTN=on``, the backend
    is not ``ref``, the device is :func:`supported`, the cache has ``q``'s dtype and no gradient is needed (the op
    has no backward). Reads only the switches and static tensor properties, so a compiled step specialises on it."""
    return (_SWITCH.value == "on" and get_backend() != "ref" and supported(q.device) and k.dtype == q.dtype
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)))


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Float32 reference: ``q [B, H, 1, Dh]`` attends over ``k, v [B, Hkv, L, Dh]`` slots ``s <= pos[b]``."""
    B, H, _, Dh = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    g = H // Hkv
    qg = q.float().reshape(B, Hkv, g, Dh)
    scores = qg @ k.float().transpose(-1, -2) / math.sqrt(Dh)  # [B, Hkv, g, L]
    valid = torch.arange(L, device=q.device)[None, :] <= pos.reshape(B, 1)
    p = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)
    return (p @ v.float()).reshape(B, H, 1, Dh).to(q.dtype)


def num_splits(L: int, kv_rows: int) -> int:
    """Programs per (row, KV head) for a cache of ``L`` slots and ``kv_rows = B * Hkv``: see the module doc."""
    want = -(-TARGET_PROGRAMS // kv_rows)
    return max(1, min(want, MAX_SPLITS, L // MIN_SPLIT))


def _launch_config(gp: int, dh: int) -> tuple[int, int]:
    """(slots per block, warps) for ``gp`` query rows of head size ``dh``: a [gp, block, dh] float32 product of
    about 2K elements, with 4 warps up to 4K elements, else 8. Compiled for sm_90 (ptxas -v), this keeps the
    kernel at 72-128 registers without spills for g <= 4, Dh <= 128 (200 at g = 8, Dh = 128): several programs
    per SM, whose loads in flight hide the latency Triton does not pipeline here (no tl.dot: no async copies)."""
    if BLOCK_SLOTS is not None:
        if BLOCK_SLOTS < 16 or BLOCK_SLOTS & (BLOCK_SLOTS - 1):
            raise ValueError(f"decode_attention.BLOCK_SLOTS must be a power of two >= 16, got {BLOCK_SLOTS}")
        block = BLOCK_SLOTS
    elif triton_interpreting():
        return INTERP_BLOCK, 4
    else:
        block = max(16, min(64, 2048 // (gp * dh)))
    return block, 4 if gp * block * dh <= 4096 else 8


# ----------------------------------------------------------------------------------------- Triton
if triton is not None:
    # Only core ops inside the kernels: Triton's jit helpers (tl.sum, tl.max, tl.zeros, tl.cdiv) are wrapped when
    # triton is imported, and the interpreter cannot call them when TRITON_INTERPRET is set later (tests).

    def _split_kernel(q, k, v, pos, o, m_part, l_part, acc_part, qk_scale, L, qkv, qw, kw, inv_freq, eps,
                      HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                      NSPLIT: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr, QKV: tl.constexpr,
                      QK_NORM: tl.constexpr, RING: tl.constexpr, EARLY: tl.constexpr):
        # One program: the G query heads of KV head (b, kvh) over its split of the valid slots. qk_scale folds
        # log2(e) in, so the softmax runs in base 2 (exp2); the partial maxima are in that base too.
        # PDL (hylo.ops.pdl): q (or the projection) comes from the kernel before: wait before reading it.
        # QKV: the step's q/k/v preparation fused in (hylo.ops.decode_qkv.decode_qkv_ref spells it out): q is read
        # from the projection qkv [B, (H + 2 HKV) D], RMS-normed (QK_NORM, weights qw/kw) and rotated in
        # registers; the program whose share holds the new slot (pos, or pos % L for a ring buffer: RING) writes the
        # new key and value there and syncs its threads before reading the cache. Roundings as the model's.
        # With QKV, what does not come from the kernel before (pos, written by the previous step's last kernel;
        # RoPE's angles; the qk-norm weights) is read before the wait, the projection after it.
        if PDL and not QKV:
            tl.extra.cuda.gdc_wait()
        pid, sp = tl.program_id(0), tl.program_id(1)  # pid = b * HKV + kvh
        b = pid // HKV
        n = tl.minimum(tl.load(pos + b).to(tl.int32) + 1, L)  # valid slots 0..n-1
        per = (n + NSPLIT - 1) // NSPLIT
        per = (per + BLOCK - 1) // BLOCK * BLOCK  # whole blocks per split
        start = sp * per
        end = tl.minimum(start + per, n)
        if INTERP:  # never compiled: the interpreter keeps scalars as 1-element arrays, which numpy >= 2.4 refuses
            start, end = start.handle.data.item(), end.handle.data.item()  # to turn into range() bounds

        heads = tl.arange(0, GP)
        m_h = heads < G
        rows = pid * G + heads  # = b * H + kvh * G + i: the query heads' rows of q and the output
        d = tl.arange(0, D)
        kv = pid.to(tl.int64) * L * D  # this KV head's cache
        if EARLY:  # (with QKV) the split's first block of K and V, loaded before the PDL wait: earlier steps wrote
            # those slots, and the new one is patched in below, so the loads overlap the kernel before
            s_first = start + tl.arange(0, BLOCK)
            m_first = s_first < end
            kb0 = tl.load(k + kv + s_first[:, None] * D + d[None, :], mask=m_first[:, None], other=0.0)
            vb0 = tl.load(v + kv + s_first[:, None] * D + d[None, :], mask=m_first[:, None], other=0.0)
        if QKV:
            dt = k.dtype.element_ty
            kvh = pid % HKV
            src = qkv + b.to(tl.int64) * (HKV * G + 2 * HKV) * D
            pd = (d + D // 2) % D  # rotate-half: the partner of each channel, and its sign
            sgn = tl.where(d < D // 2, -1.0, 1.0)
            p_b = tl.load(pos + b)
            f = p_b.to(tl.float32) * tl.load(inv_freq + d % (D // 2))
            c = tl.cos(f).to(dt).to(tl.float32)
            sn = tl.sin(f).to(dt).to(tl.float32)
            hq = kvh * G + heads  # this group's query heads, then its key head, then its value head
            if QK_NORM:
                wq, wq2 = tl.load(qw + d).to(tl.float32), tl.load(qw + pd).to(tl.float32)
                wk, wk2 = tl.load(kw + d).to(tl.float32), tl.load(kw + pd).to(tl.float32)
            if PDL:
                tl.extra.cuda.gdc_wait()
            xq = tl.load(src + hq[:, None] * D + d[None, :], mask=m_h[:, None], other=0.0).to(tl.float32)
            xq2 = tl.load(src + hq[:, None] * D + pd[None, :], mask=m_h[:, None], other=0.0).to(tl.float32)
            xk = tl.load(src + (HKV * G + kvh) * D + d).to(tl.float32)
            xk2 = tl.load(src + (HKV * G + kvh) * D + pd).to(tl.float32)
            if QK_NORM:  # rms_norm: float32, cast, then times the weight (a product in the dtype)
                rq = 1.0 / tl.sqrt((tl.reduce(xq * xq, 1, tl.standard._sum_combine) / D + eps).to(tl.float32))
                rk = 1.0 / tl.sqrt((tl.reduce(xk * xk, 0, tl.standard._sum_combine) / D + eps).to(tl.float32))
                xq = (wq[None, :] * (xq * rq[:, None]).to(dt).to(tl.float32)).to(dt).to(tl.float32)
                xq2 = (wq2[None, :] * (xq2 * rq[:, None]).to(dt).to(tl.float32)).to(dt).to(tl.float32)
                xk = (wk * (xk * rk).to(dt).to(tl.float32)).to(dt).to(tl.float32)
                xk2 = (wk2 * (xk2 * rk).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            # x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype
            qr = ((xq * c[None, :]).to(dt).to(tl.float32) + (sgn[None, :] * xq2 * sn[None, :]).to(dt).to(tl.float32)
                  ).to(dt)
            k_new = ((xk * c).to(dt).to(tl.float32) + (sgn * xk2 * sn).to(dt).to(tl.float32)).to(dt)
            v_new = tl.load(src + (HKV * G + HKV + kvh) * D + d)
            slot = p_b % L if RING else p_b
            own = (slot >= start) & (slot < end)
            tl.store(k + kv + slot * D + d, k_new, mask=own & (d < D))
            tl.store(v + kv + slot * D + d, v_new, mask=own & (d < D))
            tl.debug_barrier()  # the new slot's stores before this program's threads read the cache
            if EARLY:  # the first block was loaded before the new slot was written
                new = (s_first == slot)[:, None]
                kb0 = tl.where(new, k_new[None, :], kb0)
                vb0 = tl.where(new, v_new[None, :], vb0)
            qt = (qr.to(tl.float32) * qk_scale).to(tl.float32)
        else:
            # cast after scaling: inductor's launcher may hand qk_scale in as a float64 scalar, which would make
            # the loop-carried max float64 (an H100 compile failed on that)
            qt = (tl.load(q + rows[:, None] * D + d[None, :], mask=m_h[:, None], other=0.0).to(tl.float32) *
                  qk_scale).to(tl.float32)

        m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
        l_i = tl.full([GP], 0.0, dtype=tl.float32)
        acc = tl.full([GP, D], 0.0, dtype=tl.float32)
        for s0 in range(start, end, BLOCK):  # dynamic bounds: nothing past pos is read
            s = s0 + tl.arange(0, BLOCK)
            m_s = s < end
            off = kv + s[:, None] * D + d[None, :]
            if EARLY and s0 == start:  # the block loaded before the wait
                kb = kb0.to(tl.float32)
                vb = vb0.to(tl.float32)
            else:
                kb = tl.load(k + off, mask=m_s[:, None], other=0.0).to(tl.float32)
                vb = tl.load(v + off, mask=m_s[:, None], other=0.0).to(tl.float32)  # issued with K: both in flight
            sc = tl.reduce(qt[:, None, :] * kb[None, :, :], 2, tl.standard._sum_combine)  # [GP, BLOCK]
            sc = tl.where(m_s[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(sc, 1, tl.standard._elementwise_max))  # finite: s0 < end
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
            acc = acc * alpha[:, None] + tl.reduce(p[:, :, None] * vb[None, :, :], 1, tl.standard._sum_combine)
            m_i = m_new

        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        if NSPLIT == 1:
            out = acc / l_i[:, None]
            tl.store(o + rows[:, None] * D + d[None, :], out.to(o.dtype.element_ty), mask=m_h[:, None])
        else:  # an empty split (past pos) leaves m = -inf, l = 0, acc = 0: the combine weighs it 0
            part = rows * NSPLIT + sp
            tl.store(m_part + part, m_i, mask=m_h)
            tl.store(l_part + part, l_i, mask=m_h)
            tl.store(acc_part + part[:, None] * D + d[None, :], acc, mask=m_h[:, None])

    def _combine_kernel(m_part, l_part, acc_part, o, NSPLIT: tl.constexpr, NSP: tl.constexpr, D: tl.constexpr,
                        PDL: tl.constexpr):
        # One program: one query head of one row; merges its NSPLIT partial softmaxes.
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()  # its reads are few: the next kernel may start its prologue
        row = tl.program_id(0)
        sp = tl.arange(0, NSP)
        m_sp = sp < NSPLIT
        d = tl.arange(0, D)
        m = tl.load(m_part + row * NSPLIT + sp, mask=m_sp, other=float("-inf"))
        lsum = tl.load(l_part + row * NSPLIT + sp, mask=m_sp, other=0.0)
        acc = tl.load(acc_part + (row * NSPLIT + sp)[:, None] * D + d[None, :], mask=m_sp[:, None], other=0.0)
        w = tl.exp2(m - tl.reduce(m, 0, tl.standard._elementwise_max))  # the max is finite: split 0 has slot 0
        out = tl.reduce(w[:, None] * acc, 0, tl.standard._sum_combine) / tl.reduce(w * lsum, 0,
                                                                                    tl.standard._sum_combine)
        tl.store(o + row * D + d, out.to(o.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _jit(interpret: bool):
    return triton.jit(_split_kernel), triton.jit(_combine_kernel)


def kernels():
    """The (split, combine) kernels, JIT-wrapped on first use and keyed on TRITON_INTERPRET (read by
    ``triton.jit`` when it wraps)."""
    if triton is None:
        raise RuntimeError("hylo.ops.decode_attention needs Triton (HYLO_DECODE_ATTN=on on a machine without it)")
    return _jit(triton_interpreting())


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape[2] != 1 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"decode_attention takes q [B, H, 1, Dh] and k, v [B, Hkv, L, Dh]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    (B, H, _, Dh), (Bk, Hkv, L, Dk) = q.shape, k.shape
    if Bk != B or Dk != Dh or Hkv == 0 or H % Hkv or L == 0:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} and k, v {tuple(k.shape)} disagree (batch and head "
                         "size must match, H a multiple of Hkv, L >= 1)")
    if Dh < 16 or Dh > 256 or Dh & (Dh - 1):
        raise ValueError(f"decode_attention: head size must be a power of two in 16..256, got {Dh}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"decode_attention needs q, k, v of one dtype among {_DTYPES}; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if pos.shape != (B,) or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode_attention: pos must be [B] = [{B}] int32/int64, got {tuple(pos.shape)} {pos.dtype}")
    if not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError("decode_attention needs contiguous k, v caches (a copy would cost more than attention)")
    if not (q.device == k.device == v.device == pos.device):
        raise ValueError(f"decode_attention: tensors on different devices ({q.device}, {k.device}, {v.device}, "
                         f"{pos.device})")


def _launch(q, k, v, pos, pdl: bool, wrap, prologue: dict | None = None, merge: bool = True):
    """Check, allocate and launch; ``wrap``: ``torch.library.wrap_triton`` inside the op or the identity for a
    direct launch; ``pdl``: programmatic dependent launch (:mod:`hylo.ops.pdl`; ignored under the interpreter);
    ``prologue``: the fused q/k/v preparation (:func:`decode_qkv_attention`), ``q`` then only gives the shape;
    ``merge=False``: no combine kernel, returns ``(out, (max, sum, acc) partials, splits)`` (``out`` written only
    with one split) for a caller that merges the partials itself."""
    _check(q, k, v, pos)
    (B, H, _, Dh), (Hkv, L) = q.shape, k.shape[1:3]
    g = H // Hkv
    gp = triton.next_power_of_2(g)
    q, pos = (q if prologue else q.contiguous()), pos.contiguous()
    out = q.new_empty(B, H, 1, Dh)
    nsplit = num_splits(L, B * Hkv)
    block, warps = _launch_config(gp, Dh)
    interp = triton_interpreting()
    pdl = pdl and not interp
    split, combine = kernels()
    if nsplit == 1:  # the kernel writes the output; the partials' pointers are unused
        parts = (q.new_empty(0, dtype=torch.float32),) * 3
    else:  # per (row, query head, split): running max (base 2), sum of exponentials, unnormalised output
        parts = (q.new_empty(B * H, nsplit, dtype=torch.float32), q.new_empty(B * H, nsplit, dtype=torch.float32),
                 q.new_empty(B * H, nsplit, Dh, dtype=torch.float32))
    pro = prologue or {}
    qk_norm = pro.get("q_norm") is not None
    qkv, freq = pro.get("qkv", out), pro.get("inv_freq", out)  # out: an unused pointer where an input is absent
    qw, kw = (pro["q_norm"], pro["k_norm"]) if qk_norm else (out, out)
    extra = {"launch_pdl": True} if pdl else {}
    wrap(split)[(B * Hkv, nsplit)](
        q, k, v, pos, out, *parts, math.log2(math.e) / math.sqrt(Dh), L, qkv, qw, kw, freq,
        float(pro.get("eps", 0.0)), HKV=Hkv, G=g, GP=gp, D=Dh, BLOCK=block, NSPLIT=nsplit, INTERP=interp, PDL=pdl,
        QKV=prologue is not None, QK_NORM=qk_norm, RING=bool(pro.get("ring", False)),
        EARLY=prologue is not None and _EARLY.value == "on", **({} if interp else {"num_warps": warps, **extra}))
    if not merge:
        return out, parts, nsplit
    if nsplit > 1:
        nsp = triton.next_power_of_2(nsplit)
        launch = {} if interp else {"num_warps": 4 if nsp * Dh <= 4096 else 8, **extra}
        wrap(combine)[(B * H,)](*parts, out, NSPLIT=nsplit, NSP=nsp, D=Dh, PDL=pdl, **launch)
    return out


@torch.library.triton_op("hylo::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Triton decode attention: ``q [B, H, 1, Dh]`` over ``k, v [B, Hkv, L, Dh]`` slots ``s <= pos[b]`` ->
    ``[B, H, 1, Dh]`` in ``q.dtype`` (see the module doc)."""
    return _launch(q, k, v, pos, False, torch.library.wrap_triton)


def decode_qkv_attention(qkv: torch.Tensor, num_heads: int, q_norm: torch.Tensor | None,
                         k_norm: torch.Tensor | None, eps: float, inv_freq: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, pos: torch.Tensor, ring: bool, pdl: bool = False, merge: bool = True):
    """The decode step from the q/k/v projection to attention's output, in the split kernel (launched directly,
    outside torch's op machinery, for ``hylo.engine.kernel_step``): ``qkv [B, (H + 2 Hkv) Dh]`` -> ``[B, H, 1, Dh]``,
    writing the new key and value into ``k, v [B, Hkv, L, Dh]`` at slot ``pos`` (``pos % L`` with ``ring``).
    Equal to :func:`decode_attention` of :func:`hylo.ops.decode_qkv.decode_qkv_ref` (qk-norm with ``q_norm`` /
    ``k_norm`` if given, RoPE with ``inv_freq [Dh/2]`` float32); ``pdl``: programmatic dependent launch;
    ``merge=False``: the partials instead (see :func:`_launch`; :func:`hylo.ops.decode_attn_out.decode_attn_split_out`
    merges them in the output projection's kernel)."""
    if triton is None:
        raise RuntimeError("hylo.ops.decode_attention needs Triton")
    B, Hkv, _, Dh = k.shape
    if qkv.shape != (B, (num_heads + 2 * Hkv) * Dh) or qkv.dtype != k.dtype or not qkv.is_contiguous():
        raise ValueError(f"decode_qkv_attention: qkv {tuple(qkv.shape)} {qkv.dtype} does not match {num_heads} query "
                         f"heads and caches {tuple(k.shape)} {k.dtype} (contiguous, one dtype)")
    if inv_freq.dtype != torch.float32 or inv_freq.shape != (Dh // 2,):
        raise ValueError(f"decode_qkv_attention: inv_freq must be [{Dh // 2}] float32, got {tuple(inv_freq.shape)} "
                         f"{inv_freq.dtype}")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("decode_qkv_attention: pass both q_norm and k_norm, or neither")
    q_shape = qkv.new_empty(1).expand(B, num_heads, 1, Dh)  # its shape and dtype only: never read
    return _launch(q_shape, k, v, pos, pdl, lambda kern: kern,
                   dict(qkv=qkv, q_norm=q_norm, k_norm=k_norm, eps=eps, inv_freq=inv_freq, ring=ring), merge)
