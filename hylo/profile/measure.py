"""Measurements on a device: decode latency, time to generate N tokens, prefill latency, throughput at the largest
batch that fits, memory, and the per-operator LUT (:func:`build_lut`).

Timing (CUDA): warm up first, then per repeat time ``iters`` calls between two CUDA events and take the median
over repeats of the mean per call. Whole-model decode steps go through :class:`hylo.engine.DecodeRunner` (one
CUDA graph per runner; ``runner.step`` as the engine calls it; ``kernel_step`` in a result says whether the
runner took :mod:`hylo.engine.kernel_step`, the default for attention + FFN models on CUDA). LUT entries time
one piece's step captured in a CUDA graph over several copies of the piece (distinct weights and states,
together larger than the L2 cache, so weights come from device memory as they do in a whole model), replayed
``iters`` times behind a GPU sleep so the host enqueues every replay before the GPU starts: the entry is GPU time
per call.

On the CPU everything runs eagerly (no graphs, ``time.perf_counter``), slowly and meaninglessly for a GPU, but
the same code path: tests run the whole flow on tiny models.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Callable, Iterable

import torch

from ..engine.runner import DecodeRunner, reset_cache
from .lut import LUT, effective_context, model_pieces, switch_key
from .pieces import make_piece, state_bytes, weight_bytes
from .predict import integrate_steps, max_batch

SLEEP_CYCLES = 50_000_000  # ~25-35 ms of GPU sleep before a timed batch of graph replays
OOM = torch.OutOfMemoryError


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def cleanup(device, collect: bool = True) -> None:
    """Give freed device memory back (CUDA), so free-memory readings and the next allocation see it."""
    if is_cuda(device):
        if collect:
            gc.collect()
        torch.cuda.empty_cache()


def time_calls(fn: Callable[[], object], device, iters: int, repeats: int = 3, warmup: int = 1,
               setup: Callable[[], object] | None = None, gpu_only: bool = False) -> float:
    """Median over ``repeats`` of the mean milliseconds per call of ``fn`` over ``iters`` calls.

    ``setup`` runs before the warm-up and before each repeat, outside the timed region (e.g. put the cache back
    at a context). ``gpu_only`` (CUDA): a GPU sleep before the start event lets the host enqueue every call
    first, so host overhead between calls is not counted (for pieces measured in isolation)."""
    if iters < 1 or repeats < 1:
        raise ValueError(f"iters and repeats must be >= 1, got {iters}, {repeats}")
    cuda = is_cuda(device)
    if warmup:
        if setup:
            setup()
        for _ in range(warmup):
            fn()
        sync(device)
    times = []
    for _ in range(repeats):
        if setup:
            setup()
        if cuda:
            sync(device)
            if gpu_only and hasattr(torch.cuda, "_sleep"):
                torch.cuda._sleep(SLEEP_CYCLES)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append(1e3 * (time.perf_counter() - t0) / iters)
    return statistics.median(times)


def capture_graph(fn: Callable[[], object], device, warmup: int = 2) -> "torch.cuda.CUDAGraph":
    """``fn`` captured as a CUDA graph, after warm-up calls on a side stream (as torch.cuda.graphs requires)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def _peak_reset(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if is_cuda(device) else None


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _tokens(model, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (batch,), generator=g).to(_device(model))


# ----------------------------------------------------------------------------- whole model
@torch.no_grad()
def decode_latency(model, context: int, batch: int = 1, steps: int = 64, repeats: int = 3,
                   cuda_graph: bool | None = None) -> dict:
    """ms per decode step with a cache of ``context`` tokens (the last ``steps`` positions of it), ``batch`` rows.

    Attention's step reads its whole preallocated cache, so this is the cost at any position of that cache."""
    dev = _device(model)
    _peak_reset(dev)
    runner = DecodeRunner(model, batch, context, cuda_graph)
    n = max(1, min(steps, context))
    start = context - n
    tok = _tokens(model, batch)
    ms = time_calls(lambda: runner.step(tok), dev, iters=n, repeats=repeats, warmup=n,
                    setup=lambda: runner.set_positions(start))
    out = {"context": context, "batch": batch, "ms_per_token": ms, "tokens_per_s": 1e3 * batch / ms,
           "graphed": runner.graphed, "kernel_step": runner.kernel_step, "steps": n, "peak_bytes": _peak(dev)}
    del runner
    cleanup(dev)
    return out


@torch.no_grad()
def generate_time(model, n_tokens: int = 8192, batch: int = 1, steps: int = 64, repeats: int = 3,
                  points: int = 3, direct: bool = False, cuda_graph: bool | None = None) -> dict:
    """Seconds to decode ``n_tokens`` tokens per row from an empty context, with a cache of ``n_tokens``.

    ``direct=False``: ms per step measured over ``steps`` steps at ``points`` evenly spaced positions of the cache
    and integrated over positions 0..n_tokens (trapezoid); ``direct=True``: all ``n_tokens`` steps timed once."""
    dev = _device(model)
    runner = DecodeRunner(model, batch, n_tokens, cuda_graph)
    tok = _tokens(model, batch)
    k = max(1, min(steps, n_tokens))
    if direct:
        ms_total = time_calls(lambda: runner.step(tok), dev, iters=n_tokens, repeats=1, warmup=k,
                              setup=runner.reset) * n_tokens
        res = {"method": f"direct: all {n_tokens} steps from an empty cache timed once", "points": []}
    else:
        starts = sorted({round(i * (n_tokens - k) / max(points - 1, 1)) for i in range(points)})
        pts = []
        for s in starts:
            ms = time_calls(lambda: runner.step(tok), dev, iters=k, repeats=repeats, warmup=k,
                            setup=lambda s=s: runner.set_positions(s))
            pts.append((s + k / 2, ms))
        ms_total = integrate_steps(pts, n_tokens)
        res = {"method": f"integrated: ms/token over {k} steps at positions {starts} of a {n_tokens}-token cache, "
                         f"trapezoid over positions 0..{n_tokens}",
               "points": [{"position": p, "ms_per_token": m} for p, m in pts]}
    kstep = runner.kernel_step
    del runner
    cleanup(dev)
    return {"tokens": n_tokens, "batch": batch, "seconds": ms_total / 1e3, "ms_per_token": ms_total / n_tokens,
            "kernel_step": kstep, **res}


@torch.no_grad()
def prefill_latency(model, length: int, batch: int = 1, chunk: int = 0, repeats: int = 3) -> dict:
    """ms to prefill ``length`` tokens into a static cache (``model.hidden_states(ids, cache=cache)``, in chunks of
    ``chunk`` tokens, 0 = one call) and compute the last token's logits. The first call (kernel compilation)
    is a warm-up."""
    dev = _device(model)
    cache = model.new_cache(batch, length)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g).to(dev)
    step = chunk if chunk and chunk > 0 else length

    def run():
        h = None
        for s in range(0, length, step):
            h = model.hidden_states(ids[:, s:s + step], cache=cache)
        return model.logits(h[:, -1])

    ms = time_calls(run, dev, iters=1, repeats=repeats, warmup=1, setup=lambda: reset_cache(model, cache))
    del cache
    cleanup(dev)
    return {"tokens": length, "batch": batch, "chunk": step, "ms": ms, "tokens_per_s": 1e3 * batch * length / ms}


