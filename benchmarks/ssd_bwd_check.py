"""GPU check: does the SSD (Mamba2) backward run, which kernel faults at small head sizes, and are the fast path's
gradients right there? Calls:

    python benchmarks/ssd_bwd_check.py --out $OUT/ssd/ssd_bwd_check.json      # the fault cases; 5 min on H100
    python benchmarks/ssd_bwd_check.py --cases grads --case-timeout 240 --out $OUT/ssd/ssd_grads.json  # ~5 min

The gradient cases (``--cases grads``, issue 5: pure Mamba2 did not learn MQAR on 2 H200s) compare the fast path
with hylo's reference in float64 on the same device, forward and backward, by relative L2 error of every output
and gradient (``rel_l2`` = |fast - ref| / |ref|, and ``max_err`` = max |fast - ref| / max |ref|):

- ``cmp_ssd_p32`` / ``cmp_ssd_p64``: the SSD op (y, final state; gradients of x, dt, A, B, C and the initial
  state) at MQAR's shapes, head dim P = 32 (with hylo's value padding to 64, the training path) and P = 64 (no
  padding needed), state N = 64, T = 1024, bf16 x/B/C as under autocast;
- ``cmp_layer_p32`` / ``cmp_layer_p64``: one Mamba2 layer of the MQAR model at width 128 (8 heads of 32, or 4 of
  64), as ``hylo.eval.mqar`` builds it, under bf16 autocast as training runs it: the output and the gradients of
  the input and of every parameter (in_proj, conv weight and bias, dt_bias, A_log, D, norm, out_proj); beside
  them ``errors_ref_ops_bf16``, the reference ops under the same autocast against the same float64 run: the bf16
  noise floor (``worst_ratio_to_floor`` near 1: the fast path adds nothing; a gradient bug is orders above);
- ``cmp_train_m2``: 'm2 m2' (width 128, vocabulary 1024) trained twice by ``hylo.eval.mqar.train_one`` with the
  same seed and data for 400 steps on short MQAR settings (lr 3e-3, so the loss moves within the run), once on the
  fast path and once with the reference ops on the GPU (``HYLO_BACKEND=ref``): the two loss curves;
- ``cmp_ssd_p32_nopad``: the SSD op at P = 32 without the padding (expected to fault at fla's ``chunk_bwd_dv``;
  recorded, last so it cannot cost the others).

A case passes (``pass``) when every rel_l2 is below its tolerance (``tol``: 3e-2 in bf16), for the training case
when the two curves stay within 10% of each other. Triton's autotuning is cached on disk across the cases
(``TRITON_CACHE_AUTOTUNING=1``; fla caches its own by default), so cases sharing kernel shapes after the first
cost seconds: the p32 cases share one set of kernels, the p64 cases another.

(The first H100 attempt, with 110 s for the whole script, finished no case: the first case's Triton compiling
and autotuning under CUDA_LAUNCH_BLOCKING alone took longer. Each child's output now goes to a log file beside
the JSON, so a run stopped at its limit keeps the traceback.)

Cases run in this order: the whole model with hylo's value padding (the workaround, expected to pass), then
without it (expected to fault, naming the kernel), then the SSD op alone by path and head size.

Why: on an H100 (torch 2.11, Triton 3.6, fla 0.6.0) the MQAR benchmark's first backward of a Mamba2 layer at
width 128 (SSD head dim P = 32, state N = 64, 8 heads, batch 128, T = 1024) died with "an illegal memory access",
reported at fla's ``chunk_local_cumsum`` launch; CUDA reports such faults late, so the faulting kernel is unknown.
Each case runs in its own process (a fault poisons the CUDA context); the fault cases (and ``cmp_ssd_p32_nopad``)
with ``CUDA_LAUNCH_BLOCKING=1``, so the traceback names the kernel that faults. The fault cases vary the head size
and the ``dqkwg`` path (``HYLO_GATED_BWD`` ``triton``: hylo's kernel; ``torch``: hylo's PyTorch version, so a
fault there is in fla's kernels); passing ones compare their gradients with the ``torch`` path's. JSON goes to
--out after every case.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# name: (B, T, H, N, P, dqkwg path). Fault cases: "model_*" is MQAR's whole `m2 a` model at width 128 (H, N, P
# unused); "*_nopad" runs with hylo's value padding off (HYLO_SSD_PAD_V=0, see hylo.ops.ssd.value_pad): the
# suspected fault. Gradient cases ("cmp_*", module docstring): fast path against the float64 reference;
# "cmp_layer_*" and "cmp_train_*" use MQAR's Mamba2 at width 128 (H = 256 / P heads), B and T as given; the op
# cases use the layer's head count.
CASES = {
    "model_m2a_h128": (128, 1024, 8, 64, 32, "auto"),
    "model_m2a_h128_nopad": (128, 1024, 8, 64, 32, "auto"),
    "mqar_triton_nopad": (128, 1024, 8, 64, 32, "triton"),
    "mqar_torch_nopad": (128, 1024, 8, 64, 32, "torch"),
    "mqar_triton": (128, 1024, 8, 64, 32, "triton"),
    "p64_triton": (128, 1024, 8, 64, 64, "triton"),
    "n128_p32_triton": (32, 1024, 8, 128, 32, "triton"),
    "cmp_ssd_p32": (8, 1024, 8, 64, 32, "auto"),
    "cmp_layer_p32": (8, 1024, 8, 64, 32, "auto"),
    "cmp_train_m2": (64, 128, 8, 64, 32, "auto"),
    "cmp_ssd_p64": (8, 1024, 4, 64, 64, "auto"),
    "cmp_layer_p64": (8, 1024, 4, 64, 64, "auto"),
    "cmp_ssd_p32_nopad": (8, 1024, 8, 64, 32, "auto"),
}
GRAD_CASES = [n for n in CASES if n.startswith("cmp_")]
GROUPS = {"grads": GRAD_CASES, "faults": [n for n in CASES if n not in GRAD_CASES]}
BF16_TOL = 3e-2


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
    if name.startswith("cmp_ssd_"):
        return compare_ssd(B, T, H, N, P)
    if name.startswith("cmp_layer_"):
        return compare_layer(B, T, P)
    if name.startswith("cmp_train_"):
        return compare_training(B, T)
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


def _dev() -> str:
    """CUDA for the check; the CPU only to smoke-test this script (``--child NAME`` there: both sides reference)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rel_errors(got: dict, ref: dict) -> dict:
    """``{name: {"rel_l2", "max_err", "finite"}}`` of each tensor in ``ref`` (compared in float64)."""
    import torch

    out = {}
    for n, b in ref.items():
        a = got.get(n)
        if a is None or b is None:
            out[n] = {"missing": True}
            continue
        a, b = a.double(), b.double()
        d = a - b
        out[n] = {"rel_l2": float(d.norm() / b.norm().clamp_min(1e-30)),
                  "max_err": float(d.abs().max() / b.abs().max().clamp_min(1e-30)),
                  "finite": bool(torch.isfinite(a).all())}
    return out


