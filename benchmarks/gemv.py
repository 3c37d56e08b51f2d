"""Batch-1 matrix-vector products on a GPU: how close do they get to the copy bandwidth? Call:

    python benchmarks/gemv.py --out $OUT/gemv.json        # ~1 min on H100 (autotuning)

Why: hylo's compiled decode step for Qwen3-0.6B's shape spends >= 0.92 ms of its 1.44 ms in cuBLAS matrix
products that read 1.19 GB, about 44% of the copy bandwidth (benchmarks/results/qwen3-vs-transformers-h100.json).
This times ``y = x W^T`` for ``x [1, K]`` and that model's weight shapes (bf16) three ways:
- ``cublas``: ``F.linear``;
- ``inductor``: ``torch.compile(F.linear, mode="max-autotune-no-cudagraphs")`` (inductor's own Triton templates
  compete with cuBLAS);
- ``triton_gemv``: a plain Triton kernel (rows of W per program, a loop over K, autotuned block sizes), hylo's
  opt-in decode path (``hylo.ops.gemv``, ``HYLO_GEMV=on``), called through its custom op ``hylo::gemv``.
Each is timed as a CUDA graph of ``--calls`` back-to-back products (launch overhead amortised as in a decode
graph), median of 5 replays; results in microseconds and GB/s against the copy bandwidth measured in the same run.
The products cycle through copies of the weight totalling >= 256 MB, five times the H100's 50 MB L2, because a
decode step reads every layer's weights once: timing one small matrix over and over reads it from L2 (the first
H100 run did that; its numbers are kept in benchmarks/results/gemv-h100-l2-resident-partial.json).
Every method is checked against a float32 product first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hylo.ops import gemv as hylo_gemv  # noqa: E402
from timing import capture  # noqa: E402  (benchmarks/timing.py)

# Qwen3-0.6B decode step: qkv, o, gate_up, down (x28 layers) and the tied LM head
SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072),
          "lm_head": (151936, 1024)}


def triton_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """hylo's decode GEMV (the op ``hylo::gemv``)."""
    return hylo_gemv.gemv(x, w)


def graph_us(fn, ws: list, calls: int) -> float:
    """Median microseconds per call of ``fn(w)`` replayed ``calls`` times inside one CUDA graph, cycling through
    the weights ``ws``."""
    def all_calls():
        for i in range(calls):
            fn(ws[i % len(ws)])
    g = capture(all_calls, warmup=1)
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write counted)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        b.copy_(a)
    e1.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (e0.elapsed_time(e1) / 1e3) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemv.py needs a CUDA device")
    from hylo.runinfo import versions

    torch.manual_seed(0)
    res = {"kind": "gemv", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": torch.cuda.get_device_name(),
           "versions": versions(), "dtype": "bfloat16", "calls_per_graph": args.calls, "shapes": {}, "errors": []}
    bw = copy_bandwidth()
    res["copy_bandwidth_GBps"] = bw
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w.float().t()
        rec: dict = {"N": N, "K": K, "bytes": N * K * 2}
        ws = [w] + [w.clone() for _ in range(min(args.calls, -(-(256 << 20) // rec["bytes"])) - 1)]
        rec["weight_copies"] = len(ws)
        methods = {"cublas": lambda w, x=x: F.linear(x, w)}
        try:
            comp = torch.compile(lambda x, w: F.linear(x, w), mode="max-autotune-no-cudagraphs", dynamic=False)
            comp(x, w)
            methods["inductor"] = lambda w, x=x, c=comp: c(x, w)
        except Exception as e:  # noqa: BLE001
            res["errors"].append({"shape": name, "method": "inductor", "error": f"{type(e).__name__}: {e}"[:300]})
        if hylo_gemv.triton is not None:
            methods["triton_gemv"] = lambda w, x=x: triton_gemv(x, w)
        for m, fn in methods.items():
            try:
                out = fn(w).float()
                err = ((out - ref).norm() / ref.norm()).item()
                us = graph_us(fn, ws, args.calls)
                gbps = rec["bytes"] / (us / 1e6) / 1e9
                rec[m] = {"us": us, "GBps": gbps, "of_copy_bw": gbps / bw, "rel_l2_vs_fp32": err}
            except Exception as e:  # noqa: BLE001
                rec[m] = {"error": f"{type(e).__name__}: {e}"[:300]}
        if "triton_gemv" in rec and hasattr(hylo_gemv.kernel(), "best_config"):
            rec["triton_gemv"]["config"] = str(hylo_gemv.kernel().best_config)
        res["shapes"][name] = rec
        print(name, json.dumps({m: {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
                                for m, r in rec.items() if isinstance(r, dict)}), flush=True)
        args.out.write_text(json.dumps(res, indent=1))
    # one decode step's products: 28 layers of qkv/o/gate_up/down plus the head
    step = {}
    for m in ("cublas", "inductor", "triton_gemv"):
        try:
            step[m] = sum(28 * res["shapes"][s][m]["us"] for s in ("qkv", "o", "gate_up", "down")) \
                + res["shapes"]["lm_head"][m]["us"]
        except (KeyError, TypeError):
            pass
    res["qwen3_step_matmul_us"] = step
    res["qwen3_step_floor_us"] = sum((28 if s != "lm_head" else 1) * res["shapes"][s]["bytes"]
                                     for s in SHAPES) / bw / 1e3
    args.out.write_text(json.dumps(res, indent=1))
    print("step matmul us:", {k: round(v, 1) for k, v in step.items()}, "floor us:",
          round(res["qwen3_step_floor_us"], 1), f"-> {args.out}")


if __name__ == "__main__":
    main()