@torch.no_grad()
def probe_row_bytes(model, context: int, extra: int = 0) -> dict:
    """Memory per row of a decode step at ``context`` (CUDA): the state of one sequence plus the step's temporary
    memory per row, from the peak of one eager step at batch 1 and at batch 2."""
    dev = _device(model)
    n = model.num_meta_tokens
    temps, state = [], 0
    for b in (1, 2):
        cache = model.new_cache(b, context + extra)
        cache.pos.fill_(n + context)
        cache.seq_len = n + context
        if b == 1:
            state = cache.nbytes()
        tok = _tokens(model, b)
        model.decode_step(tok, cache)  # warm (kernel selection at this shape)
        cache.pos.fill_(n + context)
        cache.seq_len = n + context
        _peak_reset(dev)
        base = torch.cuda.memory_allocated(dev)
        model.decode_step(tok, cache)
        torch.cuda.synchronize(dev)
        temps.append(torch.cuda.max_memory_allocated(dev) - base)
        del cache
        cleanup(dev)
    per_row_temp = max(temps[1] - temps[0], 0)
    return {"state_bytes_per_seq": int(state), "temp_bytes_per_row": int(per_row_temp),
            "per_row_bytes": int(state + per_row_temp), "fixed_bytes": int(max(temps[0] - per_row_temp, 0))}


