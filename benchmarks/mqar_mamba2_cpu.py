r"""CPU trials for issue 5: does pure Mamba2 ('m2 m2') learn MQAR with the reference path, next to 'd d' and
'gdn gdn' at equal steps, and which change (if any) makes it learn? One trial per call, appended to a JSON file:

    python benchmarks/mqar_mamba2_cpu.py --name m2_base --pattern "m2 m2" \
        --out benchmarks/results/mqar-mamba2-cpu-trials.json
    python benchmarks/mqar_mamba2_cpu.py --name m2_lr3 --pattern "m2 m2" --lr 3e-3 --out ...
    python benchmarks/mqar_mamba2_cpu.py --name m2_p16 --pattern "m2 m2" --model '{"mamba2_head_dim": 16}' --out ...

Each trial is one :func:`hylo.eval.mqar.train_one` on the CPU (reference ops, float32), with the MQAR recipe of
``benchmarks/mqar.py`` (AdamW, warmup 5% + cosine, weight decay 0.1, clip 1, curriculum 0.3) at the small scale of
``benchmarks/results/mqar-cpu-trials.json`` (vocabulary 256, width 64, batch 64). ``--model`` sets HyloConfig fields
over the MQAR defaults; ``--init`` changes Mamba2's own init (``reset_parameters`` keywords: dt_min, dt_max,
a_range; and ``D``, the skip's initial value); ``--lr-mult`` scales the learning rate of parameters by name
(e.g. Mamba2's dt_bias and A_log). A trial record: the arguments, the model's Mamba2 shape, ``hist``
rows ``[step, loss, probe accuracy]``, the final accuracy per test setting, ms/step, and each Mamba2 layer's
per-head ``dt`` (softplus of dt_bias), ``A`` and ``D`` at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hylo.eval import mqar  # noqa: E402


def mamba2_params(model) -> dict:
    """Per-head dt = softplus(dt_bias), A = -exp(A_log) and D of every Mamba2 layer (rounded)."""
    import torch.nn.functional as F

    out = {}
    for i, block in enumerate(model.layers):
        m = block.mixer
        if type(m).__name__ == "Mamba2":
            out[f"layer{i}"] = {"dt": [round(v, 4) for v in F.softplus(m.dt_bias.detach()).tolist()],
                                "A": [round(v, 3) for v in (-torch.exp(m.A_log.detach())).tolist()],
                                "D": [round(v, 3) for v in m.D.detach().tolist()]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--pattern", default="m2 m2")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--train", nargs="+", default=["16x2*2", "32x4*2", "32x8", "64x4*2", "64x8", "64x16"])
    ap.add_argument("--test", nargs="+", default=["32x8", "64x8", "64x16"])
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=float, default=0.05)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--curriculum", type=float, default=0.3)
    ap.add_argument("--curriculum-len", type=int, default=32)
    ap.add_argument("--examples", type=int, default=4000)
    ap.add_argument("--stop", type=float, default=None, help="stop once the probe reaches this accuracy")
    ap.add_argument("--max-time", type=float, default=175.0, help="seconds; the trial stops (truncated) there")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="{}", help="JSON of HyloConfig fields over the MQAR defaults")
    ap.add_argument("--init", default="{}",
                    help="JSON of Mamba2.reset_parameters keywords (dt_min, dt_max, a_range) and D")
    ap.add_argument("--lr-mult", default="{}",
                    help='JSON {parameter name suffix: lr multiplier}, e.g. {"dt_bias": 10, "A_log": 10}')
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model_kw, init_kw = json.loads(args.model), json.loads(args.init)
    cfg = mqar.HarnessConfig(patterns=[args.pattern], hidden=[args.hidden], train=args.train, test=args.test,
                             vocab_size=args.vocab, train_examples=args.examples, test_examples=512,
                             steps=args.steps, batch_size=args.bs, lr=args.lr, warmup=args.warmup,
                             weight_decay=args.wd, model=model_kw, device="cpu", bf16=False,
                             eval_batch_size=256, eval_interval=args.every, log_interval=args.every,
                             max_time_s=args.max_time, stop_accuracy=args.stop, curriculum=args.curriculum,
                             curriculum_len=args.curriculum_len, kernel_warmup=False, seed=args.seed)
    cfg.validate()
    train, tests = mqar.build_data(cfg)

    if init_kw:  # Mamba2's init with other ranges: patch reset_parameters' defaults for this process
        from hylo.layers import mamba2

        orig = mamba2.Mamba2.reset_parameters
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in init_kw.items() if k != "D"}

        def reset(self, **o):
            orig(self, **{**kw, **o})
            if "D" in init_kw:  # the skip's initial value (mamba_ssm: 1)
                with torch.no_grad():
                    self.D.fill_(float(init_kw["D"]))

        mamba2.Mamba2.reset_parameters = reset

    from hylo import model as hylo_model

    built = []  # the model train_one builds, to read its Mamba2 parameters before and after training
    init = hylo_model.HybridLM.__init__

    def record(self, *a, **k):
        init(self, *a, **k)
        built.append((self, mamba2_params(self)))

    hylo_model.HybridLM.__init__ = record
    lr_mult = json.loads(args.lr_mult)
    if lr_mult:  # split train_one's AdamW groups: parameters named ...<suffix> get lr * multiplier
        adamw = torch.optim.AdamW

        def split_groups(groups, lr, **kw):
            names = {id(p): n for n, p in built[-1][0].named_parameters()}
            out = []
            for g in groups:
                rest = [p for p in g["params"] if not any(names[id(p)].endswith(k) for k in lr_mult)]
                out.append({**g, "params": rest})
                for k, m in lr_mult.items():
                    sel = [p for p in g["params"] if names[id(p)].endswith(k)]
                    if sel:
                        out.append({**g, "params": sel, "lr": lr * m})
            return adamw([g for g in out if g["params"]], lr=lr, **kw)

        torch.optim.AdamW = split_groups
    t0 = time.perf_counter()
    rec = mqar.train_one(args.pattern, args.hidden, cfg, train, tests, torch.device("cpu"),
                         log=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    mcfg = mqar.model_config(args.pattern, args.hidden, args.vocab, model_kw)
    shape = {f: getattr(mcfg, f) for f in ("mamba2_expand", "mamba2_head_dim", "mamba2_state_size",
                                           "mamba2_conv_size", "mamba2_chunk_size", "mamba2_n_groups")}
    probe_key = next((k for k in rec["history"][0] if k.startswith("acc_")), None) if rec["history"] else None
    trial = {"name": args.name, "args": vars(args) | {"out": str(args.out)}, "mamba2": shape,
             "params": rec["params"], "steps": rec["steps"], "planned_steps": rec["planned_steps"],
             "truncated": rec["truncated"], "solved_at": rec["solved_at"],
             "acc": {k: round(v, 4) for k, v in rec["accuracy"].items()},
             "final_loss": rec["final_loss"], "time_s": round(wall, 1),
             "ms_step": round(1000 * rec["train_time_s"] / max(rec["steps"], 1), 1), "probe": probe_key,
             "mamba2_params": {"init": built[0][1], "final": mamba2_params(built[0][0])} if built else None,
             "hist": [[h["step"], round(h["loss"], 3)] + ([round(h[probe_key], 3)] if probe_key in h else [])
                      for h in rec["history"]]}
    data = json.loads(args.out.read_text()) if args.out.exists() else {"kind": "mqar-mamba2-cpu-trials",
                                                                        "trials": []}
    data["trials"] = [t for t in data["trials"] if t["name"] != args.name] + [trial]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1))
    print(json.dumps({k: v for k, v in trial.items() if k != "args"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
