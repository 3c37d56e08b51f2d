"""The decode step's SwiGLU FFN block as one kernel: ``y = x + down(silu(gate) * up)``, ``[gate | up] =
gate_up(rms_norm(x))``, for a handful of rows (``HYLO_FFN_FUSE=on`` in :mod:`hylo.engine.kernel_step`).

Why: the kernel step computes an FFN block as two GEMVs (:mod:`hylo.ops.gemv`): on an H100, Qwen3-0.6B shape, the
pair takes ~11 us per layer for 19 MB, ~1.7 TB/s (``benchmarks/results/decode-timeline-h100-run2.json``), and the
kernel boundary between them is a full drain and ramp-up. Here one kernel does both: a grid of at most one program
per SM (so all of it is resident at once) asks L2 for the block's weights before its PDL wait, computes the SwiGLU
activations of its share of the intermediate rows into a small buffer, meets the other programs at a grid barrier
(a counter in global memory), then computes its share of the down projection's outputs, residual added. The
barrier replaces the kernel boundary; the results are those of the two GEMVs (same roundings, same sums per
output: nothing is split across programs), so they do not depend on the grid.

- :func:`decode_ffn_ref`: the two-GEMV reference (:func:`hylo.ops.gemv.gemv_ref`).
- :func:`decode_ffn`: the Triton kernel, launched directly (optionally with PDL). Under ``TRITON_INTERPRET=1``
  (CPU tests) the programs run one after another, so a barrier would never open: the kernel runs as two launches
  there (activations, then outputs), which exercises everything but the barrier itself.

``HYLO_FFN_FUSE`` (:func:`set_ffn_fuse`, :func:`ffn_fuse_mode`): ``off`` (default until timed) or ``on``.
"""

from __future__ import annotations

import functools

import torch

from hylo.ops.backend import Choice, triton_interpreting
from hylo.ops.gemv import PREFETCH_BYTES, gemv_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the kernel step keeps its two GEMVs
    triton = None

_FUSE = Choice("fused FFN block in the kernel step", "HYLO_FFN_FUSE", ("off", "on"), "off")
set_ffn_fuse, get_ffn_fuse, ffn_fuse_mode = _FUSE.set, _FUSE.get, _FUSE.use

INTERP_PROGRAMS = 3  # the grid under the interpreter (tests): few programs, several tiles each


