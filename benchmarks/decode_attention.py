"""GPU check of hylo.ops.decode_attention (HYLO_DECODE_ATTN; not run on a GPU yet): correctness against the
float32 reference on CUDA, then CUDA-graphed timings of the Triton op against the matmul path Attention.step uses today (mask build + two grouped
matmuls + softmax), per layer, at the Qwen3-0.6B shape (H=16, Hkv=8, Dh=128, bf16).

    python benchmarks/decode_attention.py [--out decode-attn.json]       # on a GPU (~1 min)
    TRITON_INTERPRET=1 python benchmarks/decode_attention.py --smoke    # CPU: that the script runs
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hylo.layers.attention import decode_attention as matmul_path  # noqa: E402
from hylo.ops import decode_attention as DA  # noqa: E402
from hylo.runinfo import versions  # noqa: E402
from timing import capture  # noqa: E402  (benchmarks/timing.py)


def inputs(B, H, Hkv, L, Dh, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, 1, Dh, generator=g, device=device).to(dtype)
    k = torch.randn(B, Hkv, L, Dh, generator=g, device=device).to(dtype)
    v = torch.randn(B, Hkv, L, Dh, generator=g, device=device).to(dtype)
    return q, k, v


def baseline(q, k, v, pos):
    valid = torch.arange(k.shape[2], device=q.device)[None, :] <= pos[:, None]
    return matmul_path(q, k, v, valid[:, None, None, :])


def graphed_ms(fn, iters=200):
    """Mean ms of one call replayed from a CUDA graph (the decode step's setting)."""
    graph = capture(fn)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--out")
    a = ap.parse_args()
    device = "cpu" if a.smoke else "cuda"
    results = {"kind": "decode_attention", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "versions": versions(),
               "check": [], "time": []}

    # correctness: every group size, both dtypes, head sizes, one split and many, ragged positions
    shapes = ([(2, 4, 2, 40, 32)] if a.smoke else
              [(1, 16, 8, 300, 128), (3, 16, 8, 4096, 128), (1, 32, 4, 32768, 128), (2, 8, 8, 1000, 64),
               (4, 16, 2, 2048, 256), (1, 8, 1, 777, 16)])
    for B, H, Hkv, L, Dh in shapes:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            q, k, v = inputs(B, H, Hkv, L, Dh, dtype, device)
            pos = torch.tensor([0, L - 1, L // 3, 5 * L][:B], device=device)
            out, ref = DA.decode_attention(q, k, v, pos), DA.decode_attention_ref(q, k, v, pos)
            err = (out.float() - ref.float()).abs().max()
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            results["check"].append({"shape": [B, H, Hkv, L, Dh], "dtype": str(dtype), "max_err": float(err),
                                     "splits": DA.num_splits(L, B * Hkv), "ok": bool(err <= tol)})
            print(results["check"][-1], flush=True)

    if not a.smoke:  # per-layer time at the Qwen3-0.6B shape: positions 128..full, caches 2k and 32k, batch 1 and 4
        for B, L in [(1, 2048), (4, 2048), (1, 32768)]:
            q, k, v = inputs(B, 16, 8, L, 128, torch.bfloat16, device)
            for p in sorted({128, 1024, L - 1} & set(range(L))):
                pos = torch.full((B,), p, device=device)
                row = {"B": B, "L": L, "pos": p, "splits": DA.num_splits(L, B * 8),
                       "triton_ms": graphed_ms(lambda: DA.decode_attention(q, k, v, pos)),
                       "matmul_ms": graphed_ms(lambda: baseline(q, k, v, pos))}
                kv_bytes = 2 * B * 8 * (p + 1) * 128 * 2
                row["triton_GBps"] = kv_bytes / row["triton_ms"] / 1e6
                results["time"].append(row)
                print(row, flush=True)
    if a.out:  # written before the verdict, so a failing check keeps its numbers
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    assert all(c["ok"] for c in results["check"]), "a kernel output differs from the reference"


if __name__ == "__main__":
    main()
