"""Decode-time matrix-vector products: ``y = x W^T (+ b)`` for a handful of rows ``x [M, K]``, ``W [N, K]``.

Why: at batch 1, hylo's decode step of a Qwen3-0.6B-shaped model spends ~0.92 of its 1.44 ms/token (H100) in
cuBLAS products that reach about half the copy bandwidth; a plain Triton GEMV (rows of ``W`` per program, a loop
over ``K``) beat cuBLAS in a first H100 test (``benchmarks/gemv.py``). This module makes it an opt-in decode path.

- :func:`gemv_ref`: float32-accumulated PyTorch reference.
- :func:`gemv`: the Triton kernel as the custom op ``hylo::gemv`` (``torch.library.triton_op``), so
  ``torch.compile`` traces it and inductor sees the kernel itself; float32 accumulation, output in ``x.dtype``.
  Optionally fused: RMSNorm or SwiGLU's ``silu(gate) * up`` on the input, a residual added to the output (the
  fused decode step, ``hylo.engine.fused``).
- :func:`linear`: ``F.linear`` semantics; takes :func:`gemv` only when ``HYLO_GEMV=on`` and the call is a decode
  product (at most :data:`MAX_ROWS` rows, CUDA, matching dtypes, no autograd), ``F.linear`` otherwise. The
  decision reads only the switch and static tensor properties, so a compiled step specialises on it.
- :class:`gemv_linears`: while active, the switch is on and the ``nn.Linear`` modules of a model compute through
  :func:`linear` (``DecodeRunner`` built with the switch on enters it around each call of its step).

Split-K for the kernel step's launches (``HYLO_GEMV_SPLIT``) was timed on an H100 and removed after ``d7c3722``,
where the code remains: 0.920 vs 0.907 ms/token at an 80-slot cache, 0.944 vs 0.950 at 2048
(``benchmarks/results/decode-timeline-h100-run2.json``).

``HYLO_GEMV_PRELOAD`` (:func:`set_gemv_preload`, :func:`gemv_preload_mode`): ``on`` makes direct launches take
``_gemv_pre_kernel`` where a row fits a tile (:data:`PRELOAD_ELEMS`): one tile of whole rows per program, loaded
into registers before the PDL wait, so that only the load of x and the products follow it. On by default. Timed
in the kernel step (Qwen3-0.6B shape, H100, ms/token at an 80-slot cache, with / without it; each pair from one
run): 0.792 / 0.909 before the attention's early K/V block (``benchmarks/results/decode-timeline-h100-run5.json``);
with the early block, 0.809 / 0.799 on one machine (``-run6.json``) and 0.740 / 0.819 on another
(``-run7-elems16384.json``; 8192-element tiles 0.751, 4096 0.786). How much it gains depends on the machine.

The preloading kernel's tile (``BN`` outputs) and warps per product: :data:`PRE_CONFIGS`
(``HYLO_GEMV_PRE_CONFIGS``), then the device's table of configs timed in the kernel step
(``hylo/ops/gemv_configs/<device name>.json``, written from ``benchmarks/step_tune.py``; ``HYLO_GEMV_CONFIGS=autotune``
skips it), then Triton's autotuner, whose picks (each config timed alone) varied between processes and were up to
10% slower in the step (:func:`fixed_config`). ``glu``: the gate/up product leaves SwiGLU's ``silu(gate) * up``
(:func:`glu_ref`).

``HYLO_GEMV`` (:func:`set_gemv`, :func:`gemv_mode`): ``auto`` (default: a ``DecodeRunner`` on a CUDA device takes
the kernel, see :func:`enabled`), ``on`` or ``off``. Measured on an H100 (``benchmarks/results/gemv-h100.json``):
the kernel is as fast as cuBLAS or faster on every matrix of the Qwen3-0.6B shape (the step's products 645 vs
840 us for 1.19 GB), and the compiled, graphed Qwen3-0.6B step takes 1.343 instead of 1.409 ms
(``benchmarks/results/qwen3-vs-transformers-h100-gemv-partial.json``). Under ``TRITON_INTERPRET=1`` the kernel
also runs on CPU tensors (tests), with one fixed block config since the interpreter cannot autotune.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from hylo.ops.backend import Choice, triton_interpreting, triton_supported

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: linear() always takes F.linear
    triton = None

MAX_ROWS = 4  # decode batch buckets up to this size take the GEMV; larger ones (and prefill) take F.linear

_GEMV = Choice("GEMV path", "HYLO_GEMV", ("auto", "off", "on"), "auto")
set_gemv, get_gemv, gemv_mode = _GEMV.set, _GEMV.get, _GEMV.use
# weights into registers before the PDL wait, for direct launches (the kernel decode step), where rows fit: on
# (faster on two H100 machines of three; see the module docstring)
_PRELOAD = Choice("GEMV weight preload", "HYLO_GEMV_PRELOAD", ("off", "on"), "on")
set_gemv_preload, get_gemv_preload, gemv_preload_mode = _PRELOAD.set, _PRELOAD.get, _PRELOAD.use


def supported(device: torch.device) -> bool:
    """Whether the kernel can run on ``device`` (:func:`hylo.ops.backend.triton_supported`)."""
    return triton is not None and triton_supported(device)


def enabled(device: torch.device) -> bool:
    """Whether a decode runner on ``device`` routes its products through the kernel: ``HYLO_GEMV=on`` where
    :func:`supported`, ``auto`` on CUDA with Triton, never with ``off``."""
    mode = _GEMV.value
    return supported(device) and (mode == "on" or (mode == "auto" and device.type == "cuda"))


def glu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            norm_weight: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """SwiGLU's input from its ``[gate; up]`` projection, as the unfused model computes it: the projection's output
    (:func:`gemv_ref`, rounded to ``x.dtype``), then ``silu(gate) * up`` in that dtype: ``[M, N]`` for ``2N`` rows."""
    gate, up = gemv_ref(x, weight, bias, norm_weight, eps).chunk(2, dim=-1)
    return F.silu(gate) * up


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             norm_weight: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
             swiglu: bool = False) -> torch.Tensor:
    """``x [M, K] @ weight[N, K]^T + bias[N]`` accumulated in float32, returned in ``x.dtype``; with the fused
    prologue/epilogue of :func:`gemv` spelled out as the model computes them: ``swiglu`` takes ``x [M, 2K]`` as
    ``[gate | up]`` and multiplies ``silu(gate) * up``; ``norm_weight`` applies RMSNorm (``hylo.layers.norm``) first;
    ``residual [M, N]`` is added to the (rounded) output."""
    if swiglu:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    if norm_weight is not None:
        from hylo.layers.norm import rms_norm

        x = rms_norm(x, norm_weight, eps).to(x.dtype)
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    return y if residual is None else y + residual


# ----------------------------------------------------------------------------------------- Triton
if triton is not None:

    def _gemv_kernel(x, w, b, y, nw, r, best, M, N, eps, pf_rows, grid_cap, K: tl.constexpr, XK: tl.constexpr,
                     HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                     ARGMAX: tl.constexpr, PDL: tl.constexpr, INTERP: tl.constexpr, LINE: tl.constexpr,
                     NL: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # A tile: BN outputs of one row of x. Tiles are numbered with the row index fastest, so the M tiles
        # reading one block of W run side by side and all but the first find it in L2 (W crosses HBM once).
        # W is [N, K] row-major: each output's K weights are contiguous. Programs stride over the tiles: one tile
        # each when the grid has one program per tile (the default), several when it is smaller (PDL's
        # persistent grid, hylo.ops.pdl).
        # Fused for the decode step (each saves a kernel launch per use): NORM, RMSNorm of the row first (its
        # sum of squares in a first pass over the row: K elements, from L2); SWIGLU, x is [gate | up] (row length
        # XK = 2K) and the product takes silu(gate) * up; RESIDUAL, r[row] is added to the output. Roundings follow
        # the unfused model (hylo.ops.gemv.gemv_ref).
        # PDL (programmatic dependent launch): the weights do not depend on the kernel before, so the program
        # first asks L2 for the rows of W of its first tiles (up to pf_rows rows for the whole grid; one prefetch
        # per 128-byte line: LINE elements, NL lines per row rounded up to a power of two, the excess clamped to
        # the row's last line), then waits for that kernel's writes (griddepcontrol.wait) before it reads x or r
        # or writes y, and at once lets the next kernel launch (which waits in turn for this one to complete).
        # Without a PDL launch the wait returns at once. grid_cap (the persistent grid's size, 0 for one program
        # per tile) is only part of the autotuner's key: the best blocks differ between the two grids.
        pid, nprog = tl.program_id(0), tl.num_programs(0)
        total = M * ((N + BN - 1) // BN)
        t_lo, t_hi, t_st = pid, total, nprog
        if INTERP:  # never compiled: the interpreter keeps scalars as 1-element arrays, which numpy >= 2.4 refuses
            t_lo, t_hi, t_st = t_lo.handle.data.item(), t_hi.handle.data.item(), t_st.handle.data.item()  # in range()
        dt = x.dtype.element_ty
        if PDL:
            pf_tiles = tl.maximum(pf_rows // (BN * nprog), 1)
            line = tl.minimum(tl.arange(0, NL) * LINE, K - 1)
            for t in range(t_lo, tl.minimum(t_hi, t_lo + pf_tiles * t_st), t_st):
                prow = tl.minimum((t // M) * BN + tl.arange(0, BN), N - 1).to(tl.int64) * K
                tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l",
                                          [w + prow[:, None] + line[None, :]], dtype=tl.int32, is_pure=False, pack=1)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        # the grid is a multiple of M (the launcher sees to it), so a program's tiles all read one row of x:
        # i_m = pid % M, and the norm's statistics are computed once per program
        i_m = pid % M
        if NORM:
            ss = tl.full([BK], 0.0, dtype=tl.float32)
            for k0 in range(0, K, BK):
                cols = k0 + tl.arange(0, BK)
                xk = tl.load(x + i_m * XK + cols, mask=cols < K, other=0.0).to(tl.float32)
                ss += xk * xk
            var = (tl.reduce(ss, 0, tl.standard._sum_combine) / K + eps).to(tl.float32)  # eps may come in float64
            rstd = 1.0 / tl.sqrt(var)
        for t in range(t_lo, t_hi, t_st):
            i_n = t // M
            rows = i_n * BN + tl.arange(0, BN)
            m_n = rows < N
            acc = tl.full([BN, BK], 0.0, dtype=tl.float32)  # core op (tl.zeros is a jit helper)
            for k0 in range(0, K, BK):
                cols = k0 + tl.arange(0, BK)
                m_k = cols < K
                b_x = tl.load(x + i_m * XK + cols, mask=m_k, other=0.0).to(tl.float32)
                # roundings to x's dtype as the model makes them; arithmetic in float32 (a product of two bf16/fp16
                # values is exact there, so rounding it once equals the low-precision multiply)
                if SWIGLU:
                    up = tl.load(x + i_m * XK + K + cols, mask=m_k, other=0.0).to(tl.float32)
                    b_x = ((b_x / (1.0 + tl.exp(-b_x))).to(dt).to(tl.float32) * up).to(dt).to(tl.float32)
                if NORM:
                    nwk = tl.load(nw + cols, mask=m_k, other=0.0).to(dt).to(tl.float32)
                    b_x = ((b_x * rstd).to(dt).to(tl.float32) * nwk).to(dt).to(tl.float32)
                b_w = tl.load(w + rows[:, None].to(tl.int64) * K + cols[None, :],
                              mask=m_n[:, None] & m_k[None, :], other=0.0)
                acc += b_w.to(tl.float32) * b_x[None, :]
            out = tl.reduce(acc, 1, tl.standard._sum_combine)  # tl.sum's own reduction (tl.sum is a jit helper)
            if HAS_BIAS:
                out += tl.load(b + rows, mask=m_n, other=0.0).to(tl.float32)
            if RESIDUAL:
                out = out.to(dt).to(tl.float32) + tl.load(r + i_m * N + rows, mask=m_n, other=0.0).to(tl.float32)
            tl.store(y + i_m * N + rows, out.to(y.dtype.element_ty), mask=m_n)
            if ARGMAX:  # the tile's largest output as stored and its first index, packed (hylo.ops.decode_io)
                v = tl.where(m_n, out.to(y.dtype.element_ty).to(tl.float32), float("-inf"))
                mx = tl.reduce(v, 0, tl.standard._elementwise_max)
                idx = tl.reduce(tl.where((v == mx) & m_n, rows, N), 0, tl.standard._elementwise_min)
                bits = mx.to(tl.int32, bitcast=True)
                key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
                low = tl.full([], 4294967295, tl.int64) - idx.to(tl.int64)
                tl.atomic_max(best + i_m, (key << 32) | low, sem="relaxed", scope="gpu")

    def _gemv_pre_kernel(x, w, b, y, nw, r, acc, h_out, M, N, eps, K: tl.constexpr, KP: tl.constexpr,
                         XK: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr,
                         RESIDUAL: tl.constexpr, ACC: tl.constexpr, S: tl.constexpr, OUT_ACC: tl.constexpr,
                         GLU: tl.constexpr, PDL: tl.constexpr, INTERP: tl.constexpr, BN: tl.constexpr):
        # The preloading GEMV (HYLO_GEMV_PRELOAD): one tile of BN outputs per program, whole rows (K, padded to
        # KP), for every row of x. Its weights (and the norm's weights and the bias) are loaded into registers
        # before the PDL wait, while the kernel before it still runs, so what follows the wait is one load of x,
        # the products and the store: no read of W on the step's critical path. Same fusions and roundings as
        # _gemv_kernel. ACC: x is a residual stream waiting for a float32 sum of products (acc [M, K], the output
        # projection that hylo.ops.decode_attn_out accumulates): the input is x + acc rounded as a GEMV's output
        # with its residual, and the first tile's programs write it to h_out (the next residual). S > 1: K split
        # in S chunks of KP (program pid: tile pid // S, chunk pid % S). OUT_ACC: the products (and the bias, by
        # chunk 0) are added into the float32 y with atomics, for the next GEMV to add (ACC) as above. GLU: W is
        # [gate; up] (2N rows) and the program's BN outputs are SwiGLU's silu(gate) * up of its BN gate rows and
        # the BN up rows N further on (each product rounded to the dtype first, as the unfused model rounds them).
        pid = tl.program_id(0)
        tile, chunk = pid // S, pid % S
        rows = tile * BN + tl.arange(0, BN)
        m_n = rows < N
        cols = chunk * KP + tl.arange(0, KP)
        m_k = cols < K
        dt = x.dtype.element_ty
        wt = tl.load(w + rows[:, None].to(tl.int64) * K + cols[None, :], mask=m_n[:, None] & m_k[None, :],
                     other=0.0)
        if GLU:  # the up rows that pair with the gate rows
            wu = tl.load(w + (N + rows[:, None]).to(tl.int64) * K + cols[None, :], mask=m_n[:, None] & m_k[None, :],
                         other=0.0)
        if NORM:
            nwk = tl.load(nw + cols, mask=m_k, other=0.0).to(dt).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(b + rows, mask=m_n, other=0.0).to(tl.float32)
            if GLU:
                bias_u = tl.load(b + N + rows, mask=m_n, other=0.0).to(tl.float32)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        mm = M
        if INTERP:  # the interpreter keeps scalars as 1-element arrays (a tuple assignment keeps its int)
            mm, _ = mm.handle.data.item(), 0
        for i_m in range(0, mm):
            xk = tl.load(x + i_m * XK + cols, mask=m_k, other=0.0).to(tl.float32)
            if SWIGLU:
                up = tl.load(x + i_m * XK + K + cols, mask=m_k, other=0.0).to(tl.float32)
                xk = ((xk / (1.0 + tl.exp(-xk))).to(dt).to(tl.float32) * up).to(dt).to(tl.float32)
            if ACC:
                a = tl.load(acc + i_m * K + cols, mask=m_k, other=0.0)
                xk = (a.to(dt).to(tl.float32) + xk).to(dt).to(tl.float32)
                tl.store(h_out + i_m * K + cols, xk.to(dt), mask=m_k & (tile == 0))
            if NORM:
                var = (tl.reduce(xk * xk, 0, tl.standard._sum_combine) / K + eps).to(tl.float32)
                xk = ((xk * (1.0 / tl.sqrt(var))).to(dt).to(tl.float32) * nwk).to(dt).to(tl.float32)
            out = tl.reduce(wt.to(tl.float32) * xk[None, :], 1, tl.standard._sum_combine)
            if HAS_BIAS:
                out += tl.where(chunk == 0, bias, 0.0)
            if GLU:  # gate and up rounded as the GEMV's outputs, then silu(gate) * up as _gemv_kernel's SWIGLU
                up = tl.reduce(wu.to(tl.float32) * xk[None, :], 1, tl.standard._sum_combine)
                if HAS_BIAS:
                    up += bias_u
                gate = out.to(dt).to(tl.float32)
                out = ((gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32) * up.to(dt).to(tl.float32)).to(dt)
            if OUT_ACC:
                tl.atomic_add(y + i_m * N + rows, out, mask=m_n, sem="relaxed", scope="gpu")
            else:
                if RESIDUAL:
                    out = out.to(dt).to(tl.float32) + tl.load(r + i_m * N + rows, mask=m_n, other=0.0).to(tl.float32)
                tl.store(y + i_m * N + rows, out.to(y.dtype.element_ty), mask=m_n)

    # preloading candidates: a tile of at most PRELOAD_ELEMS weights held in registers
    _PRE_CONFIGS = [triton.Config({"BN": bn}, num_warps=nw) for bn in (1, 2, 4, 8, 16, 32) for nw in (4, 8, 16)]
    _INTERP_PRE_BN = 4

    _CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=nw, num_stages=ns)
                for bn in (4, 8, 16) for bk in (256, 512, 1024) for nw in (4, 8) for ns in (2, 4)
                if bn * bk <= 8192]
    _INTERP_CONFIG = {"BN": 32, "BK": 64}  # the interpreter cannot autotune; small blocks keep tests quick


@functools.lru_cache(maxsize=None)
def _jit(interpret: bool):
    k = triton.jit(_gemv_kernel)
    return k if interpret else triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "HAS_BIAS", "NORM", "SWIGLU",
                                                                      "RESIDUAL", "ARGMAX", "PDL", "grid_cap"])(k)


# the preloading GEMV's tile: at most this many weights per program (16384: 32 KB of bf16). Fewer leave more of
# an SM's registers to the next kernel's programs, which PDL launches early (HYLO_GEMV_PRELOAD_ELEMS, a power of 2)
PRELOAD_ELEMS = int(os.environ.get("HYLO_GEMV_PRELOAD_ELEMS", 16384))


def parse_pre_configs(spec: str) -> dict[tuple[int, int, bool], tuple[int, int]]:
    """``"NxK=BN/WARPS,..."`` (``NxKg`` for a ``glu`` product: N outputs of 2N rows) -> ``{(N, K, glu): (BN, warps)}``
    (:data:`PRE_CONFIGS`)."""
    out = {}
    for item in (i.strip() for i in spec.split(",") if i.strip()):
        try:
            shape, cfg = item.split("=")
            glu = shape.endswith("g")
            n, k = (int(v) for v in shape.rstrip("g").split("x"))
            bn, warps = (int(v) for v in cfg.split("/"))
        except ValueError:
            raise ValueError(f"HYLO_GEMV_PRE_CONFIGS: {item!r} is not NxK[g]=BN/WARPS (e.g. 4096x1024=4/8)") from None
        if bn < 1 or bn & (bn - 1) or warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"HYLO_GEMV_PRE_CONFIGS: {item!r}: BN a power of two, WARPS 1..32 (a power of two)")
        out[(n, k, glu)] = (bn, warps)
    return out


# the preloading GEMV's tile (BN outputs) and warps per product, taken instead of the autotuner's pick: (N, K, glu)
# -> (BN, warps). The autotuner times each config alone, where holding the weights in registers before the PDL wait
# gains nothing, and its picks vary between processes; configs timed in the kernel step itself
# (benchmarks/step_tune.py) go here. HYLO_GEMV_PRE_CONFIGS="4096x1024=4/8,3072x1024g=4/4" sets them; they come
# before the device's table (device_configs)
PRE_CONFIGS = parse_pre_configs(os.environ.get("HYLO_GEMV_PRE_CONFIGS", ""))
# table: PRE_CONFIGS, then the device's tuned table (hylo/ops/gemv_configs/<device name>.json), then the autotuner;
# autotune: PRE_CONFIGS, then the autotuner (as before the tables)
_TABLE = Choice("preloading GEMV configs", "HYLO_GEMV_CONFIGS", ("table", "autotune"), "table")
set_gemv_configs, get_gemv_configs, gemv_configs_mode = _TABLE.set, _TABLE.get, _TABLE.use
CONFIG_DIR = Path(__file__).parent / "gemv_configs"


@functools.lru_cache(maxsize=None)
def device_configs(name: str) -> dict[tuple[int, int, bool], tuple[int, int]]:
    """The tuned table for a device named ``name`` (``torch.cuda.get_device_name``): ``CONFIG_DIR/<name with
    spaces as _>.json``, whose ``configs`` is a ``HYLO_GEMV_PRE_CONFIGS`` value; empty where there is none."""
    path = CONFIG_DIR / (name.replace(" ", "_").replace("/", "_") + ".json")
    return parse_pre_configs(json.loads(path.read_text())["configs"]) if path.is_file() else {}


def fixed_config(N: int, K: int, glu: bool, device: torch.device) -> tuple[int, int] | None:
    """The preloading GEMV's (BN, warps) for a product, where not the autotuner's: :data:`PRE_CONFIGS`, then (with
    ``HYLO_GEMV_CONFIGS=table``, on CUDA) the device's table."""
    if (N, K, glu) in PRE_CONFIGS:
        return PRE_CONFIGS[(N, K, glu)]
    if _TABLE.value == "table" and device.type == "cuda":
        return device_configs(torch.cuda.get_device_name(device)).get((N, K, glu))
    return None