def decode_ffn_ref(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, norm_weight: torch.Tensor,
                   eps: float, b_gate_up: torch.Tensor | None = None,
                   b_down: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, D]`` -> ``x + down(silu(gate) * up)`` as the kernel step's two GEMVs compute it (float32 sums,
    results rounded to ``x.dtype`` where the model rounds them)."""
    gu = gemv_ref(x, w_gate_up, b_gate_up, norm_weight, eps)
    return gemv_ref(gu, w_down, b_down, residual=x, swiglu=True)


# ----------------------------------------------------------------------------------------- Triton
if triton is not None:

    def _ffn_kernel(x, wgu, bgu, wd, bd, nw, y, hbuf, bar, M, eps, D: tl.constexpr, I: tl.constexpr,
                    HAS_BIAS: tl.constexpr, PDL: tl.constexpr, PF_A: tl.constexpr, PF_B: tl.constexpr,
                    INTERP: tl.constexpr, PHASE: tl.constexpr, LINE: tl.constexpr, NLD: tl.constexpr,
                    NLI: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BKI: tl.constexpr):
        # Phase 1 (PHASE & 1): tiles of BI intermediate rows, strided over the programs; a tile reads BI gate
        # rows and the BI up rows I further of wgu [2I, D] (row-major), RMS-norms x on the fly (as the GEMV's
        # NORM does) and stores silu(gate) * up, rounded as the model rounds it, to hbuf [M, I].
        # Barrier (PHASE == 3, never under the interpreter): bar = [arrivals, generation]. Each program reads the
        # generation, counts itself in; the last one resets the count and bumps the generation, the others spin
        # until it moves. The grid is at most one program per SM, all resident, so the spin ends.
        # Phase 2 (PHASE & 2): tiles of BN outputs; each reads its BN rows of wd [D, I] and all of hbuf (from L2:
        # .cg, written by other programs), adds the bias, rounds, adds the residual x and writes y.
        # PDL: the weights do not depend on the kernel before: each program asks L2 for its tiles' rows (phase 1's
        # if PF_A, phase 2's too if PF_B; the launcher caps the bytes), then waits, then lets the next kernel
        # launch, whose programs wait in turn for this kernel to complete.
        pid, nprog = tl.program_id(0), tl.num_programs(0)
        n_a = (I + BI - 1) // BI
        n_b = (D + BN - 1) // BN
        lo, st, mm = pid, nprog, M
        if INTERP:  # the interpreter keeps scalars as 1-element arrays; range() needs ints
            lo, st, mm = lo.handle.data.item(), st.handle.data.item(), mm.handle.data.item()
            n_a, n_b = n_a.handle.data.item(), n_b.handle.data.item()
        dt = x.dtype.element_ty
        if PDL:
            if PF_A:
                line = tl.minimum(tl.arange(0, NLD) * LINE, D - 1)
                for t in range(lo, n_a, st):
                    r = tl.minimum(t * BI + tl.arange(0, BI), I - 1).to(tl.int64)
                    for half in range(2):  # gate rows, then up rows
                        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l",
                                                  [wgu + (r + half * I)[:, None] * D + line[None, :]],
                                                  dtype=tl.int32, is_pure=False, pack=1)
            if PF_B:
                line = tl.minimum(tl.arange(0, NLI) * LINE, I - 1)
                for t in range(lo, n_b, st):
                    r = tl.minimum(t * BN + tl.arange(0, BN), D - 1).to(tl.int64)
                    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l",
                                              [wd + r[:, None] * I + line[None, :]], dtype=tl.int32, is_pure=False,
                                              pack=1)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

        if PHASE % 2 == 1:
            for m in range(0, mm):
                ss = tl.full([BK], 0.0, dtype=tl.float32)
                for k0 in range(0, D, BK):
                    cols = k0 + tl.arange(0, BK)
                    xk = tl.load(x + m * D + cols, mask=cols < D, other=0.0).to(tl.float32)
                    ss += xk * xk
                rstd = 1.0 / tl.sqrt((tl.reduce(ss, 0, tl.standard._sum_combine) / D + eps).to(tl.float32))
                for t in range(lo, n_a, st):
                    r = t * BI + tl.arange(0, BI)
                    m_r = r < I
                    ag = tl.full([BI, BK], 0.0, dtype=tl.float32)
                    au = tl.full([BI, BK], 0.0, dtype=tl.float32)
                    for k0 in range(0, D, BK):
                        cols = k0 + tl.arange(0, BK)
                        m_k = cols < D
                        xk = tl.load(x + m * D + cols, mask=m_k, other=0.0).to(tl.float32)
                        nwk = tl.load(nw + cols, mask=m_k, other=0.0).to(dt).to(tl.float32)
                        xn = ((xk * rstd).to(dt).to(tl.float32) * nwk).to(dt).to(tl.float32)
                        off = r[:, None].to(tl.int64) * D + cols[None, :]
                        m_w = m_r[:, None] & m_k[None, :]
                        ag += tl.load(wgu + off, mask=m_w, other=0.0).to(tl.float32) * xn[None, :]
                        au += tl.load(wgu + I * D + off, mask=m_w, other=0.0).to(tl.float32) * xn[None, :]
                    g = tl.reduce(ag, 1, tl.standard._sum_combine)
                    u = tl.reduce(au, 1, tl.standard._sum_combine)
                    if HAS_BIAS:
                        g += tl.load(bgu + r, mask=m_r, other=0.0).to(tl.float32)
                        u += tl.load(bgu + I + r, mask=m_r, other=0.0).to(tl.float32)
                    g = g.to(dt).to(tl.float32)
                    u = u.to(dt).to(tl.float32)
                    h = ((g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u).to(dt)
                    tl.store(hbuf + m * I + r, h, mask=m_r)

        if PHASE == 3:
            tl.debug_barrier()  # every thread's stores of hbuf are issued before this program counts itself in
            gen = tl.load(bar + 1, volatile=True)
            if tl.atomic_add(bar, 1, sem="acq_rel", scope="gpu") == nprog - 1:
                tl.atomic_xchg(bar, 0, sem="relaxed", scope="gpu")  # nobody counts in again before gen moves
                tl.atomic_add(bar + 1, 1, sem="release", scope="gpu")
            else:
                cur = gen
                while cur == gen:
                    cur = tl.load(bar + 1, volatile=True)
            tl.atomic_add(bar + 1, 0, sem="acquire", scope="gpu")  # the other programs' hbuf stores are visible
            tl.debug_barrier()

        if PHASE >= 2:
            for t in range(lo, n_b, st):
                n = t * BN + tl.arange(0, BN)
                m_n = n < D
                for m in range(0, mm):
                    acc = tl.full([BN, BKI], 0.0, dtype=tl.float32)
                    for i0 in range(0, I, BKI):
                        ci = i0 + tl.arange(0, BKI)
                        m_i = ci < I
                        hv = tl.load(hbuf + m * I + ci, mask=m_i, other=0.0, cache_modifier=".cg").to(tl.float32)
                        w = tl.load(wd + n[:, None].to(tl.int64) * I + ci[None, :], mask=m_n[:, None] & m_i[None, :],
                                    other=0.0)
                        acc += w.to(tl.float32) * hv[None, :]
                    out = tl.reduce(acc, 1, tl.standard._sum_combine)
                    if HAS_BIAS:
                        out += tl.load(bd + n, mask=m_n, other=0.0).to(tl.float32)
                    out = out.to(dt).to(tl.float32) + tl.load(x + m * D + n, mask=m_n, other=0.0).to(tl.float32)
                    tl.store(y + m * D + n, out.to(dt), mask=m_n)

    _CONFIGS = [triton.Config({"BI": bi, "BK": bk, "BN": bn, "BKI": bki}, num_warps=nw)
                for bi in (4, 8, 16) for bk in (256, 512) for bn in (4, 8) for bki in (512, 1024) for nw in (4, 8)
                if bi * bk <= 4096 and bn * bki <= 8192]
    _INTERP_CONFIG = {"BI": 8, "BK": 32, "BN": 8, "BKI": 32}  # small blocks: uneven tiles in tiny test shapes


@functools.lru_cache(maxsize=None)
def _jit(interpret: bool):
    k = triton.jit(_ffn_kernel)
    return k if interpret else triton.autotune(configs=_CONFIGS, key=["M", "D", "I", "HAS_BIAS", "PDL"])(k)


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(device: torch.device, dtype: torch.dtype, M: int, I: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The kernel's buffers for ``M`` rows of ``I`` activations: ``hbuf [M, I]`` and the barrier's int32
    ``[arrivals, generation]`` (zero arrivals between calls), made on first use and kept. None while a CUDA graph
    captures and they do not exist yet (made there they would belong to that graph's pool): the caller then
    computes the block another way. Shared by every call of that shape: calls must not run concurrently (one
    stream, as the decode engine runs)."""
    key = (device, dtype, M, I)
    if key not in _WORKSPACES:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _WORKSPACES[key] = (torch.empty(M, I, dtype=dtype, device=device),
                            torch.zeros(2, dtype=torch.int32, device=device))
    return _WORKSPACES[key]