def verdict(errors: dict, tol: float) -> dict:
    worst = max(((n, e["rel_l2"]) for n, e in errors.items() if "rel_l2" in e), key=lambda x: x[1])
    ok = all("rel_l2" in e and e["rel_l2"] <= tol and e["finite"] for e in errors.values())
    return {"worst": {"name": worst[0], "rel_l2": worst[1]}, "tol": tol, "pass": ok}


def compare_ssd(B: int, T: int, H: int, N: int, P: int) -> dict:
    """SSD op: fast path (bf16 x/B/C, float32 dt/A/state, the training path) against float64 ``ssd_chunked``."""
    import torch

    from hylo.ops import ssd as S
    from hylo.ops.backend import backend
    from hylo.ops.chunk_bwd import gated_bwd_mode

    g = torch.Generator(device=_dev()).manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g, device=_dev())  # noqa: E731
    # inputs on Mamba2's init ranges: dt in ~[1e-3, 0.3], A in [-16, -1]; x, B, C rounded to bf16 for both paths
    ins = {"x": rn(B, T, H, P).bfloat16().float(), "dt": torch.nn.functional.softplus(rn(B, T, H) - 3.0),
           "A": -torch.exp(torch.rand(H, generator=g, device=_dev()) * 2.77),
           "B": rn(B, T, 1, N).bfloat16().float(), "C": rn(B, T, 1, N).bfloat16().float(),
           "h0": 0.1 * rn(B, H, P, N)}
    dy, dht = rn(B, T, H, P).bfloat16().float(), rn(B, H, P, N)

    def run(reference: bool):
        low = {"x", "B", "C"}
        leaves = {n: (t.double() if reference else t.bfloat16() if n in low else t).detach().requires_grad_()
                  for n, t in ins.items()}
        with backend("ref" if reference else "auto"):
            y, ht = S.ssd(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk_size=64,
                          initial_state=leaves["h0"], output_final_state=True)
        grads = torch.autograd.grad([y, ht], list(leaves.values()),
                                    [dy.to(y.dtype), dht.to(ht.dtype)], allow_unused=True)
        return {"y": y.detach(), "final_state": ht.detach(), **{f"d{n}": gr for n, gr in zip(leaves, grads)}}

    t0 = time.perf_counter()
    print(f"[ssd B={B} T={T} H={H} N={N} P={P}] fast path ...", flush=True)
    fast = run(False)
    _sync()
    t_fast = time.perf_counter() - t0
    ref = run(True)
    errors = rel_errors(fast, ref)
    return {"seconds_fast": round(t_fast, 2), "path": gated_bwd_mode(), "value_pad": S.value_pad(P),
            "fla_own_backward": S.fla_backward_supported(False), "errors": errors, **verdict(errors, BF16_TOL)}