def _pre_prune(configs, named_args, **kwargs):
    def arg(name):
        return named_args[name] if name in named_args else kwargs[name]
    rows = arg("KP") * (2 if arg("GLU") else 1)  # weights per output: GLU holds a gate and an up row
    return [c for c in configs if c.kwargs["BN"] * rows <= PRELOAD_ELEMS] or configs[:1]


# the autotuner's key of the preloading kernel (its cache's keys begin with these values, then the tensors' dtypes)
PRE_TUNE_KEY = ["M", "N", "K", "HAS_BIAS", "NORM", "SWIGLU", "RESIDUAL", "ACC", "S", "OUT_ACC", "GLU", "PDL"]


@functools.lru_cache(maxsize=None)
def _jit_pre(interpret: bool, tuned: bool):
    """The preloading kernel: autotuned (``tuned``) or plain, for a fixed config or the interpreter."""
    k = triton.jit(_gemv_pre_kernel)
    if interpret or not tuned:
        return k
    # restore_value: timing a config adds into an OUT_ACC output, which the autotuner puts back after each
    return triton.autotune(configs=_PRE_CONFIGS, key=PRE_TUNE_KEY, prune_configs_by={"early_config_prune": _pre_prune},
                           restore_value=["y"])(k)


def tuned() -> dict[str, dict[str, str]]:
    """The autotuner's picks so far, per kernel (``plain``, ``preload``): its key (shapes and fusions) -> the
    config's block sizes and warps, for benchmark records (empty under the interpreter, which does not tune)."""
    if triton is None or triton_interpreting():
        return {}
    return {name: {"/".join(map(str, k)): str(c) for k, c in getattr(jit, "cache", {}).items()}
            for name, jit in (("plain", _jit(False)), ("preload", _jit_pre(False, True)))}