def max_programs(device: torch.device) -> int:
    """The grid's cap: one program per SM, so that every program is resident while the others spin at the
    barrier (the kernel's blocks and warps allow one per SM; the next kernel's, launched early by PDL, wait)."""
    if device.type != "cuda":
        return INTERP_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_ffn(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, norm_weight: torch.Tensor,
               eps: float, b_gate_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None,
               pdl: bool = False) -> torch.Tensor:
    """Triton :func:`decode_ffn_ref`: ``x [M, D]``, ``w_gate_up [2I, D]`` (gate rows, then up rows), ``w_down
    [D, I]``, ``norm_weight [D]``, optional biases ``[2I]`` and ``[D]``, all of one dtype and contiguous; returns
    ``[M, D]``. ``pdl``: launched with programmatic dependent launch (:mod:`hylo.ops.pdl`; ignored under the
    interpreter). Raises if the workspace cannot be made (first call inside a CUDA graph capture)."""
    if triton is None:
        raise RuntimeError("hylo.ops.decode_ffn needs Triton")
    if x.dim() != 2 or w_gate_up.dim() != 2 or w_down.dim() != 2:
        raise ValueError("decode_ffn takes x [M, D], w_gate_up [2I, D] and w_down [D, I]")
    M, D = x.shape
    I = w_down.shape[1]
    if w_gate_up.shape != (2 * I, D) or w_down.shape != (D, I) or norm_weight.shape != (D,):
        raise ValueError(f"decode_ffn: shapes x {tuple(x.shape)}, w_gate_up {tuple(w_gate_up.shape)}, w_down "
                         f"{tuple(w_down.shape)}, norm_weight {tuple(norm_weight.shape)} do not fit D={D}, I={I}")
    if (b_gate_up is None) != (b_down is None):
        raise ValueError("decode_ffn: give both biases or neither")
    ts = [x, w_gate_up, w_down, norm_weight] + ([b_gate_up, b_down] if b_down is not None else [])
    if any(t.dtype != x.dtype for t in ts) or not all(t.is_contiguous() for t in ts[1:]):
        raise ValueError("decode_ffn needs one dtype and contiguous weights")
    ws = workspace(x.device, x.dtype, M, I)
    if ws is None:
        raise RuntimeError("decode_ffn: first call for this shape inside a CUDA graph capture; call it once before")
    hbuf, bar = ws
    x = x.contiguous()
    y = torch.empty_like(x)
    interp = triton_interpreting()
    line = 128 // x.element_size()
    a_bytes = 2 * I * D * x.element_size()
    has_bias = b_down is not None
    args = (x, w_gate_up, b_gate_up if has_bias else x, w_down, b_down if has_bias else x, norm_weight, y, hbuf,
            bar, M, float(eps), D, I)
    common = dict(HAS_BIAS=has_bias, PF_A=a_bytes <= PREFETCH_BYTES, PF_B=3 * a_bytes // 2 <= PREFETCH_BYTES,
                  INTERP=interp, LINE=line, NLD=triton.next_power_of_2(triton.cdiv(D, line)),
                  NLI=triton.next_power_of_2(triton.cdiv(I, line)))
    cap = max_programs(x.device)
    if interp:  # two launches: no program may wait for another (see the module docstring)
        for phase in (1, 2):
            _jit(True)[(cap,)](*args, PDL=False, PHASE=phase, **common, **_INTERP_CONFIG)
        return y

    def grid(meta):
        return (min(cap, max(triton.cdiv(I, meta["BI"]), triton.cdiv(D, meta["BN"]))),)
    extra = {"launch_pdl": True} if pdl else {}
    _jit(False)[grid](*args, PDL=pdl, PHASE=3, **common, **extra)
    return y
