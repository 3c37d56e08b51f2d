"""GPU check: does the SSD (Mamba2) backward run, and which kernel faults, at small head sizes? Call:

    python benchmarks/ssd_bwd_check.py --out $OUT/ssd/ssd_bwd_check.json      # give it 5 min on H100

(The first H100 attempt, with 110 s for the whole script, finished no case: the first case's Triton compiling
and autotuning under CUDA_LAUNCH_BLOCKING alone took longer. Each child's output now goes to a log file beside
the JSON, so a run stopped at its limit keeps the traceback.)

Cases run in this order: the whole model with hylo's value padding (the workaround, expected to pass), then
without it (expected to fault, naming the kernel), then the SSD op alone by path and head size.

Why: on an H100 (torch 2.11, Triton 3.6, fla 0.6.0) the MQAR benchmark's first backward of a Mamba2 layer at
width 128 (SSD head dim P = 32, state N = 64, 8 heads, batch 128, T = 1024) died with "an illegal memory access",
reported at fla's ``chunk_local_cumsum`` launch; CUDA reports such faults late, so the faulting kernel is unknown.
Each case runs in its own process (a fault poisons the CUDA context) with ``CUDA_LAUNCH_BLOCKING=1``, so the
traceback names the kernel that faults. Cases vary the head size and the ``dqkwg`` path (``HYLO_GATED_BWD``
``triton``: hylo's kernel; ``torch``: hylo's PyTorch version, so a fault there is in fla's kernels); passing cases
compare their gradients with the ``torch`` path's. JSON goes to --out after every case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# name: (B, T, H, N, P, dqkwg path); "model_*": MQAR's whole `m2 a` model at width 128 (H, N, P unused);
# "*_nopad": with hylo's value padding off (HYLO_SSD_PAD_V=0, see hylo.ops.ssd.value_pad): the suspected fault
CASES = {
    "model_m2a_h128": (128, 1024, 8, 64, 32, "auto"),
    "model_m2a_h128_nopad": (128, 1024, 8, 64, 32, "auto"),
    "mqar_triton_nopad": (128, 1024, 8, 64, 32, "triton"),
    "mqar_torch_nopad": (128, 1024, 8, 64, 32, "torch"),
    "mqar_triton": (128, 1024, 8, 64, 32, "triton"),
    "p64_triton": (128, 1024, 8, 64, 64, "triton"),
    "n128_p32_triton": (32, 1024, 8, 128, 32, "triton"),
}


def child(name: str) -> dict:
    """One case in this process: forward + backward of hylo's SSD on CUDA; gradient summary."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gated_bwd as G  # benchmarks/gated_bwd.py: inputs and gradients of the SSD op

    B, T, H, N, P, path = CASES[name]
    if name.endswith("_nopad"):
        os.environ["HYLO_SSD_PAD_V"] = "0"
    if name.startswith("model_"):
        return model_case(name, B, T)
    ins, outs = G.make_inputs("ssd", B, T, H, N, P)
    t0 = time.perf_counter()
    print(f"[{name}] forward + backward through dqkwg={path} ...", flush=True)
    with G.mode(path):
        got = G.grads("ssd", ins, outs)
    torch.cuda.synchronize()
    print(f"[{name}] done in {time.perf_counter() - t0:.1f}s", flush=True)
    res = {"seconds": round(time.perf_counter() - t0, 2),
           "grad_norms": {n: float(g.float().norm()) for n, g in got.items() if g is not None},
           "finite": all(bool(torch.isfinite(g).all()) for g in got.values() if g is not None)}
    if path != "torch":
        with G.mode("torch"):
            ref = G.grads("ssd", ins, outs)
        res["rel_l2_vs_torch_dqkwg"] = {n: G.errs(got[n], ref[n])["rel_l2"] for n in ref if got.get(n) is not None}
    return res


def model_case(name: str, B: int, T: int) -> dict:
    """What MQAR's warm-up ran: forward + backward of the `m2 a` model at width 128 under bf16 autocast (conv,
    SSD, gated norm and attention together, in the training path's order)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hylo import HybridLM
    from hylo.eval import mqar

    torch.manual_seed(0)
    cfg = mqar.model_config("mamba2 attn", 128, 1024)
    model = HybridLM(cfg).cuda()
    x = torch.randint(0, 1024, (B, T), device="cuda")
    t0 = time.perf_counter()
    print(f"[{name}] {cfg.pattern_short}: forward ...", flush=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).logits.float().flatten(0, 1)[:-1], x.flatten()[1:])
    torch.cuda.synchronize()
    print(f"[{name}] backward ...", flush=True)
    loss.backward()
    torch.cuda.synchronize()
    print(f"[{name}] done in {time.perf_counter() - t0:.1f}s", flush=True)
    return {"seconds": round(time.perf_counter() - t0, 2), "loss": float(loss),
            "finite": all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    ap.add_argument("--case-timeout", type=float, default=150.0)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child)), flush=True)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    from hylo.runinfo import versions

    if not torch.cuda.is_available():
        sys.exit("ssd_bwd_check.py needs a CUDA device")
    out = {"kind": "ssd-bwd-check", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "device": torch.cuda.get_device_name(), "versions": versions(), "cases": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}
    for name in args.cases.split(","):
        B, T, H, N, P, path = CASES[name]
        rec: dict = {"B": B, "T": T, "H": H, "N": N, "P": P, "dqkwg": path}
        t0 = time.perf_counter()
        rec["state"] = "running"  # on disk before the case starts: a run killed mid-case still says which
        out["cases"][name] = rec
        args.out.write_text(json.dumps(out, indent=1))
        log = args.out.with_name(f"{args.out.stem}_{name}.log")  # the child's output, kept if the run is killed
        try:
            with open(log, "w") as f:
                p = subprocess.run([sys.executable, "-u", __file__, "--out", str(args.out), "--child", name],
                                   env=env, stdout=f, stderr=subprocess.STDOUT, text=True, timeout=args.case_timeout)
            text = log.read_text()
            line = [x for x in text.splitlines() if x.startswith("RESULT ")]
            rec.update(json.loads(line[-1][7:]) if line else {})
            rec["ok"] = p.returncode == 0 and bool(line)
            if not rec["ok"]:
                rec["stderr_tail"] = text[-3000:]
        except subprocess.TimeoutExpired:
            rec.update(ok=False, error=f"timeout after {args.case_timeout:.0f}s", stderr_tail=log.read_text()[-3000:])
        rec["state"] = "done"
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
        out["cases"][name] = rec
        print(name, json.dumps({k: v for k, v in rec.items() if k != "stderr_tail"}), flush=True)
        if "stderr_tail" in rec:
            print(rec["stderr_tail"][-1500:], flush=True)
        args.out.write_text(json.dumps(out, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
