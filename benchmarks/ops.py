"""Every operator, fast CUDA path against the PyTorch reference, at realistic shapes. One call:

    python benchmarks/ops.py --out benchmarks/results/ops-h100.json

For each operator (one hylo layer at hidden D, batch B, length T, bf16):
- correctness: the fast path in bf16 against the reference path in float32 (same weights, same input):
  relative error ||fast - ref|| / ||ref|| of the output, of the input gradient and of the worst parameter
  gradient (goal: <= 2e-2);
- speed (median of CUDA-event timings): forward, forward+backward, and one decode step at context T
  (eager and replayed as a CUDA graph);
- for the gated linear operators, which backward ran (fla's own, or hylo's where fla refuses).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hylo.config import HyloConfig  # noqa: E402
from hylo.layers import layer_class  # noqa: E402
from hylo.ops.backend import backend  # noqa: E402
from timing import capture, median_ms  # noqa: E402  (benchmarks/timing.py)
from hylo.runinfo import versions  # noqa: E402

OPS = ["attn", "swa", "mamba2", "deltanet", "gdn", "jet", "ffn"]




def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_config(D: int) -> HyloConfig:
    heads = D // 128
    return HyloConfig(vocab_size=1024, hidden_size=D, layers=" ".join(OPS), attn_num_heads=heads * 2,
                      attn_num_kv_heads=max(1, heads // 2), swa_window=512, mamba2_head_dim=64,
                      mamba2_state_size=128, deltanet_num_heads=heads, gdn_num_heads=heads, jet_num_heads=heads)


def gated_backward(op: str) -> str | None:
    """Which backward the gated linear operators take here (HYLO_GATED_BWD, see hylo.ops.chunk_bwd)."""
    if op not in ("mamba2", "gdn", "jet"):
        return None
    from hylo.ops.chunk_bwd import gated_bwd_mode

    mode = gated_bwd_mode()
    if mode != "auto":
        return mode
    if op == "mamba2":
        from hylo.ops.ssd import fla_backward_supported
        own = fla_backward_supported(False)
    else:
        from hylo.ops.delta_rule import fla_gated_backward_supported
        own = fla_gated_backward_supported(None, None, None, None, None)
    return "fla" if own else "triton (fla's kernels + hylo's dqkwg)"


def bench_op(op: str, cfg: HyloConfig, B: int, T: int) -> dict:
    torch.manual_seed(0)
    dev = "cuda"
    layer = layer_class(op)(cfg, 0).to(dev)
    if hasattr(layer, "reset_parameters"):
        layer.reset_parameters()
    with torch.no_grad():  # random weights everywhere (zero-initialised parts too), exactly representable in bf16
        for p in layer.parameters():
            p.add_(0.02 * torch.randn_like(p))
            p.copy_(p.bfloat16().float())
    x = torch.randn(B, T, cfg.hidden_size, device=dev).bfloat16().float()
    gy = torch.randn(B, T, cfg.hidden_size, device=dev).bfloat16().float()
    res: dict = {"op": op, "B": B, "T": T, "D": cfg.hidden_size,
                 "params": sum(p.numel() for p in layer.parameters())}
    if gated_backward(op):
        res["gated_backward"] = gated_backward(op)

    # --- reference: float32 weights and activations, reference path
    with backend("ref"):
        xr = x.clone().requires_grad_()
        y_ref = layer(xr)
        y_ref.backward(gy)
    y_ref = y_ref.detach()
    ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    ref_gx = xr.grad.clone()
    layer.zero_grad(set_to_none=True)
    del xr

    # --- fast: the same weights in bf16, fast path
    fast = layer.to(torch.bfloat16)
    xb = x.to(torch.bfloat16).requires_grad_()
    gyb = gy.to(torch.bfloat16)
    with backend("fast"):
        yb = fast(xb)
        yb.backward(gyb)
    res["rel_err_out"] = rel(yb.float(), y_ref)
    res["rel_err_grad_x"] = rel(xb.grad.float(), ref_gx)
    worst = max(((rel(p.grad.float(), ref_grads[n]), n) for n, p in fast.named_parameters()
                 if p.grad is not None and n in ref_grads), default=(0.0, ""))
    res["rel_err_grad_params_worst"], res["worst_param"] = worst
    fast.zero_grad(set_to_none=True)
    del yb, y_ref, ref_grads

    # --- timings (fast path, bf16)
    with backend("fast"):
        xb2 = x.to(torch.bfloat16)
        with torch.no_grad():
            res["fwd_ms"] = median_ms(lambda: fast(xb2))
        xg = xb2.clone().requires_grad_()

        def fwd_bwd():
            fast(xg).backward(gyb)

        res["fwd_bwd_ms"] = median_ms(fwd_bwd)
        fast.zero_grad(set_to_none=True)
        # decode step at context T (state filled by a prefill of T-1 tokens)
        with torch.no_grad():
            st = fast.init_state(1, T + 1, device=dev, dtype=torch.bfloat16)
            fast(xb2[:1, : T - 1], st, 0)
            x1 = xb2[:1, T - 1 : T].clone()
            pos = torch.full((1,), T - 1, device=dev, dtype=torch.long)
            snapshot = {k: v.clone() for k, v in st.items()}

            def step():
                return fast.step(x1, st, pos)

            res["step_ms_eager"] = median_ms(step, rep=50)
            for k in st:
                st[k].copy_(snapshot[k])
            try:
                g = capture(step)
                res["step_ms_graph"] = median_ms(g.replay, rep=100)
            except Exception as e:  # noqa: BLE001
                res["step_ms_graph"] = None
                res["graph_error"] = f"{type(e).__name__}: {e}"[:300]
    res["pass_2e-2"] = max(res["rel_err_out"], res["rel_err_grad_x"], res["rel_err_grad_params_worst"]) <= 2e-2
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/ops.json")
    ap.add_argument("--shapes", default="1024x4096x2,2048x8192x1", help="DxTxB list")
    ap.add_argument("--ops", default=",".join(OPS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/ops.py needs a CUDA device")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "versions": versions(), "dtype": "bfloat16",
            "reference": "hylo reference path, float32, same bf16-rounded weights for the output check"}
    from hylo.ops import backend as be

    meta["fla_importable"] = be.fla_available()
    results = []
    for shape in args.shapes.split(","):
        D, T, B = (int(v) for v in shape.split("x"))
        cfg = make_config(D)
        for op in args.ops.split(","):
            try:
                r = bench_op(op, cfg, B, T)
            except Exception as e:  # noqa: BLE001
                r = {"op": op, "D": D, "T": T, "B": B, "error": f"{type(e).__name__}: {e}"[:500],
                     "trace": traceback.format_exc()[-1500:]}
            results.append(r)
            print(json.dumps(r), flush=True)
            torch.cuda.empty_cache()
            # written after every operator, so a run stopped at its time limit still leaves its results
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    hdr = f"{'op':9s} {'D':>5s} {'T':>5s} {'B':>2s} {'err_out':>8s} {'err_gx':>8s} {'err_gw':>8s} " \
          f"{'fwd ms':>8s} {'f+b ms':>8s} {'step ms':>8s} {'graph ms':>8s}"
    print(hdr)
    for r in results:
        if "error" in r:
            print(f"{r['op']:9s} {r['D']:5d} {r['T']:5d} {r['B']:2d} ERROR {r['error'][:80]}")
            continue
        g = r.get("step_ms_graph")
        print(f"{r['op']:9s} {r['D']:5d} {r['T']:5d} {r['B']:2d} {r['rel_err_out']:8.1e} {r['rel_err_grad_x']:8.1e} "
              f"{r['rel_err_grad_params_worst']:8.1e} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:8.3f} "
              f"{r['step_ms_eager']:8.3f} {g if g is None else f'{g:8.3f}'}")


if __name__ == "__main__":
    main()
