"""The timing helpers of the benchmark scripts: median milliseconds of a call (CUDA events on a GPU), a CUDA
graph captured after a side-stream warm-up, and kernel tables from torch.profiler."""

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


def capture(fn, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """``fn()`` captured as a CUDA graph, after ``warmup`` calls on a side stream (as PyTorch's docs require: lazy
    initialisation, autotuning and allocator warm-up must not happen during capture); replayed once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    return g


MATMUL_KERNELS = ("gemm", "gemv", "nvjet", "cublas", "cutlass", "splitk", "mm_")  # names of matrix-product kernels
# kernel families by name (first match wins), to say where a step's time goes
CATEGORIES = (("matmul", MATMUL_KERNELS), ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
              ("optimizer", ("adam", "multi_tensor", "foreach")), ("communication", ("nccl", "allreduce", "gloo")),
              ("inductor (fused elementwise/reductions)", ("triton_poi", "triton_per", "triton_red")),
              ("other triton (fla, hylo)", ("triton", "chunk", "_kernel")), ("copy", ("copy", "memcpy", "memset")))


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other (eager elementwise, ...)"


def kernel_table(fn, top: int = 12) -> dict:
    """The kernels of one call of ``fn`` (after one untimed call): how many, their summed busy time, the time of
    the matrix-product kernels among them, and the ``top`` costliest by name. On the CPU, operators stand in for
    kernels (the numbers then only check the script)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    kernels: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == kind:
            k = kernels.setdefault(e.name, [0, 0.0])
            k[0] += 1
            k[1] += (e.device_time_total if cuda else e.self_cpu_time_total) / 1e3
    mm = [v for n, v in kernels.items() if any(t in n.lower() for t in MATMUL_KERNELS)]
    worst = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]
    cats: dict[str, float] = {}
    for n, (_, t) in kernels.items():
        cats[category(n)] = cats.get(category(n), 0.0) + t
    return {"kernels": sum(v[0] for v in kernels.values()), "kernel_ms_sum": sum(v[1] for v in kernels.values()),
            "matmul_kernels": sum(v[0] for v in mm), "matmul_ms": sum(v[1] for v in mm),
            "ms_by_category": {k: round(v, 4) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:120], "calls": c, "ms": round(t, 4)} for n, (c, t) in worst]}
