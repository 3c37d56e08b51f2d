"""The one timing helper of the benchmark scripts: median milliseconds of a call, CUDA events on a GPU."""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, rep: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``rep`` calls after ``warmup`` calls: CUDA events when CUDA is
    available (each call synchronized), the host clock otherwise."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)
