"""GPU check of hylo's backward for fla's gated chunk kernels (hylo.ops.chunk_bwd, fla issue #640). Calls:

    python benchmarks/gated_bwd.py --out $OUT/gated_bwd.json                       # d1024: ~5.5 min on H100
    python benchmarks/gated_bwd.py --cases gdn_d2048,ssd_d2048 --out $OUT/gated_bwd_d2048.json   # ~6.5 min
    python benchmarks/gated_bwd.py --cases delta_d1024,gdn_k64,delta_k64 --out $OUT/gated_bwd_more.json  # ~6 min

Each case costs 2-3 minutes, nearly all of it Triton compiling and autotuning fla's kernels for a new head count
and head size (T is not a compile-time constant), so the cases are split across commands that fit 10 minutes.

Op-level inputs (bf16 q/k/v/beta and SSD's x/B/C; float32 gates, initial states and final-state gradients) at
the shapes benchmarks/ops.py gives gdn/jet (gated delta rule, in-kernel q/k l2norm), mamba2 (SSD) and deltanet
(ungated delta rule) at d1024 (B=2, T=4096) and d2048 (B=1, T=8192), plus small K=64 cases (the tile width at
which fla's dqkwg kernel was reported wrong). Per case:

- gradients of every input (and of the initial state) from each backward path against float64 autograd of hylo's
  chunked reference on the same bf16-rounded inputs: ``err = max|a-b| / max|b|`` and ``rel_l2``;
  paths: ``triton`` / ``torch`` (fla's blocks + hylo's dqkwg in Triton / PyTorch), ``recompute`` (the old
  path), ``fla`` (fla's own op; on a setup where fla refuses it, run with its guard lifted -- a diagnostic that
  shows what the guard protects from, never a path hylo takes there);
- ``dqkwg`` alone on the inputs captured from one backward: hylo's Triton kernel and fla's kernel (guard lifted)
  against hylo's float32 PyTorch version, with timings;
- timings (median of CUDA events): fla's forward alone and forward+backward of each path.
The ungated ``chunk_delta_rule`` (fla's own backward; fla issue #984 reports its WY backward wrong on Hopper at
chunk 64) gets the gradient check and timings too. JSON goes to --out after every case (a run stopped at its time
limit keeps what it did).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hylo.ops import chunk_bwd  # noqa: E402
from hylo.ops import delta_rule as D  # noqa: E402
from hylo.ops import ssd as S  # noqa: E402
from hylo.ops.backend import backend  # noqa: E402
from hylo.runinfo import versions  # noqa: E402
from timing import median_ms  # noqa: E402  (benchmarks/timing.py)

# name: (kind, B, T, H, K, V)  -- for ssd: K = state size N (fla's K), V = head dim P
CASES = {  # in run order: the d1024 shapes first, so a run cut short keeps the most useful ones
    "gdn_d1024": ("gdn", 2, 4096, 8, 128, 256),
    "ssd_d1024": ("ssd", 2, 4096, 32, 128, 64),
    "delta_d1024": ("delta", 2, 4096, 8, 128, 128),
    "gdn_k64": ("gdn", 2, 2048, 4, 64, 128),
    "delta_k64": ("delta", 2, 2048, 4, 64, 64),
    "gdn_d2048": ("gdn", 1, 8192, 16, 128, 256),
    "ssd_d2048": ("ssd", 1, 8192, 64, 128, 64),
}




def errs(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double(), b.double()
    d = a - b
    return {"err": d.abs().max().item() / max(b.abs().max().item(), 1e-30),
            "rel_l2": (d.norm() / b.norm().clamp_min(1e-30)).item()}


@contextlib.contextmanager
def mode(name: str):
    old = os.environ.get("HYLO_GATED_BWD")
    os.environ["HYLO_GATED_BWD"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HYLO_GATED_BWD", None)
        else:
            os.environ["HYLO_GATED_BWD"] = old


@contextlib.contextmanager
def fla_guard_lifted():
    """fla's own gated backward even where its #640 guard refuses it (diagnostic only)."""
    import fla.ops.common.chunk_o as co

    old = co.TRITON_ABOVE_3_7_1
    co.TRITON_ABOVE_3_7_1 = True
    try:
        yield
    finally:
        co.TRITON_ABOVE_3_7_1 = old