@torch.no_grad()
def throughput(model, context: int, batch: int | None = None, steps: int = 32, repeats: int = 3,
               margin: float = 0.9, cap: int = 1024, cuda_graph: bool | None = None) -> dict:
    """Generated tokens/s with every row's cache at ``context`` tokens, at ``batch`` rows or (None) the largest
    batch that fits: free memory x ``margin`` over (state + step temporaries) per row, at most ``cap``. A batch
    that still runs out of memory is cut by 30% and retried (``oom_retries``)."""
    dev = _device(model)
    info: dict = {}
    if batch is None:
        if is_cuda(dev):
            cleanup(dev)
            probe = probe_row_bytes(model, context, steps)
            free, total = torch.cuda.mem_get_info(dev)
            batch = max_batch(free, probe["per_row_bytes"], 0, probe["fixed_bytes"], margin, cap)
            info = {**probe, "free_bytes": int(free), "margin": margin, "max_batch_estimate": batch,
                    "cap": cap, "capped": batch == cap}
        else:
            batch = cap
            info = {"max_batch_estimate": None, "cap": cap, "capped": True,
                    "note": "CPU: batch = the cap, not a memory fit"}
        if batch < 1:
            return {"context": context, "batch": 0, "error": "not even one row fits in memory", **info}
    retries, last_err = 0, None
    while batch >= 1:
        runner = None
        try:
            _peak_reset(dev)
            runner = DecodeRunner(model, batch, context + steps, cuda_graph)
            tok = _tokens(model, batch)
            ms = time_calls(lambda: runner.step(tok), dev, iters=steps, repeats=repeats, warmup=min(steps, 4),
                            setup=lambda: runner.set_positions(context))
            out = {"context": context, "batch": batch, "ms_per_step": ms, "tokens_per_s": 1e3 * batch / ms,
                   "steps": steps, "graphed": runner.graphed, "oom_retries": retries, "peak_bytes": _peak(dev),
                   **info}
            del runner
            cleanup(dev)
            return out
        except OOM as e:
            last_err = str(e).splitlines()[0][:200]
        runner = None
        cleanup(dev)  # after the except clause, once the traceback no longer holds the failed run's tensors
        retries += 1
        if batch == 1 or retries > 5:
            break
        batch = max(1, int(batch * 0.7))
    return {"context": context, "batch": batch, "error": f"out of memory: {last_err}", "oom_retries": retries, **info}


def memory_summary(model, contexts: Iterable[int]) -> dict:
    """Weights (each storage once: tied weights count once) and decode state per sequence at each context."""
    seen, wbytes = set(), 0
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.device)
        if key in seen:
            continue
        seen.add(key)
        wbytes += p.numel() * p.element_size()
    dtype = next(model.parameters()).dtype
    n = model.num_meta_tokens
    st = {str(c): int(sum(b.mixer.state_bytes(c + n, dtype) for b in model.layers)) for c in contexts}
    return {"weights_bytes": int(wbytes), "parameters": int(sum(p.numel() for p in model.parameters())),
            "num_meta_tokens": n, "state_bytes_per_seq": st}


# ----------------------------------------------------------------------------- the LUT
def lut_points(configs, contexts: Iterable[int], batches: Iterable[int],
               kernel_step: bool = False) -> list[tuple[str, dict, int, int]]:
    """``(op, sig, context, batch)`` to measure so that every piece of these models has entries over the grid
    (context-free pieces at one context; sliding windows at min(window, context); ``overhead`` at batch 1);
    ``kernel_step``: also the kernel decode step's pieces of the models it applies to, at the batches it takes."""
    from ..engine.kernel_step import config_applicable

    contexts, batches = list(contexts), list(batches)
    seen, out = set(), []
    for cfg in configs:
        plans = [(model_pieces(cfg), batches)]
        kb = [b for b in batches if config_applicable(cfg, b)] if kernel_step else []
        if kb:
            plans.append((model_pieces(cfg, kernel_step=True), kb))
        for pieces, bs in plans:
            for op, sig, _ in pieces:
                for c in contexts:
                    for b in ([1] if op == "overhead" else bs):
                        key = (op, repr(sorted(sig.items())), effective_context(op, sig, c), b)
                        if key not in seen:
                            seen.add(key)
                            out.append((op, sig, effective_context(op, sig, c), b))
    return out


def kernel_step_taken(device) -> bool:
    """Whether a runner on ``device`` takes :mod:`hylo.engine.kernel_step` where a model allows it: the switch
    is on and the runner's GEMV would be (``HYLO_GEMV``: ``on``, or ``auto`` on a device the kernel supports)."""
    from ..engine import kernel_step
    from ..ops import gemv

    return kernel_step.get_kernel_step() == "on" and gemv.enabled(torch.device(device))


