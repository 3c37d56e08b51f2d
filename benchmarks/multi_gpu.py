"""`hylo train` under torchrun on several GPUs: same losses as one process with the same global batch, and speed.

Runs the real command (``python -m hylo.cli train CFG``, under ``python -m torch.distributed.run --standalone
--nproc_per_node N`` for the distributed runs) three ways on the same data, seed and global batch:

- ``single``: one process on one GPU, per-step batch ``N x B``;
- ``ddp``: N processes, batch B each (DistributedDataParallel);
- ``fsdp``: N processes, batch B each (FSDP2, ``fsdp: true``).

Two phases:

1. **equivalence**, float32 (no autocast), a short run of the Nemotron-Flash layout at a small width: the losses
   of every step and the final validation loss must agree with ``single`` to ``--tol`` (float32 sums in another
   order differ by ~1e-6; a wrong gradient average or data split by far more);
2. **throughput**, bf16 autocast at sequence 2048, the ~125M Nemotron-Flash hybrid of ``train_throughput.py``:
   steady-state tokens/s (log records after ``--skip`` steps) of each run, the speed-up of N GPUs over one, and
   the largest loss difference (bf16 rounding differs with the batch split, so this is reported, not asserted).

Each run is a fresh process group; one failing run is recorded and the others go on. Writes ``multi_gpu.json``
(rewritten after every run) and ``multi_gpu.png`` (loss curves and tokens/s).

    python benchmarks/multi_gpu.py --data DATA_DIR --out DIR            # CUDA, N = all visible GPUs
    python benchmarks/multi_gpu.py --data DATA_DIR --out DIR --smoke    # CPU, 2 gloo ranks, tiny: checks the script
    python benchmarks/multi_gpu.py --merge A/multi_gpu.json B/multi_gpu.json --out DIR   # phases of separate calls
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from hylo.presets import NEMOTRON_FLASH_1B  # noqa: E402
from hylo.runinfo import versions  # noqa: E402

HYBRID_125M = dict(hidden_size=768, layers=NEMOTRON_FLASH_1B, attn_num_heads=12, attn_num_kv_heads=4,
                   deltanet_num_heads=12, mamba2_head_dim=64, mamba2_state_size=128)  # as in train_throughput.py
HYBRID_SMALL = dict(hidden_size=256, layers="d f m2 f a f m2 f a f", attn_num_heads=4, attn_num_kv_heads=2,
                    deltanet_num_heads=4, mamba2_head_dim=64, mamba2_state_size=64)
TINY = dict(hidden_size=64, layers="d f m2 f a f", attn_num_heads=4, deltanet_num_heads=4, mamba2_head_dim=16,
            mamba2_state_size=16, mamba2_chunk_size=16)


def run_one(name: str, cfg: dict, nproc: int, work: Path, timeout: float, env: dict) -> dict:
    """One `hylo train` run (torchrun when nproc > 1); its metrics.jsonl read back."""
    out_dir = work / name
    cfg = dict(cfg, out_dir=str(out_dir))
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    cmd = [sys.executable, "-m", "hylo.cli", "train", str(path), "--no-progress"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "hylo.cli", "train", str(path), "--no-progress"]
    rec = {"name": name, "nproc": nproc, "batch_size_per_rank": cfg["batch_size"],
           "global_batch": cfg["batch_size"] * nproc, "fsdp": cfg.get("fsdp", False), "command": " ".join(cmd[1:])}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        rec.update(rc=proc.returncode, output_tail=(proc.stdout + proc.stderr)[-2500:])
    except subprocess.TimeoutExpired as e:
        rec.update(rc=None, error=f"timed out after {timeout:.0f} s",
                   output_tail=((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                                else (e.stdout or ""))[-2500:])
    rec["wall_s"] = time.perf_counter() - t0
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        rec["train"] = [{k: r[k] for k in ("step", "tokens", "loss", "elapsed_s") if k in r}
                        for r in lines if r.get("kind") == "train"]
        evals = [r for r in lines if r.get("kind") == "eval"]
        if evals:
            rec["val_loss"] = evals[-1]["val_loss"]
    return rec


def steady_tps(train: list[dict], skip: int) -> float | None:
    recs = [r for r in train if r["step"] >= skip]
    if len(recs) < 2:
        return None
    return (recs[-1]["tokens"] - recs[0]["tokens"]) / (recs[-1]["elapsed_s"] - recs[0]["elapsed_s"])


def compare(runs: dict, ref: str = "single") -> dict:
    """Largest |loss difference| of each run against ``ref``, over common steps, and of the final val loss."""
    out = {}
    base = {r["step"]: r["loss"] for r in runs.get(ref, {}).get("train", [])}
    for name, r in runs.items():
        if name == ref or not r.get("train") or not base:
            continue
        common = [(base[x["step"]], x["loss"]) for x in r["train"] if x["step"] in base]
        out[name] = {"steps_compared": len(common),
                     "max_abs_loss_diff": max((abs(a - b) for a, b in common), default=None)}
        if "val_loss" in r and "val_loss" in runs[ref]:
            out[name]["val_loss_diff"] = abs(r["val_loss"] - runs[ref]["val_loss"])
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, phase in zip(axes[:2], ("equivalence", "throughput")):
        for name, r in result["phases"].get(phase, {}).get("runs", {}).items():
            if r.get("train"):
                ax.plot([x["step"] for x in r["train"]], [x["loss"] for x in r["train"]], "o-" if phase ==
                        "equivalence" else "-", ms=3, lw=1, label=f"{name} ({r['nproc']} proc x batch "
                        f"{r['batch_size_per_rank']})")
        ax.set_title(f"{phase}: training loss by step")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    thr = result["phases"].get("throughput", {}).get("tokens_per_s", {})
    names = [n for n, v in thr.items() if v]
    axes[2].bar(names, [thr[n] / 1e3 for n in names], color=["tab:blue", "tab:orange", "tab:green"][:len(names)])
    for i, n in enumerate(names):
        axes[2].text(i, thr[n] / 1e3, f"{thr[n] / 1e3:,.0f}k", ha="center", va="bottom")
    axes[2].set_ylabel("tokens/s (k), whole job")
    axes[2].set_title(f"throughput, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(paths: list[Path], out: Path) -> int:
    """One result from the phases of several calls: each phase keeps the run it came from (``source``)."""
    merged = None
    for path in paths:
        r = json.loads(path.read_text())
        if merged is None:
            merged = dict(r, phases={}, sources=[])
        merged["sources"].append({"file": str(path), "date": r["date"], "commit": r["commit"],
                                  "device": r["device"], "phases": list(r["phases"])})
        for name, phase in r["phases"].items():
            merged["phases"][name] = dict(phase, source=str(path), date=r["date"], commit=r["commit"])
    eq = merged["phases"].get("equivalence")
    merged["passed"] = bool(eq and eq.get("passed"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "multi_gpu.json").write_text(json.dumps(merged, indent=1))
    plot(merged, out / "multi_gpu.png")
    print(f"wrote {out / 'multi_gpu.json'} and {out / 'multi_gpu.png'}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="folder prepared by `hylo data prepare`")
    ap.add_argument("--out", type=Path, required=True, help="folder for multi_gpu.json, multi_gpu.png and the runs")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="only merge the phases of these multi_gpu.json files (later files win) into --out")
    ap.add_argument("--nproc", type=int, default=None, help="processes (GPUs) for ddp/fsdp; default: all visible")
    ap.add_argument("--phases", nargs="+", default=["equivalence", "throughput"],
                    choices=["equivalence", "throughput"])
    ap.add_argument("--eq-steps", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30, help="throughput phase steps")
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the tokens/s")
    ap.add_argument("--batch-size", type=int, default=8, help="throughput phase, per rank")
    ap.add_argument("--tol", type=float, default=2e-3, help="equivalence: largest allowed |loss difference|")
    ap.add_argument("--run-timeout", type=float, default=240.0, help="seconds per run")
    ap.add_argument("--smoke", action="store_true", help="CPU, 2 gloo ranks, tiny model: checks the script")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    if not args.data:
        ap.error("--data is required (a folder made by `hylo data prepare`)")
    cuda = torch.cuda.is_available() and not args.smoke
    nproc = args.nproc or (torch.cuda.device_count() if cuda else 2)
    if nproc < 2:
        ap.error(f"needs at least 2 processes, got {nproc} (visible GPUs: {torch.cuda.device_count()})")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "runs"
    work.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if not cuda else "4")}
    topo = None
    if cuda:
        try:
            topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError) as e:
            topo = f"nvidia-smi topo -m failed: {e}"
    result = {"benchmark": "multi_gpu", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if cuda else "cpu",
              "gpus": torch.cuda.device_count() if cuda else 0, "nproc": nproc, "gpu_topology": topo,
              "nccl_env": {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_SYMM", "NVSHMEM"))},
              "versions": versions(), "commit": os.environ.get("HYLO_COMMIT"), "smoke": args.smoke, "phases": {}}
    json_path = args.out / "multi_gpu.json"

    def save():
        tmp = json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(json_path)

    common = dict(data=args.data, schedule=dict(kind="cosine", warmup=2), eval_interval=0,
                  checkpoint_interval=0, seed=0)
    phases = {
        "equivalence": dict(model=dict(TINY if args.smoke else HYBRID_SMALL), seq_len=64 if args.smoke else 512,
                            batch=2 if args.smoke else 4, steps=args.eq_steps, bf16=False, eval_batches=2,
                            log_interval=1),
        "throughput": dict(model=dict(TINY if args.smoke else HYBRID_125M), seq_len=64 if args.smoke else 2048,
                           batch=2 if args.smoke else args.batch_size, steps=6 if args.smoke else args.steps,
                           bf16=True, eval_batches=1, log_interval=1),
    }
    ok = True
    for phase in args.phases:
        p = phases[phase]
        cfg = dict(common, model=p["model"], seq_len=p["seq_len"], max_steps=p["steps"], bf16=p["bf16"],
                   eval_batches=p["eval_batches"], optimizer=dict(lr=2e-3),
                   logging=dict(log_interval=p["log_interval"]))
        rec = result["phases"][phase] = {"model": p["model"], "seq_len": p["seq_len"], "steps": p["steps"],
                                         "bf16": p["bf16"], "runs": {}}
        plan = [("single", dict(cfg, batch_size=p["batch"] * nproc), 1),
                ("ddp", dict(cfg, batch_size=p["batch"]), nproc),
                ("fsdp", dict(cfg, batch_size=p["batch"], fsdp=True), nproc)]
        for name, c, n in plan:
            env_run = dict(env, CUDA_VISIBLE_DEVICES=",".join(map(str, range(n)))) if cuda else env
            r = run_one(f"{phase}-{name}", c, n, work, args.run_timeout, env_run)
            rec["runs"][name] = r
            steps = len(r.get("train", []))
            print(f"[{phase}] {name}: rc={r.get('rc')} {steps} logged steps in {r['wall_s']:.0f} s"
                  + (f", val loss {r['val_loss']:.5f}" if "val_loss" in r else ""), flush=True)
            if r.get("rc") != 0:
                print(r.get("output_tail", "")[-1500:], flush=True)
            rec["comparison"] = compare(rec["runs"])
            save()
        cmp = rec["comparison"]
        if phase == "equivalence":
            rec["tolerance"] = args.tol
            rec["passed"] = all(rec["runs"][n].get("rc") == 0 and len(rec["runs"][n].get("train", [])) == p["steps"]
                                for n in rec["runs"]) and len(cmp) == 2 and all(
                c["max_abs_loss_diff"] is not None and c["max_abs_loss_diff"] <= args.tol
                and c.get("val_loss_diff", 0.0) <= args.tol for c in cmp.values())
            ok &= rec["passed"]
            print(f"[equivalence] {json.dumps(cmp)} -> {'PASS' if rec['passed'] else 'FAIL'}", flush=True)
        else:
            skip = min(args.skip, max(1, p["steps"] // 2))
            tps = {n: steady_tps(r.get("train", []), skip) for n, r in rec["runs"].items()}
            rec["skip"] = skip
            rec["tokens_per_s"] = tps
            if tps.get("single"):
                rec["speedup_vs_single"] = {n: v / tps["single"] for n, v in tps.items() if v and n != "single"}
                rec["scaling_efficiency"] = {n: v / nproc for n, v in rec["speedup_vs_single"].items()}
            print(f"[throughput] tokens/s {json.dumps({k: round(v) if v else v for k, v in tps.items()})}; "
                  f"speed-up {json.dumps(rec.get('speedup_vs_single'))}; loss diffs {json.dumps(cmp)}", flush=True)
        save()
    result["passed"] = ok
    save()
    plot(result, args.out / "multi_gpu.png")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
