r"""CPU trials: which peak learning rate (1e-3, 3e-3, 1e-2) lets the width-64 hybrids 'd a' and 'gdn a' learn MQAR
fastest, next to 'a a'? One trial per call, appended to a JSON file (one thread; run trials one at a time):

    python benchmarks/mqar_hybrid_cpu_trials.py --name da_lr3e-3 --pattern "d a" --lr 3e-3 \
        --out benchmarks/results/mqar-hybrid-cpu-trials.json
    python benchmarks/mqar_hybrid_cpu_trials.py --name gdna_lr1e-2 --pattern "gdn a" --lr 1e-2 --out ...

Each trial is one :func:`hylo.eval.mqar.train_one` on the CPU (reference ops, float32) with the settings of the
'g128_cur03' family of ``benchmarks/results/mqar-cpu-trials.json``, so its 'a a' and 'gdn a' records at lr 1e-3
compare step for step: width 64, vocabulary 256, train 32x4*3 64x4*3 64x8*2 128x8 128x16 128x32 (4000 examples
per setting), tests 64x4 128x8 128x16 128x32, batch 64, AdamW (betas 0.9/0.98, weight decay 0.1, clip 1), warmup
5% + cosine over 5000 planned steps, curriculum 0.3 over settings <= 64, probe = one batch (256) of 128x32 every
``--every`` steps, stop at probe >= ``--stop``, hard cap ``--max-time`` seconds. A record: the arguments, ``hist``
rows ``[step, loss, probe accuracy]``, the final accuracy per test setting, ms/step, commit and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hylo.eval import mqar  # noqa: E402

G128_TRAIN = ["32x4*3", "64x4*3", "64x8*2", "128x8", "128x16", "128x32"]
G128_TEST = ["64x4", "128x8", "128x16", "128x32"]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--pattern", default="d a")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--train", nargs="+", default=G128_TRAIN)
    ap.add_argument("--test", nargs="+", default=G128_TEST)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5000, help="planned steps (sets the cosine and the curriculum)")
    ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--every", type=int, default=100, help="steps between probes")
    ap.add_argument("--stop", type=float, default=0.95)
    ap.add_argument("--max-time", type=float, default=300.0, help="seconds of training; truncated there")
    ap.add_argument("--examples", type=int, default=4000, help="training examples per setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)

    cfg = mqar.HarnessConfig(
        patterns=[args.pattern], hidden=[args.hidden], train=[mqar.parse_train_setting(s) for s in args.train],
        test=[mqar.parse_setting(s) for s in args.test], vocab_size=args.vocab, train_examples=args.examples,
        steps=args.steps, batch_size=args.bs, lr=args.lr, warmup=0.05, weight_decay=0.1, seed=args.seed,
        device="cpu", bf16=False, eval_interval=args.every, log_interval=args.every, stop_accuracy=args.stop,
        max_time_s=args.max_time, kernel_warmup=False, curriculum=0.3, curriculum_len=64)
    cfg.validate()
    train, tests = mqar.build_data(cfg)
    rec = mqar.train_one(args.pattern, args.hidden, cfg, train, tests, torch.device("cpu"))
    probe = next(k for k in rec["history"][0] if k.startswith("acc_")) if rec["history"] else None
    trial = {"name": args.name, "pattern": rec["name"], "lr": args.lr, "args": vars(args) | {"out": str(args.out)},
             "solved_at": rec["solved_at"], "steps": rec["steps"], "planned_steps": rec["planned_steps"],
             "truncated": rec["truncated"], "acc": {k: round(v, 4) for k, v in rec["accuracy"].items()},
             "final_loss": round(rec["final_loss"], 4), "time_s": rec["train_time_s"],
             "ms_step": round(1e3 * rec["train_time_s"] / max(rec["steps"], 1), 1), "params": rec["params"],
             "hist": [[h["step"], round(h["loss"], 4)] + ([round(h[probe], 4)] if probe in h else [])
                      for h in rec["history"]],
             "commit": commit(), "date": datetime.date.today().isoformat()}
    data = json.loads(args.out.read_text()) if args.out.exists() else {"kind": "mqar-hybrid-cpu-trials",
                                                                       "trials": []}
    data["trials"] = [t for t in data.setdefault("trials", []) if t.get("name") != args.name] + [trial]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps({k: v for k, v in trial.items() if k not in ("args", "hist")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