def _measure_overhead(device, iters: int, repeats: int) -> float:
    """Per decode step outside the layers: the token copy, the graph launch and the position update."""
    pos = torch.zeros(1, dtype=torch.long, device=device)
    src = torch.zeros(1, dtype=torch.long, device=device)
    dst = torch.zeros(1, dtype=torch.long, device=device)
    if not is_cuda(device):
        return time_calls(lambda: (dst.copy_(src), pos.add_(1)), device, iters, repeats)
    g = capture_graph(lambda: pos.add_(1), device)

    def step():
        dst.copy_(src, non_blocking=True)
        g.replay()

    return time_calls(step, device, iters, repeats, warmup=3, gpu_only=True)


def _copies(wbytes: float, sbytes: float, target: float, max_copies: int) -> int:
    return int(min(max_copies, max(1, math.ceil(target / max(wbytes + sbytes, 1.0)))))


@torch.no_grad()
def build_lut(configs, contexts: Iterable[int], batches: Iterable[int], device="cuda",
              dtype: torch.dtype = torch.bfloat16, lut: LUT | None = None, repeats: int = 3,
              mem_fraction: float = 0.5, l2_multiple: float = 4.0, max_copies: int = 16, target_ms: float = 20.0,
              log: Callable[[str], None] | None = None, time_limit_s: float | None = None,
              kernel_step: bool | None = None, keep_stale: bool = False) -> LUT:
    """Measure the LUT entries the pieces of ``configs`` need over ``contexts`` x ``batches`` (those already in
    ``lut`` are kept). A point whose state would exceed ``mem_fraction`` of free memory is recorded as skipped;
    a failing point is recorded with its error; neither stops the build. ``time_limit_s`` stops early (the
    table is usable as it is). ``kernel_step`` (default: where a runner on ``device`` would take it): also the
    kernel decode step's pieces (``kattn``, ``kswa``, ``kffn``, ``khead``).

    Each measured entry records the switches it ran under (:func:`hylo.profile.lut.switch_key`) and the commit.
    Entries of ``lut`` measured with a switch set otherwise (say ``HYLO_GEMV_PRELOAD``) are measured again unless
    ``keep_stale``; entries that record no switches (tables from before) are kept."""
    from .report import environment

    lut = lut if lut is not None else LUT()
    cuda = is_cuda(device)
    env = environment(device)
    switches = env["versions"].get("switches", {})
    skey = switch_key(switches)
    sets = lut.meta.setdefault("switch_sets", {})
    sets[skey] = switches

    def stale(e: dict) -> bool:  # a switch both sets name differs (one the entry's set lacks is no evidence)
        old = sets.get(e.get("switches", skey), switches)
        return any(old[n] != v for n, v in switches.items() if n in old)
    if not keep_stale:
        n = lut.remove(stale)
        if n and log:
            log(f"LUT: {n} entries measured under other switches are measured again")

    def record(entry: dict) -> None:
        lut.add({**entry, "switches": skey, "commit": env["versions"].get("commit")})
    lut.meta.setdefault("created", env["date"])
    lut.meta.update({"device": env["device"], "versions": env["versions"],
                     "dtype": str(dtype).replace("torch.", ""), "updated": env["date"],
                     "timing": "CUDA graph over copies of the piece (together > L2), replayed behind a GPU sleep; "
                               "median of repeats" if cuda else "eager, time.perf_counter (CPU)"})
    if cuda:
        cleanup(device)
        free, total = torch.cuda.mem_get_info(device)
        lut.meta.setdefault("free_bytes", int(free))
        lut.meta["total_bytes"] = int(total)
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
        target = max(l2 * l2_multiple, 64 << 20)
    else:
        target, max_copies = 0, 1
    db = torch.empty((), dtype=dtype).element_size()
    if kernel_step is None:
        kernel_step = kernel_step_taken(device)
    todo = [p for p in lut_points(configs, contexts, batches, kernel_step)
            if not lut.has(p[0], p[1], p[2], p[3])]
    t_start = time.perf_counter()
    done = 0
    # small batches of every piece first, so that a build cut by the time limit still covers every operator
    for tier in ([p for p in todo if p[3] <= 16], [p for p in todo if p[3] > 16]):
        by_sig: dict[str, list] = {}
        for op, sig, c, b in tier:
            by_sig.setdefault(repr((op, sorted(sig.items()))), []).append((op, sig, c, b))
        for pts in by_sig.values():
            op, sig = pts[0][0], pts[0][1]
            if op == "overhead":
                ms = _measure_overhead(device, iters=200 if cuda else 20, repeats=repeats)
                record({"op": op, "sig": {}, "context": 0, "batch": 1, "ms": ms})
                done += 1
                continue
            wb = weight_bytes(op, sig, db)
            pts = sorted(pts, key=lambda p: (p[3] * state_bytes(op, sig, max(p[2], 1), dtype), p[2], p[3]))
            k_max = max(_copies(wb, p[3] * state_bytes(op, sig, max(p[2], 1), dtype), target, max_copies)
                        for p in pts)
            try:
                with torch.device(device):
                    mods = [make_piece(op, sig).to(dtype).eval() for _ in range(k_max)]
            except Exception as e:  # noqa: BLE001
                for _, _, c, b in pts:
                    record({"op": op, "sig": sig, "context": c, "batch": b,
                            "error": f"{type(e).__name__}: {e}"[:300]})
                cleanup(device)
                continue
            for _, _, c, b in pts:
                if time_limit_s is not None and time.perf_counter() - t_start > time_limit_s:
                    if log:
                        log(f"LUT: time limit {time_limit_s:.0f} s reached after {done} of {len(todo)} points")
                    del mods
                    cleanup(device)
                    lut.meta["incomplete"] = f"time limit reached after {done} of {len(todo)} points"
                    return lut
                entry = _measure_point(mods, op, sig, c, b, device, dtype, wb, target, max_copies, mem_fraction,
                                       repeats, target_ms)
                record(entry)
                done += 1
                if log:
                    msg = f"{entry['ms']:.4f} ms" if "ms" in entry else entry["error"][:80]
                    log(f"LUT {done}/{len(todo)} {op} D={sig.get('hidden_size', '-')} ctx={c} B={b}: {msg}")
            del mods
            cleanup(device)
    lut.meta.pop("incomplete", None)
    return lut


