"""Decode latency and throughput of a model predicted from a :class:`HyloConfig` and a measured LUT, without
building the model (parameter and state sizes come from single layers on the meta device: no memory, no weights).

One decode step is predicted as ``overhead + embed + sum over layers (norm + op) + head`` (see
:mod:`hylo.profile.lut`), at the model's cache length (context + meta tokens). Memory: weights + batch x (state
bytes per sequence + the largest per-row temporary memory of a layer's step, as measured for the LUT, or
scaled from the nearest signature measured).

Models of only attention and FFN blocks decode on CUDA at up to ``gemv.MAX_ROWS`` rows through
:mod:`hylo.engine.kernel_step` (its own fused kernels: 0.90 against 1.44 ms/token compiled for Qwen3-0.6B's
shape). Where the LUT holds that step's pieces (``kattn``, ``kswa``, ``kffn``, ``khead``; measured where a runner
would take the step), such a model's step is predicted from them (:func:`kernel_step_used`); its attention reads
the cache only up to the position, so a static cache's generation time is integrated over positions. A LUT
without them (older tables) predicts the step of PyTorch ops, which ``HYLO_KERNEL_STEP=off`` measures.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from .lut import LUT, Lookup, model_pieces
from .pieces import state_bytes, step_bytes, weight_bytes

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def lut_dtype(lut: LUT) -> torch.dtype:
    name = lut.meta.get("dtype", "bfloat16")
    if name not in DTYPES:
        raise ValueError(f"LUT dtype {name!r} is not one of {list(DTYPES)}")
    return DTYPES[name]


@functools.lru_cache(maxsize=None)
def work_fn(dtype: torch.dtype):
    """``work(op, sig, context, batch)``: bytes one step of a piece reads (:func:`~.pieces.step_bytes`), one
    function per dtype, so the byte model a LUT fits with it is fitted once."""

    def work(op, sig, ctx, b):
        return step_bytes(op, sig, ctx, b, dtype)

    return work


# ----------------------------------------------------------------------------- memory
def model_memory(config, context: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """``{"weights_bytes", "state_bytes_per_seq", "cache_len"}`` of a model with ``config`` whose cache holds
    ``context`` tokens (plus its meta tokens), counted from meta-device layers."""
    db = torch.empty((), dtype=dtype).element_size()
    D, V = config.hidden_size, config.vocab_size
    n_meta = config.num_meta_tokens
    cache_len = context + n_meta
    w = 0
    st = 0
    for op, sig, count in model_pieces(config):
        if op in ("norm", "embed", "head", "overhead"):
            continue
        w += count * weight_bytes(op, sig, db)
        st += count * state_bytes(op, sig, cache_len, dtype)
    w += db * (len(config.layers) * D + D + V * D + n_meta * D)  # block norms, final norm, embedding, meta
    if not config.tie_word_embeddings:
        w += db * V * D
    return {"weights_bytes": int(w), "state_bytes_per_seq": int(st), "cache_len": int(cache_len)}


def max_batch(memory_bytes: float, per_seq_bytes: float, weight_bytes: float = 0.0, fixed_bytes: float = 0.0,
              margin: float = 0.9, cap: int | None = None) -> int:
    """The largest batch whose memory fits: ``weights + fixed + batch x per_seq <= margin x memory``.

    ``memory_bytes`` is what the process may use (free device memory, or the device's memory with the weights
    counted in ``weight_bytes``); ``per_seq_bytes`` the decode state plus temporaries of one row. 0 when even one
    row does not fit; at most ``cap``."""
    if not 0 < margin <= 1:
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    if per_seq_bytes <= 0:
        raise ValueError(f"per_seq_bytes must be > 0, got {per_seq_bytes}")
    avail = memory_bytes * margin - weight_bytes - fixed_bytes
    b = max(0, int(avail // per_seq_bytes))
    return min(b, cap) if cap is not None else b


def integrate_steps(points: list[tuple[float, float]], n_tokens: int) -> float:
    """Total time of ``n_tokens`` decode steps (positions ``0 .. n_tokens-1``) from step times sampled at some
    positions: ``points = [(position, ms), ...]``; trapezoid between the samples, the end values held constant
    outside them. Returns ms."""
    if not points:
        raise ValueError("integrate_steps needs at least one (position, ms) point")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    pts = sorted(points)
    xs = [min(max(p, 0.0), float(n_tokens)) for p, _ in pts]
    ys = [m for _, m in pts]
    total = ys[0] * xs[0] + ys[-1] * (n_tokens - xs[-1])
    for i in range(len(xs) - 1):
        total += 0.5 * (ys[i] + ys[i + 1]) * (xs[i + 1] - xs[i])
    return total


# ----------------------------------------------------------------------------- latency
@dataclass
class DecodePrediction:
    context: int
    batch: int
    ms_per_token: float  # ms per decode step (every row gets one token)
    tokens_per_s: float
    by_op: dict = field(default_factory=dict)  # ms per step by piece, all layers of one operator summed
    scaled: list = field(default_factory=list)  # pieces estimated from other widths
    extrapolated: bool = False
    kernel_step: bool = False  # predicted from the kernel decode step's pieces

    def to_dict(self) -> dict:
        return {"context": self.context, "batch": self.batch, "ms_per_token": self.ms_per_token,
                "tokens_per_s": self.tokens_per_s, "by_op": self.by_op, "scaled": self.scaled,
                "extrapolated": self.extrapolated, "kernel_step": self.kernel_step}


def kernel_step_used(config, lut: LUT, batch: int) -> bool:
    """Whether the step of a model of ``config`` at ``batch`` rows is predicted from the kernel decode step's
    pieces: the step applies (:func:`hylo.engine.kernel_step.config_applicable`) and the LUT measured them."""
    from ..engine.kernel_step import config_applicable

    if not config_applicable(config, batch):
        return False
    need = {op for op, _, _ in model_pieces(config, kernel_step=True)} - {"embed", "overhead"}
    return need <= {e["op"] for e in lut.entries if "error" not in e}


def predict_decode(config, lut: LUT, context: int, batch: int = 1, space: str = "linear") -> DecodePrediction:
    """Predicted ms per decode step with a cache of ``context`` tokens (plus meta tokens) and ``batch`` rows."""
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be >= 1, got context={context}, batch={batch}")
    work = work_fn(lut_dtype(lut))
    cache_len = context + config.num_meta_tokens
    kstep = kernel_step_used(config, lut, batch)
    total, by_op, scaled, extra = 0.0, {}, [], False
    for op, sig, count in model_pieces(config, kernel_step=kstep):
        # the per-step overhead (token copy, graph launch) does not depend on the batch: measured at batch 1
        r: Lookup = lut.lookup(op, sig, cache_len, 1 if op == "overhead" else batch, space=space, work=work)
        by_op[op] = by_op.get(op, 0.0) + count * r.ms
        total += count * r.ms
        extra |= r.extrapolated
        if r.how != "exact" and op not in scaled:
            scaled.append(op)
    return DecodePrediction(context, batch, total, 1e3 * batch / total, by_op, scaled, extra, kstep)


def predict_generate(config, lut: LUT, n_tokens: int = 8192, batch: int = 1, cache: str = "static",
                     points: int = 12, space: str = "linear") -> dict:
    """Predicted seconds to decode ``n_tokens`` tokens from an empty context.

    ``cache="static"``: the cache is allocated for ``n_tokens`` up front (hylo's engine), so every step costs the
    step at that cache length. ``cache="growing"``: the cache length follows the context (an engine that sizes
    its cache to the live context, as a dynamic KV cache does): the step time integrated over the context,
    sampled at ``points`` geometrically spaced lengths. With the kernel decode step (:func:`kernel_step_used`)
    attention reads only up to the position, so a static cache is integrated over positions as well."""
    if cache == "static" and not kernel_step_used(config, lut, batch):
        ms = predict_decode(config, lut, n_tokens, batch, space).ms_per_token
        return {"seconds": n_tokens * ms / 1e3, "tokens": n_tokens, "batch": batch, "cache": cache,
                "ms_per_token": ms}
    if cache not in ("static", "growing"):
        raise ValueError(f"cache must be 'static' or 'growing', got {cache!r}")
    ctxs = sorted({max(1, round(math.exp(math.log(n_tokens) * i / (points - 1)))) for i in range(points)})
    pts = [(c, predict_decode(config, lut, c, batch, space).ms_per_token) for c in ctxs]
    total = integrate_steps(pts, n_tokens)
    return {"seconds": total / 1e3, "tokens": n_tokens, "batch": batch, "cache": cache,
            "ms_per_token": total / n_tokens, **({"integrated": "kernel step"} if cache == "static" else {})}


# ----------------------------------------------------------------------------- throughput
def _measured_temp_per_row(lut: LUT, op: str, sig: dict, context: int) -> float | None:
    """Temporary bytes per row of one step of ``op`` with ``sig`` as the LUT measured them (``temp_bytes``,
    nearest context, largest batch); None when the table has none for that signature."""
    best = None
    for e in lut.entries:
        if e["op"] != op or e["sig"] != sig or "error" in e or not e.get("temp_bytes"):
            continue
        d = abs(math.log(max(e["context"], 1) / max(context, 1)))
        key = (d, -e["batch"])
        if best is None or key < best[0]:
            best = (key, e["temp_bytes"] / e["batch"])
    return float(best[1]) if best else None


def _temp_per_row(lut: LUT, op: str, sig: dict, cache_len: int, dtype: torch.dtype = torch.bfloat16) -> float:
    """Temporary bytes per row of one step of ``op`` at a cache of ``cache_len`` positions: measured for ``sig``,
    or, for a signature the table lacks, the measured value of the operator's signature (with the same kernels)
    nearest in the bytes one more row adds to a step (state and activations), scaled by that ratio; 0 when the
    table has none."""
    from .lut import kind_mismatch, effective_context

    got = _measured_temp_per_row(lut, op, sig, effective_context(op, sig, cache_len))
    if got is not None:
        return got
    work = work_fn(dtype)

    def per_row(s):
        c = effective_context(op, s, cache_len)
        return max(float(work(op, s, c, 2) - work(op, s, c, 1)), 1.0)

    target = per_row(sig)
    cands = []
    for g in lut.groups().values():
        if g["op"] != op:
            continue
        t = _measured_temp_per_row(lut, op, g["sig"], effective_context(op, g["sig"], cache_len))
        if t is not None:
            pr = per_row(g["sig"])
            cands.append(((kind_mismatch(sig, g["sig"]), abs(math.log(pr / target))), t * target / pr))
    return min(cands)[1] if cands else 0.0


def predict_max_batch(config, lut: LUT, context: int, memory_bytes: float | None = None, margin: float = 0.9,
                      cap: int | None = 1024) -> dict:
    """Largest batch that fits at ``context``: ``{"batch", "weights_bytes", "per_seq_bytes", "memory_bytes"}``.

    ``memory_bytes`` defaults to the LUT's ``meta.free_bytes`` (device memory free before anything was loaded)."""
    if memory_bytes is None:
        memory_bytes = lut.meta.get("free_bytes")
        if memory_bytes is None:
            raise ValueError("the LUT records no free_bytes (built on a CPU?): pass memory_bytes")
    dtype = lut_dtype(lut)
    mem = model_memory(config, context, dtype)
    cache_len = mem["cache_len"]
    temp = max([_temp_per_row(lut, op, sig, cache_len, dtype) for op, sig, _ in model_pieces(config)] or [0.0])
    per_seq = mem["state_bytes_per_seq"] + temp
    b = max_batch(memory_bytes, per_seq, mem["weights_bytes"], 0.0, margin, cap)
    return {"batch": b, "weights_bytes": mem["weights_bytes"], "per_seq_bytes": int(per_seq),
            "state_bytes_per_seq": mem["state_bytes_per_seq"], "temp_bytes_per_row": int(temp),
            "memory_bytes": int(memory_bytes), "margin": margin, "capped": cap is not None and b == cap}


def predict_throughput(config, lut: LUT, context: int, batch: int | None = None, memory_bytes: float | None = None,
                       margin: float = 0.9, cap: int | None = 1024, space: str = "linear") -> dict:
    """Generated tokens/s at ``context`` and ``batch`` (default: the largest batch that fits)."""
    info = None
    if batch is None:
        info = predict_max_batch(config, lut, context, memory_bytes, margin, cap)
        batch = info["batch"]
        if batch < 1:
            return {"context": context, "batch": 0, "tokens_per_s": 0.0, "ms_per_step": None, "max_batch": info}
    p = predict_decode(config, lut, context, batch, space)
    return {"context": context, "batch": batch, "tokens_per_s": p.tokens_per_s, "ms_per_step": p.ms_per_token,
            "max_batch": info, "scaled": p.scaled, "extrapolated": p.extrapolated}