def preload_fits(K: int) -> bool:
    """Whether the preloading GEMV takes rows of ``K`` weights (a tile of at least one whole row)."""
    return triton is not None and triton.next_power_of_2(K) <= PRELOAD_ELEMS


def preload_applies(K: int, mode: str | None = None) -> bool:
    """Whether a direct launch of a product with rows of ``K`` takes the preloading kernel: ``HYLO_GEMV_PRELOAD``
    (``mode``, default the switch's value) is ``on`` and the rows fit (:func:`preload_fits`)."""
    return (_PRELOAD.value if mode is None else mode) == "on" and preload_fits(K)


def kernel():
    """The kernel, JIT-wrapped on first use and keyed on TRITON_INTERPRET (read by ``triton.jit`` when it wraps):
    autotuned over block sizes normally (``kernel().best_config`` after a call), plain under the interpreter."""
    if triton is None:
        raise RuntimeError("hylo.ops.gemv needs Triton (HYLO_GEMV=on on a machine without it)")
    return _jit(triton_interpreting())


def _check(x, weight, bias, norm_weight, residual, swiglu) -> None:
    K = weight.shape[1] if weight.dim() == 2 else -1
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != (2 * K if swiglu else K):
        raise ValueError(f"gemv takes x [M, {'2K' if swiglu else 'K'}] and weight [N, K]; got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"gemv needs one dtype; got x {x.dtype}, weight {weight.dtype}, "
                         f"bias {None if bias is None else bias.dtype}")
    if not weight.is_contiguous():
        raise ValueError("gemv needs a contiguous weight (a copy would cost more than the product)")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"gemv: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if norm_weight is not None and norm_weight.shape != (K,):
        raise ValueError(f"gemv: norm_weight must be [{K}], got {tuple(norm_weight.shape)}")
    M, N = x.shape[0], weight.shape[0]
    if residual is not None and (residual.shape != (M, N) or residual.dtype != x.dtype):
        raise ValueError(f"gemv: residual must be [{M}, {N}] {x.dtype}, got {tuple(residual.shape)} {residual.dtype}")