def compare_layer(B: int, T: int, P: int) -> dict:
    """One Mamba2 layer of MQAR's model at width 128, head dim P: fast path under bf16 autocast (as training)
    against the same weights in float64 on the reference ops."""
    import copy

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hylo import HybridLM
    from hylo.eval import mqar
    from hylo.ops import ssd as S
    from hylo.ops.backend import backend

    torch.manual_seed(0)
    cfg = mqar.model_config("m2 m2", 128, 1024, {"mamba2_head_dim": P})
    layer = HybridLM(cfg).layers[0].mixer.to(_dev())  # the model's init (normal Linears, Mamba2's own dt/A/D/conv)
    ref_layer = copy.deepcopy(layer).double()
    g = torch.Generator(device=_dev()).manual_seed(1)
    x = torch.randn(B, T, 128, generator=g, device=_dev())
    dout = torch.randn(B, T, 128, generator=g, device=_dev())

    def run(mod, reference: bool, ops: str = "auto"):
        xi = (x.double() if reference else x).detach().requires_grad_()
        ctx = contextlib.nullcontext() if reference else torch.autocast("cuda", dtype=torch.bfloat16)
        with backend("ref" if reference else ops), ctx:
            out = mod(xi)
        params = dict(mod.named_parameters())
        grads = torch.autograd.grad(out, [xi, *params.values()], dout.to(out.dtype))
        return {"out": out.detach(), "dx": grads[0], **{f"d{n}": gr for n, gr in zip(params, grads[1:])}}

    t0 = time.perf_counter()
    print(f"[layer P={P} heads={layer.num_heads} B={B} T={T}] fast path under bf16 autocast ...", flush=True)
    fast = run(layer, False)
    _sync()
    t_fast = time.perf_counter() - t0
    ref = run(ref_layer, True)
    errors = rel_errors(fast, ref)
    # the bf16 noise floor: the reference ops under the same autocast, against the same float64 run
    floor = rel_errors(run(layer, False, ops="ref"), ref)
    return {"seconds_fast": round(t_fast, 2), "heads": layer.num_heads, "value_pad": S.value_pad(P),
            "errors": errors, "errors_ref_ops_bf16": floor,
            "worst_ratio_to_floor": max(errors[n]["rel_l2"] / max(floor[n]["rel_l2"], 1e-6) for n in errors),
            **verdict(errors, BF16_TOL)}


def compare_training(B: int, T: int) -> dict:
    """'m2 m2' trained by MQAR's harness twice (same seed, data and batches): fast path, then reference ops."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hylo.eval import mqar
    from hylo.ops.backend import backend

    test = [(128, 8), (128, 16)]
    cfg = mqar.HarnessConfig(patterns=["m2 m2"], hidden=[128], train=[(32, 4, 3.0), (64, 4, 3.0), (64, 8, 2.0),
                                                                      (T, 16, 1.0)],
                             test=test, vocab_size=1024, train_examples=4000, test_examples=256,
                             steps=int(os.environ.get("SSD_CHECK_TRAIN_STEPS", "400")),
                             batch_size=B, lr=3e-3, warmup=0.05, eval_interval=50, log_interval=50,
                             eval_batch_size=128, device=_dev(), kernel_warmup=False, curriculum=0.0)
    train, tests = mqar.build_data(cfg)
    train, tests = train.to(_dev()), {k: d.to(_dev()) for k, d in tests.items()}
    out = {}
    for label in ("fast", "ref"):
        t0 = time.perf_counter()
        with backend("ref" if label == "ref" else "auto"):
            rec = mqar.train_one("m2 m2", 128, cfg, train, tests, torch.device(_dev()),
                                 log=lambda s: print(f"[{label}] {s}", flush=True))
        out[label] = {"hist": [[h["step"], round(h["loss"], 4)] + [round(v, 4) for k, v in h.items()
                                                                  if k.startswith("acc_")] for h in rec["history"]],
                      "accuracy": rec["accuracy"], "seconds": round(time.perf_counter() - t0, 1)}
    rel = [abs(a[1] - b[1]) / b[1] for a, b in zip(out["fast"]["hist"], out["ref"]["hist"])]
    out["max_rel_loss_gap"] = max(rel)
    out["pass"] = max(rel) <= 0.1
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default="faults",
                    help=f"comma list of {list(CASES)}, or a group: "
                         + ", ".join(f"{k} ({','.join(v)})" for k, v in GROUPS.items()))
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
    names = [n for c in args.cases.split(",") for n in GROUPS.get(c, [c])]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}: use {list(CASES)} or a group {list(GROUPS)}")
    for name in names:
        # the fault cases launch synchronously, so a fault names its kernel; the gradient cases need no such help
        # (the nopad one is run for its fault) and share autotuning results through Triton's disk cache
        env = {**os.environ, "TRITON_CACHE_AUTOTUNING": "1"}
        if name not in GRAD_CASES or name.endswith("_nopad"):
            env["CUDA_LAUNCH_BLOCKING"] = "1"
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