@contextlib.contextmanager
def capture_dqkwg(store: list):
    """Record the arguments of hylo's Triton dqkwg call (one backward)."""
    orig = chunk_bwd.DQKWG["triton"]

    def rec(*args, **kwargs):
        store.append((args, kwargs))
        return orig(*args, **kwargs)

    chunk_bwd.DQKWG["triton"] = rec
    try:
        yield
    finally:
        chunk_bwd.DQKWG["triton"] = orig


# ----------------------------------------------------------------------------------------- inputs and ops
def make_inputs(kind: str, B: int, T: int, H: int, K: int, V: int, seed: int = 0):
    """bf16-rounded inputs (kept in float32 here; each path casts) and output gradients."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    bf = lambda t: t.bfloat16().float()  # noqa: E731
    if kind in ("gdn", "delta"):
        ins = {"q": bf(rn(B, T, H, K)), "k": bf(rn(B, T, H, K)), "v": bf(rn(B, T, H, V)),
               "beta": bf(torch.sigmoid(rn(B, T, H))),
               "g": (F.logsigmoid(rn(B, T, H)) / 8) if kind == "gdn" else None,
               "h0": 0.1 * rn(B, H, K, V)}
        outs = {"do": bf(rn(B, T, H, V)), "dht": rn(B, H, K, V)}
    else:  # ssd: x [B, T, H, P], dt [B, T, H], A [H], B/C [B, T, 1, N], state [B, H, P, N]
        ins = {"x": bf(rn(B, T, H, V)), "dt": F.softplus(rn(B, T, H) - 3.0),
               "A": -torch.exp(torch.rand(H, generator=g, device="cuda") * 2.77), "B": bf(rn(B, T, 1, K)),
               "C": bf(rn(B, T, 1, K)), "h0": 0.1 * rn(B, H, V, K)}
        outs = {"do": bf(rn(B, T, H, V)), "dht": rn(B, H, V, K)}
    return {n: t for n, t in ins.items() if t is not None}, outs


LOW = {"q", "k", "v", "beta", "x", "B", "C"}  # bf16 on the fast path; gates, A and states stay float32


def run_op(kind: str, t: dict):
    if kind in ("gdn", "delta"):
        return D.delta_rule(t["q"], t["k"], t["v"], t["beta"], t.get("g"), None, t["h0"], True, use_qk_l2norm=True)
    return S.ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], initial_state=t["h0"], output_final_state=True)


def run_ref(kind: str, t: dict):
    if kind in ("gdn", "delta"):
        return D.delta_rule_chunked(D.l2norm(t["q"]), D.l2norm(t["k"]), t["v"], t["beta"], t.get("g"), None,
                                    t["h0"], True)
    return S.ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=64, initial_state=t["h0"],
                         output_final_state=True)


def grads(kind, ins, outs, dtype=None, reference=False):
    leaves = {n: (x.double() if reference else x.to(torch.bfloat16) if n in LOW else x).detach().requires_grad_()
              for n, x in ins.items()}
    if reference:
        with backend("ref"):
            y, ht = run_ref(kind, leaves)
        go = [outs["do"].double(), outs["dht"].double()]
    else:
        y, ht = run_op(kind, leaves)
        go = [outs["do"].to(y.dtype), outs["dht"]]
    gs = torch.autograd.grad([y, ht], list(leaves.values()), go, allow_unused=True)
    return {n: gr for n, gr in zip(leaves, gs)}


def fwd_bwd_fn(kind, ins, outs):
    leaves = {n: (x.to(torch.bfloat16) if n in LOW else x).detach().requires_grad_() for n, x in ins.items()}
    do, dht = outs["do"].to(torch.bfloat16), outs["dht"]

    def f():
        y, ht = run_op(kind, leaves)
        torch.autograd.backward([y, ht], [do, dht])
    return f


def fwd_fn(kind, ins):
    t = {n: (x.to(torch.bfloat16) if n in LOW else x) for n, x in ins.items()}

    def f():
        with torch.no_grad():
            run_op(kind, t)
    return f


# ----------------------------------------------------------------------------------------- one case
def bench_case(name: str, rep: int) -> dict:
    kind, B, T, H, K, V = CASES[name]
    res: dict = {"case": name, "kind": kind, "B": B, "T": T, "H": H, "K": K, "V": V}
    ins, outs = make_inputs(kind, B, T, H, K, V)
    t0 = time.time()
    ref = grads(kind, ins, outs, reference=True)
    res["ref_s"] = round(time.time() - t0, 2)
    torch.cuda.empty_cache()
    if kind == "delta":
        paths = ["fla"]
    else:
        paths = ["triton", "torch", "recompute", "fla"]
    if kind == "gdn":
        fla_ok = D.fla_gated_backward_supported(None, None, None, None, None)
    elif kind == "ssd":
        fla_ok = S.fla_backward_supported(False)
    else:
        fla_ok = True
    res["fla_own_backward_allowed"] = fla_ok
    res["grad_errors"], res["fwd_bwd_ms"] = {}, {}
    for p in paths:
        label = p if (p != "fla" or fla_ok) else "fla_unguarded"
        try:
            lift = fla_guard_lifted() if label == "fla_unguarded" else contextlib.nullcontext()
            with mode(p), lift:
                got = grads(kind, ins, outs)
                res["grad_errors"][label] = {n: errs(got[n], ref[n]) for n in ref if got.get(n) is not None}
                del got
                res["fwd_bwd_ms"][label] = median_ms(fwd_bwd_fn(kind, ins, outs), rep=rep, warmup=2)
        except Exception as e:  # noqa: BLE001
            res["grad_errors"][label] = {"error": f"{type(e).__name__}: {e}"[:400]}
        torch.cuda.empty_cache()
    res["fwd_ms_fla"] = median_ms(fwd_fn(kind, ins), rep=rep, warmup=2)
    if kind != "delta":
        try:
            res["dqkwg"] = dqkwg_check(kind, ins, outs, rep)
        except Exception as e:  # noqa: BLE001
            res["dqkwg"] = {"error": f"{type(e).__name__}: {e}"[:400], "trace": traceback.format_exc()[-1200:]}
    worst = {p: max(v["rel_l2"] for v in e.values()) for p, e in res["grad_errors"].items() if "error" not in e}
    res["worst_rel_l2"] = worst
    res["pass_2e-2"] = {p: w <= 2e-2 for p, w in worst.items()}
    return res


def dqkwg_check(kind, ins, outs, rep):
    """hylo's Triton dqkwg and fla's kernel (guard lifted) vs hylo's float32 PyTorch dqkwg, on captured inputs."""
    from fla.ops.common.chunk_o import chunk_bwd_dqkwg as fla_dqkwg

    store: list = []
    with mode("triton"), capture_dqkwg(store):
        grads(kind, ins, outs)
    (q, k, v, do, h, dh, g, scale), kw = store[0][0], store[0][1]
    w, dv = kw.get("w"), kw.get("dv")
    ref = chunk_bwd.dqkwg_torch(q, k, v, do, h, dh, g, scale, w=w, dv=dv)
    mine = chunk_bwd.dqkwg_triton(q, k, v, do, h, dh, g, scale, w=w, dv=dv)
    with fla_guard_lifted():
        theirs = fla_dqkwg(q=q, k=k, v=v, do=do, h=h, dh=dh, w=w, g=g, dv=dv, scale=scale)
    out = {"h_dtype": str(h.dtype).replace("torch.", ""), "errors": {}, "ms": {}}
    for label, got in (("triton", mine), ("fla_kernel", theirs)):
        out["errors"][label] = {n: errs(a, b) for n, a, b in zip(("dq", "dk", "dw", "dg"), got, ref) if b is not None}
    out["ms"]["torch"] = median_ms(lambda: chunk_bwd.dqkwg_torch(q, k, v, do, h, dh, g, scale, w=w, dv=dv),
                                   rep=rep, warmup=2)
    out["ms"]["triton"] = median_ms(lambda: chunk_bwd.dqkwg_triton(q, k, v, do, h, dh, g, scale, w=w, dv=dv),
                                    rep=rep, warmup=2)
    with fla_guard_lifted():
        out["ms"]["fla_kernel"] = median_ms(
            lambda: fla_dqkwg(q=q, k=k, v=v, do=do, h=h, dh=dh, w=w, g=g, dv=dv, scale=scale), rep=rep, warmup=2)
    out["triton_config"] = str(getattr(getattr(chunk_bwd, "_dqkwg_tuned", None), "best_config", None))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/gated_bwd.json")
    ap.add_argument("--cases", default="gdn_d1024,ssd_d1024", help=f"comma list of {list(CASES)}, or 'all'")
    ap.add_argument("--rep", type=int, default=7, help="timed repetitions (median reported)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gated_bwd.py needs a CUDA device")
    names = list(CASES) if args.cases == "all" else [c for c in args.cases.split(",") if c]
    bad = [c for c in names if c not in CASES]
    if bad:
        sys.exit(f"unknown case(s) {bad}: choose from {list(CASES)}")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "versions": versions(),
            "reference": "float64 autograd of hylo's chunked reference on the same bf16-rounded inputs",
            "err": "max|a-b| / max|b|; rel_l2 = ||a-b|| / ||b||"}
    try:
        meta["fla_gated_bwd_blocked"] = D._fla_gated_bwd_blocked()
    except Exception as e:  # noqa: BLE001
        meta["fla_gated_bwd_blocked"] = f"{type(e).__name__}: {e}"
    results = []
    t_start = time.time()
    for name in names:
        t0 = time.time()
        try:
            r = bench_case(name, args.rep)
        except Exception as e:  # noqa: BLE001
            r = {"case": name, "error": f"{type(e).__name__}: {e}"[:500], "trace": traceback.format_exc()[-1500:]}
        r["wall_s"] = round(time.time() - t0, 1)
        results.append(r)
        print(json.dumps({k: r.get(k) for k in ("case", "wall_s", "worst_rel_l2", "fwd_ms_fla", "fwd_bwd_ms",
                                                "error")}), flush=True)
        torch.cuda.empty_cache()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\ntotal {time.time() - t_start:.0f} s")
    print(f"{'case':12s} {'path':14s} {'worst err':>9s} {'worst l2':>9s} {'f+b ms':>8s}   (fla fwd ms)")
    for r in results:
        if "error" in r:
            print(f"{r['case']:12s} ERROR {r['error'][:100]}")
            continue
        for p, e in r["grad_errors"].items():
            if "error" in e:
                print(f"{r['case']:12s} {p:14s} ERROR {e['error'][:80]}")
                continue
            we = max(v["err"] for v in e.values())
            print(f"{r['case']:12s} {p:14s} {we:9.1e} {r['worst_rel_l2'][p]:9.1e} {r['fwd_bwd_ms'].get(p, 0):8.2f}"
                  f"   ({r['fwd_ms_fla']:.2f})")
        if isinstance(r.get("dqkwg"), dict) and "errors" in r["dqkwg"]:
            d = r["dqkwg"]
            for p, e in d["errors"].items():
                print(f"{'':12s} dqkwg {p:10s} worst err {max(v['err'] for v in e.values()):.1e}  "
                      f"{d['ms'][p]:.3f} ms (torch {d['ms']['torch']:.3f} ms)")


if __name__ == "__main__":
    main()