def _optional_inputs(x, *inputs):
    """The kernels' pointers for optional inputs: each contiguous, or ``x`` (never read) where it is absent."""
    return [x if t is None else t.contiguous() for t in inputs]


def _launch(x, weight, bias, norm_weight, eps, residual, swiglu, pdl: bool, wrap,
            persistent: bool = False, argmax: torch.Tensor | None = None) -> torch.Tensor:
    """Check, allocate and launch; ``wrap`` is ``torch.library.wrap_triton`` inside the op (traceable) or the
    identity for a direct launch; ``pdl`` launches with programmatic dependent launch (:mod:`hylo.ops.pdl`) and
    ``persistent`` then caps the grid at :func:`max_programs` (each program striding over several tiles, all of
    whose weights it prefetches before the wait); under the interpreter ``persistent`` alone shrinks the grid.
    ``argmax``: see :func:`gemv_direct`."""
    _check(x, weight, bias, norm_weight, residual, swiglu)
    M, (N, K) = x.shape[0], weight.shape
    x = x.contiguous()
    y = x.new_empty(M, N)
    interp = triton_interpreting()
    cfg = dict(_INTERP_CONFIG) if interp else {}  # else the autotuner picks BN, BK
    if pdl and not interp:
        cfg["launch_pdl"] = True
    line = 128 // x.element_size()
    b, nw, r = _optional_inputs(x, bias, norm_weight, residual)
    cap = max_programs(x.device) if persistent and (pdl or interp) else None

    def grid(meta):  # a multiple of M: each program's tiles then share one row of x (the kernel relies on it)
        tiles = M * triton.cdiv(N, meta["BN"])
        return (tiles if cap is None else min(tiles, max(cap // M, 1) * M),)
    wrap(kernel())[grid](
        x, weight, b, y, nw, r, x if argmax is None else argmax, M, N, float(eps),
        PREFETCH_BYTES // (K * x.element_size()), cap or 0, K, 2 * K if swiglu else K, HAS_BIAS=bias is not None,
        NORM=norm_weight is not None, SWIGLU=swiglu, RESIDUAL=residual is not None, ARGMAX=argmax is not None,
        PDL=pdl and not interp, INTERP=interp, LINE=line,
        NL=triton.next_power_of_2(triton.cdiv(K, line)), **cfg)
    return y


PREFETCH_BYTES = 24 << 20  # a PDL launch asks L2 (50 MB on an H100) for at most this much of W before its wait
INTERP_PROGRAMS = 3  # the persistent grid under the interpreter (tests): few programs, several tiles each


def max_programs(device: torch.device) -> int:
    """Programs of a persistent GEMV grid: two per SM, so that the whole grid fits in one wave. The next kernel
    launches only once every program of this one has signalled (right after its wait): with one wave that is at
    the start, and the next kernel prefetches while this one computes; with several waves it would be at the
    last wave."""
    if device.type != "cuda":
        return INTERP_PROGRAMS
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


@torch.library.triton_op("hylo::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         norm_weight: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
         swiglu: bool = False) -> torch.Tensor:
    """Triton ``x [M, K] @ weight[N, K]^T (+ bias[N])`` -> ``[M, N]`` in ``x.dtype``, float32 accumulation.
    ``x``, ``weight`` and ``bias`` share one dtype; ``weight`` must be contiguous (it is read row by row).
    Fused for the decode step (:func:`gemv_ref` spells them out): ``swiglu`` (``x [M, 2K]`` = ``[gate | up]``),
    ``norm_weight [K]`` with ``eps`` (RMSNorm of x first), ``residual [M, N]`` (added to the output)."""
    return _launch(x, weight, bias, norm_weight, eps, residual, swiglu, False, torch.library.wrap_triton)


def gemv_direct(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                norm_weight: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
                swiglu: bool = False, pdl: bool = False, persistent: bool = False,
                preload: bool | None = None, acc: torch.Tensor | None = None,
                h_out: torch.Tensor | None = None, out_acc: torch.Tensor | None = None,
                argmax: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
    """:func:`gemv` launched directly, outside torch's op machinery (``hylo.engine.kernel_step``): with ``pdl``
    the launch may overlap the kernel before it (Hopper and later; ignored under the interpreter), and with
    ``persistent`` too its grid is capped at :func:`max_programs` so that all of it prefetches early; ``preload``
    (default: :func:`preload_applies`, per ``HYLO_GEMV_PRELOAD``) takes the preloading kernel where rows fit: each
    program holds its tile of W in registers, loaded before the PDL wait; by default not where ``persistent`` asks
    for the other kernel's grid. ``acc`` (float32, ``x``'s shape) with ``h_out``: the input is ``x + acc``, rounded
    as a GEMV's residual add (a sum of products accumulated by :mod:`hylo.ops.decode_attn_out`), and is written
    to ``h_out``; ``out_acc`` (float32 ``[M, N]``): the products (and the bias) are added into it with atomics
    instead of returned (no residual), K split into chunks of its largest power-of-two divisor (at most
    :data:`PRELOAD_ELEMS`), for a next GEMV's ``acc``; returns ``out_acc``. Both take the preloading kernel only.
    ``argmax`` (int64 ``[M]``, :data:`hylo.ops.decode_io.EMPTY` or an earlier maximum): each tile's largest output
    and its index, packed (:func:`hylo.ops.decode_io.pack_ref`), go into it with ``atomic_max``: the plain kernel
    only (the LM head's). ``glu``: ``weight`` is SwiGLU's ``[gate; up]`` (``2N`` rows) and the output ``[M, N]`` is
    ``silu(x gate^T) * (x up^T)`` with the roundings of the two unfused steps (:func:`glu_ref`), so the down
    projection after it reads N values per row instead of 2N and computes no SiLU; the preloading kernel only, no
    residual, ``out_acc`` or ``swiglu`` input."""
    if triton is None:
        raise RuntimeError("hylo.ops.gemv needs Triton")
    if glu:
        if weight.dim() != 2 or weight.shape[0] % 2 or swiglu or residual is not None or out_acc is not None \
                or argmax is not None:
            raise ValueError(f"gemv_direct: glu takes a [gate; up] weight of an even row count (got "
                             f"{tuple(weight.shape)}), without swiglu, residual, out_acc or argmax")
        if not preload_fits(weight.shape[-1]):
            raise ValueError(f"gemv_direct: glu needs the preloading kernel; rows of {weight.shape[-1]} do not fit")
        return _launch_preload(x, weight, bias, norm_weight, eps, None, False, pdl, acc, h_out, glu=True)
    if out_acc is not None:
        M, N = x.shape[0], weight.shape[0]
        if out_acc.shape != (M, N) or out_acc.dtype != torch.float32 or not out_acc.is_contiguous() \
                or residual is not None or norm_weight is not None or acc is not None:
            raise ValueError(f"gemv_direct: out_acc must be float32 [{M}, {N}] contiguous, without residual, norm "
                             "or acc")
        if split_chunk(weight.shape[-1]) < 16:
            raise ValueError(f"gemv_direct: out_acc splits K = {weight.shape[-1]} in power-of-two chunks of at "
                             "least 16")
        return _launch_preload(x, weight, bias, None, eps, None, swiglu, pdl, out_acc=out_acc)
    if acc is not None:
        if swiglu:
            raise ValueError("gemv_direct: acc takes no swiglu input")
        if not preload_fits(weight.shape[-1]):
            raise ValueError(f"gemv_direct: acc needs the preloading kernel; rows of {weight.shape[-1]} do not fit")
        return _launch_preload(x, weight, bias, norm_weight, eps, residual, swiglu, pdl, acc, h_out)
    if argmax is not None:
        if argmax.shape != (x.shape[0],) or argmax.dtype != torch.long or not argmax.is_contiguous():
            raise ValueError(f"gemv_direct: argmax must be int64 [{x.shape[0]}] contiguous, got "
                             f"{tuple(argmax.shape)} {argmax.dtype}")
        return _launch(x, weight, bias, norm_weight, eps, residual, swiglu, pdl, lambda k: k, persistent, argmax)
    if preload is None:
        preload = preload_applies(weight.shape[-1]) and not persistent
    if preload and preload_fits(weight.shape[-1]):
        return _launch_preload(x, weight, bias, norm_weight, eps, residual, swiglu, pdl)
    return _launch(x, weight, bias, norm_weight, eps, residual, swiglu, pdl, lambda k: k, persistent)


def split_chunk(K: int) -> int:
    """The chunk of K that ``out_acc`` products take: K's largest power-of-two divisor, at most
    :data:`PRELOAD_ELEMS`."""
    return min(K & -K, PRELOAD_ELEMS)


def _launch_preload(x, weight, bias, norm_weight, eps, residual, swiglu, pdl: bool, acc=None,
                    h_out=None, out_acc=None, glu: bool = False) -> torch.Tensor:
    """Check, allocate and launch the preloading kernel: one program per ``BN`` outputs (and chunk of K with
    ``out_acc``), all rows of ``x``; ``glu``: N = half of W's rows (:func:`gemv_direct`)."""
    _check(x, weight, bias, norm_weight, residual, swiglu)
    if acc is not None and (h_out is None or acc.shape != x.shape or acc.dtype != torch.float32
                            or h_out.shape != x.shape or h_out.dtype != x.dtype
                            or not (acc.is_contiguous() and h_out.is_contiguous())):
        raise ValueError("gemv_direct: acc must be float32 and h_out of x's dtype, both contiguous and of x's shape")
    M, (N, K) = x.shape[0], weight.shape
    N = N // 2 if glu else N
    x = x.contiguous()
    y = x.new_empty(M, N) if out_acc is None else out_acc
    kp = triton.next_power_of_2(K) if out_acc is None else split_chunk(K)
    chunks = -(-K // kp)
    interp = triton_interpreting()
    b, nw, r = _optional_inputs(x, bias, norm_weight, residual)
    fixed = fixed_config(N, K, glu, x.device)
    per_out = kp * (2 if glu else 1)  # weights per output held in registers (a gate and an up row with glu)
    if fixed and fixed[0] * per_out > max(PRELOAD_ELEMS, per_out):
        raise ValueError(f"preloading GEMV config for {N}x{K}{'g' if glu else ''} (HYLO_GEMV_PRE_CONFIGS or the "
                         f"device's table): a tile of {fixed[0]} outputs holds more than PRELOAD_ELEMS = "
                         f"{PRELOAD_ELEMS} weights")
    if interp:  # the interpreter takes a fixed tile's BN (warps mean nothing there)
        cfg = {"BN": fixed[0] if fixed else _INTERP_PRE_BN}
    else:
        cfg = {"BN": fixed[0], "num_warps": fixed[1]} if fixed else {}
    if pdl and not interp:
        cfg["launch_pdl"] = True
    _jit_pre(interp, fixed is None)[lambda meta: (triton.cdiv(N, meta["BN"]) * chunks,)](
        x, weight, b, y, nw, r, x if acc is None else acc, x if h_out is None else h_out, M, N, float(eps), K,
        kp, 2 * K if swiglu else K, HAS_BIAS=bias is not None, NORM=norm_weight is not None, SWIGLU=swiglu,
        RESIDUAL=residual is not None, ACC=acc is not None, S=chunks, OUT_ACC=out_acc is not None, GLU=glu,
        PDL=pdl and not interp, INTERP=interp, **cfg)
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x [..., K]``; through :func:`gemv` when ``HYLO_GEMV=on``, ``x`` is CUDA
    (or a CPU tensor under the Triton interpreter), it has at most :data:`MAX_ROWS` rows, the dtypes match, the
    weight is contiguous, no gradient is needed (the op has no backward) and autocast is off."""
    K = weight.shape[-1]
    rows = x.numel() // K if K else 0
    use = (_GEMV.value == "on" and 1 <= rows <= MAX_ROWS and x.shape[-1] == K and weight.dim() == 2
           and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype) and weight.is_contiguous()
           and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                 or (bias is not None and bias.requires_grad)))
           and (x.is_cuda or (x.device.type == "cpu" and triton_interpreting()))
           and not torch.is_autocast_enabled(x.device.type))  # autocast would change F.linear's dtype
    if not use:
        return F.linear(x, weight, bias)
    return gemv(x.reshape(rows, K), weight, bias).view(*x.shape[:-1], weight.shape[0])


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


class gemv_linears:
    """Context manager (re-enterable): while active, ``HYLO_GEMV`` is ``on`` and every ``nn.Linear`` of ``model``
    (whose forward is ``nn.Linear``'s own) computes through :func:`linear`; on exit both are restored.

    The replacement forwards are built once here, so entering around every call of a compiled step sets the same
    objects each time (no recompiles) and ``DecodeRunner`` can scope it to its decode step: training and prefill
    outside it never see it, and inside it prefill-sized products still take ``F.linear``. The switch is set too,
    so a runner built with it on keeps the GEMV whatever the switch says when it is called or traced."""

    def __init__(self, model: nn.Module):
        self._patches = [(m, MethodType(_linear_forward, m)) for m in model.modules()
                         if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward]
        self._saved: list[tuple] = []  # (switch, forwards) per active entry

    def __enter__(self):
        self._saved.append((_GEMV.value, [m.__dict__.get("forward") for m, _ in self._patches]))
        _GEMV.set("on")
        for m, f in self._patches:
            m.forward = f  # an instance attribute shadows nn.Linear.forward
        return self

    def __exit__(self, *exc):
        switch, forwards = self._saved.pop()
        _GEMV.set(switch)
        for (m, _), old in zip(self._patches, forwards):
            if old is None:
                del m.forward
            else:
                m.forward = old
        return False