def _measure_point(mods, op, sig, c, b, device, dtype, wb, target, max_copies, mem_fraction, repeats,
                   target_ms) -> dict:
    cuda = is_cuda(device)
    ctx = max(c, 1)
    sb = state_bytes(op, sig, ctx, dtype)
    k = min(len(mods), _copies(wb, b * sb, target, max_copies))
    entry = {"op": op, "sig": sig, "context": c, "batch": b}
    if cuda:
        free, _ = torch.cuda.mem_get_info(device)
        need = k * b * sb
        if need > mem_fraction * free:
            return {**entry, "error": f"skipped: {k} x {need / k / 2**30:.2f} GiB of state is more than "
                                      f"{mem_fraction:.0%} of free memory ({free / 2**30:.1f} GiB)", "skipped": True}
    states = x = pos = graph = None
    try:
        states = [m.init_state(b, ctx, device=device, dtype=dtype) for m in mods[:k]]
        x = mods[0].inputs(b, device, dtype)
        pos = torch.full((b,), ctx - 1, dtype=torch.long, device=device)
        # at least 8 calls per replay, to amortise the graph launch, unless one call already moves > 1 GB
        reps = (1 if k * (wb + b * sb) > 1e9 else max(1, math.ceil(8 / k))) if cuda else 1

        def calls():
            for _ in range(reps):
                for m, st in zip(mods[:k], states):
                    m.step(x, st, pos)

        temp = None
        if cuda:
            mods[0].step(x, states[0], pos)  # kernel selection / compilation at this shape
            _peak_reset(device)
            base = torch.cuda.memory_allocated(device)
            mods[0].step(x, states[0], pos)
            torch.cuda.synchronize(device)
            temp = int(torch.cuda.max_memory_allocated(device) - base)
            graph = capture_graph(calls, device)
            one = time_calls(graph.replay, device, iters=1, repeats=1, warmup=1, gpu_only=True)
            iters = int(min(200, max(3, math.ceil(target_ms / max(one, 1e-3)))))
            ms = time_calls(graph.replay, device, iters=iters, repeats=repeats, warmup=1, gpu_only=True)
        else:
            iters = 2
            ms = time_calls(calls, device, iters=iters, repeats=max(1, min(repeats, 2)), warmup=1)
        return {**entry, "ms": ms / (reps * k), "copies": k, "calls_per_replay": reps * k, "iters": iters,
                "temp_bytes": temp}
    except OOM as e:
        return {**entry, "error": f"out of memory: {str(e).splitlines()[0][:200]}"}
    except Exception as e:  # noqa: BLE001  (one failing point is recorded, not fatal)
        return {**entry, "error": f"{type(e).__name__}: {e}"[:300]}
    finally:
        del states, x, pos, graph
        if cuda:
            cleanup(device, collect=False)
