r"""MQAR on one GPU: does hylo separate the operators the way Zoology does? Two calls of under 9 minutes each on
an H100, then a merge:

    HYLO_COMMIT=$(git rev-parse HEAD) python benchmarks/mqar.py --out benchmarks/results/mqar-h100-a \
        --patterns attn "gdn + attn" "deltanet + attn" --budget 400
    HYLO_COMMIT=$(git rev-parse HEAD) python benchmarks/mqar.py --out benchmarks/results/mqar-h100-b \
        --patterns mamba2 deltanet gdn "swa (w=32)" "mamba2 + attn" --budget 220
    python benchmarks/mqar.py --merge benchmarks/results/mqar-h100-{a,b}/mqar.json --out benchmarks/results/mqar-h100

Under an outer time limit (a device call), pass ``--wall-limit`` a little below it: each model's training is then
fitted to the time left (less the warm-ups and scoring seen so far), so the last model is not killed mid-run; an
interrupt (Ctrl-C, ``timeout -s INT``) during a model's training stops it there and still scores and saves it.
``--lr-for 'mamba2 + attn=1e-2'`` gives one pattern its own rate (e.g. the best of an earlier ``--lrs`` sweep).

Every pattern is a model of two sequence mixers and no MLP at width 128, as Zoology's MQAR models are, trained on
the same mix of MQAR settings (by default sequence lengths 512 and 1024 with 8 to 256 key-value pairs, plus short
easy settings; vocabulary 1024; ``--lengths`` and ``--vocab-size`` change them) with the same recipe for the same
wall-clock budget, then scored on each setting. Expected, as in the literature: attention solves every setting;
pure recurrent models (Mamba2, DeltaNet, Gated DeltaNet) and small-window SWA lose accuracy as the pairs grow past
what their fixed-size state holds; a hybrid with one attention layer recovers most of it.

``--budget`` counts training seconds only: each model first runs an untimed kernel warm-up (Triton compilation
and fla autotuning, up to 1-3 minutes for a new kernel shape; ``warmup_s`` in the record), then its clock starts.
``--warm-first`` runs every model's warm-up before any training, so that under ``--wall-limit`` the time left for
training is known when it is shared out.
The budget is shared out as the run goes (training time left / models left); a model whose probe (one batch of
1024x256) reaches 99% stops early and leaves its time to the rest. Wall time per call is about the budget plus
the warm-ups, data generation (~10 s) and evaluations (~1 s per model). Attention goes first in its call: a
device fault in a later model (the first H100 attempt lost 'mamba2 + attn' to an illegal memory access in fla's
backward) then cannot cost it its run.

Recipe (the same for every pattern; found on the CPU at small scale, trials in
``benchmarks/results/mqar-cpu-trials.json``): AdamW lr 1e-3,
warmup 5% then cosine, batch 128, and a curriculum (``--curriculum 0.3``): batches start with the short settings
(<= 128 tokens) only and the whole mix is phased in linearly over the first 30% of the steps. Pure attention (RoPE,
no short convolution) sits on a loss plateau until its previous-token and induction heads form; the plateau grows
with the sequence length, and the short settings end it sooner. Without the curriculum, and with only 2,002 steps
(21 s of a shared budget), the first H100 run's 'a a' was still on it (loss 5.6; the in-context guessing level is
about 4.5 for this mix). CPU runs ('a a' width 64, batch 64, vocabulary 256, planned 5000 steps, probe = one
batch of the hardest test setting; no model change, no bug: a 2-layer attention model memorises a small set, and
the loss agrees with HybridLM's labels path):

    mix (tests)                                     recipe          steps: loss, probe accuracy
    16x2*2 32x4*2 32x8 (32x8)                       lr 1e-3         500: 2.89 .19 · 750: 1.88 .80 · 1000: 0.13 .98
                                                    lr 3e-3         750: 2.30 .21 · 1000: 0.69 .96
                                                    4 heads         1000: 1.82 .65 · 1250: 0.35 .88 · 2500: 0.07 .94
                                                    4 heads, qkv bias, lr 3e-3: 4750: 1.60 .17
    32x4*3 64x4*3 64x8*2 64x16 (64x16)              lr 1e-3         1250: 2.90 .10 · 1500: 1.12 .97
      the same, batch 32, 1500 planned steps        lr 1e-3         1500: 3.01 .08 (lr decayed on the plateau)
    32x4*3 64x4*3 64x8*2 128x{8,16,32} (128x32)     no curriculum   1000: 3.52 .04 · 1250: 2.21 .64 · 1500: 0.41 .79
                                                    curriculum 0.3  500: 3.41 .05 · 750: 1.61 .69 · 1000: 0.20 .995
                                                    (<= 64 first)
      the same mix, 'gdn a'                         no curriculum   500: 3.84 .12 · 750: 1.36 .63
                                                    curriculum 0.3  500: 2.04 .51 · 750: 0.30 .79 · 1000: 0.14 .89
      the same mix, 'd d' (pure recurrent)          curriculum 0.3  500: 1.33 .79 · 750: 0.12 .93

So the earlier CPU trials (1000-1500 planned steps at batch 32, where lr, vocabulary, weight decay and a curriculum
were tried) ended while attention was still on the plateau, with the cosine schedule already decaying. With a long
enough schedule, the learning rate (1e-3 vs 3e-3) and 4 heads did not shorten it (4 heads with a qkv bias at 3e-3
lengthened it); the curriculum did, and it speeds up the hybrid as well (one recipe for all patterns, not a
handicap for the others).
On the H100 'a a' runs ~100 steps/s (attempt 1: steps 1000-1750 in 7.3 s), 'gdn a' ~58 steps/s (attempt 2), so
the first call's 400 s give each of its three models ~133 s: ~13,000 steps for attention, ~7,700 for a hybrid.

One learning rate does not suit every operator at these budgets (issue 5): on 2 H200s 'm2 m2' at 1e-3 stayed at
~0 accuracy; on the CPU (``benchmarks/results/mqar-mamba2-cpu-trials.json``, reference ops, so not a GPU-kernel
fault) pure Mamba2 sits on the in-context guessing plateau for 1000 steps at 1e-3 (3e-3: slowly leaving it) and
solves the task at 1e-2, while 'a a' solves it at 1e-3 and stays on its plateau at 1e-2, and DeltaNet and Gated
DeltaNet learn at either rate. ``--lrs 1e-3 1e-2`` trains every pattern at each rate (the budget shared over all
runs) and keeps each pattern's best run, as Zoology's sweeps do; the record's ``lr_sweep`` lists every rate's result.

Writes ``mqar.json`` (per-model accuracy by setting, steps, state size, the separation checks, environment) and
``mqar.png`` (accuracy against pairs, one line per pattern, one panel per length) into ``--out``. A model that
fails is recorded with its error and the run goes on. ``--smoke`` runs a tiny version on the CPU (a minute).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hylo.eval import mqar  # noqa: E402

# name -> layer pattern (Zoology's MQAR models: two sequence mixers, no MLP); names go into the plot legend
PATTERNS = {
    "attn": "a a",
    "gdn + attn": "gdn a",
    "mamba2 + attn": "m2 a",
    "deltanet + attn": "d a",
    "mamba2": "m2 m2",
    "deltanet": "d d",
    "gdn": "gdn gdn",
    "swa (w=32)": "swa swa",
}
PURE_RECURRENT = ("mamba2", "deltanet", "gdn")
HYBRIDS = ("gdn + attn", "mamba2 + attn", "deltanet + attn")


LEARNED = 0.5  # mean accuracy on the easiest settings (8 pairs) below which a model did not learn the task


def separation(result: dict) -> dict:
    """The issue's three claims, checked on the hardest settings (most pairs at each length). A model below
    :data:`LEARNED` on the easiest settings did not learn the task at all (a learning rate or budget problem, not
    a capacity one): it is listed in ``not_learned`` and left out of the degrade and recover checks, which are
    None when nothing is left to judge."""
    runs = {r["name"]: r for r in result["runs"] if not r.get("error")}
    tests = [mqar.parse_setting(s) for s in result["settings"]["test"]]
    hardest = {}
    for L, n in tests:
        hardest[L] = max(hardest.get(L, 0), n)
    hard_keys = [f"{L}x{n}" for L, n in sorted(hardest.items())]
    easy_keys = [f"{L}x{min(n for LL, n in tests if LL == L)}" for L in sorted(hardest)]

    def mean(name, keys):
        r = runs.get(name)
        return None if r is None else sum(r["accuracy"][k] for k in keys) / len(keys)

    out = {"hard_settings": hard_keys, "easy_settings": easy_keys, "models": {}}
    for name in runs:
        out["models"][name] = {"easy": mean(name, easy_keys), "hard": mean(name, hard_keys),
                               "all": sum(runs[name]["accuracy"].values()) / len(runs[name]["accuracy"])}
    attn = out["models"].get("attn")
    out["attention_solves"] = None if attn is None else attn["all"] >= 0.9
    out["not_learned"] = sorted(n for n, m in out["models"].items() if m["easy"] < LEARNED)
    learned = {n: m for n, m in out["models"].items() if n not in out["not_learned"]}
    drops = {n: out["models"][n]["easy"] - out["models"][n]["hard"] for n in PURE_RECURRENT if n in out["models"]}
    out["recurrent_drop"] = drops
    judged = [d for n, d in drops.items() if n in learned]
    out["recurrent_degrade"] = all(d >= 0.15 for d in judged) if judged else None
    if attn is not None:
        if attn["hard"] < 0.05:  # attention did not learn the hard settings: a ratio to it means nothing
            out["hybrid_recovery"], out["hybrids_recover"] = None, None
            return out
        rec = {n: out["models"][n]["hard"] / attn["hard"] for n in HYBRIDS if n in out["models"]}
        best_pure = max((learned[n]["hard"] for n in PURE_RECURRENT if n in learned), default=None)
        out["hybrid_recovery"] = rec  # hybrid accuracy / attention accuracy on the hardest settings
        rec_learned = {n: v for n, v in rec.items() if n in learned}
        out["hybrids_recover"] = (all(v >= 0.8 for v in rec_learned.values()) and (
            best_pure is None or min(learned[n]["hard"] for n in rec_learned) > best_pure)) if rec_learned else None
    return out


def warm_all(patterns: list[str], cfg, train, tests, device) -> dict[str, float | str]:
    """``--warm-first``: each pattern's kernel warm-up (``hylo.eval.mqar.warm_up``) on a throwaway model of its
    shape, in the order given, before any training; the compiled kernels and autotuning results stay in this
    process, so each model's own warm-up later takes seconds. Returns seconds (or the error) per pattern."""
    from hylo.model import HybridLM

    out: dict[str, float | str] = {}
    for name in patterns:
        try:
            model = HybridLM(mqar.model_config(PATTERNS[name], cfg.hidden[0], cfg.vocab_size, cfg.model)).to(device)
            out[name] = round(mqar.warm_up(model, mqar.mqar_loss, train, tests, cfg, device), 1)
            print(f"warm-up {name}: {out[name]:.0f}s", flush=True)
        except Exception as e:  # noqa: BLE001  (training will meet the error again and record it)
            out[name] = f"{type(e).__name__}: {e}"[:300]
            print(f"warm-up {name} failed: {out[name]}", flush=True)
    return out


def merge(paths: list[Path], out: Path) -> int:
    """Combine result files of several calls (e.g. a ``--patterns`` split) into one ``mqar.json`` + plot in
    ``out``: the runs in the given order (a pattern in several files: the last one wins), the first file's
    settings and environment, the separation checks recomputed on all runs."""
    import json

    results = [json.loads(Path(p).read_text()) for p in paths]
    tests = [results[0]["settings"]["test"]] + [r["settings"]["test"] for r in results[1:]]
    if any(t != tests[0] for t in tests):
        print(f"cannot merge: the files test different settings ({[len(t) for t in tests]} settings)")
        return 1
    runs = {}
    for r in results:
        for rec in r["runs"]:
            runs[rec["name"]] = rec
    order = [n for n in PATTERNS if n in runs] + [n for n in runs if n not in PATTERNS]
    merged = {**results[0], "runs": [runs[n] for n in order], "merged_from": [str(p) for p in paths],
              "environments": [r.get("environment") for r in results],
              "total_time_s": sum(r.get("total_time_s") or 0 for r in results)}
    merged["table"] = mqar.table_rows(merged)
    merged["separation"] = separation(merged)
    written = mqar.save(merged, out)
    mqar.print_summary(merged)
    print(f"merged {len(paths)} files ({len(order)} models) -> {', '.join(map(str, written.values()))}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for mqar.json and mqar.png")
    ap.add_argument("--budget", type=float, default=250.0,
                    help="seconds of training for all models together (shared out as the run goes)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lrs", type=float, nargs="+", metavar="LR",
                    help="learning rates to sweep: every pattern is trained at each (the budget is shared over "
                         "all runs) and its best run by mean accuracy is kept, as Zoology does (issue 5: Mamba2 "
                         "needs ~1e-2 where attention learns at 1e-3); default: --lr only")
    ap.add_argument("--lr-for", action="append", default=[], metavar="PATTERN=LR",
                    help="learning rate of one pattern (repeatable), e.g. --lr-for 'mamba2 + attn=1e-2'; the "
                         "others take --lr (ignored with --lrs)")
    ap.add_argument("--wall-limit", type=float, metavar="S",
                    help="seconds for the whole script: each model's training is fitted to end early enough "
                         "(--reserve) for its scoring and the final save; use it under an outer time limit")
    ap.add_argument("--reserve", type=float, default=20.0,
                    help="seconds kept free at the end of --wall-limit for scoring and saving")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024], metavar="L",
                    help="test sequence lengths; each is tested at 8, 16, ... pairs up to L/4 (at most 512 pairs), "
                         "and the training mix adds short settings (e.g. --lengths 512 1024 2048 for harder tests; "
                         "512 pairs need --vocab-size >= 1026)")
    ap.add_argument("--max-steps", type=int, default=20_000, help="upper bound; the budget usually binds first")
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    ap.add_argument("--curriculum", type=float, default=0.3,
                    help="fraction of each model's steps over which batches move from the short settings "
                         "(<= 128 tokens) to the whole mix (0: the mix from the start)")
    ap.add_argument("--warmup", type=float, default=0.05, help="learning-rate warmup, fraction of the steps")
    ap.add_argument("--no-kernel-warmup", action="store_true",
                    help="do not run the untimed compile/autotune step before each model's clock starts")
    ap.add_argument("--warm-first", action="store_true",
                    help="run every model's kernel warm-up before any training, so the training time left is known "
                         "when it is shared out (on a fresh GPU machine one pattern's warm-up took 169 s, which "
                         "the fit could not foresee and the last models lost their time)")
    ap.add_argument("--fp32", action="store_true",
                    help="train and score in float32 (default: bf16 autocast on CUDA), e.g. to test whether bf16 "
                         "slows a pattern's learning")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run to check the script")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="combine these result files (e.g. two --patterns calls) into --out; trains nothing")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out)

    t_start = time.perf_counter()
    if args.smoke:
        test = mqar.grid([32, 64], [2, 4, 8, 16])
        cfg = mqar.HarnessConfig(patterns=[], hidden=[32], train=[(16, 2, 2.0)] + test, test=test, vocab_size=128,
                                 train_examples=256, test_examples=64, steps=min(args.max_steps, 40),
                                 batch_size=16, lr=args.lr, model={"swa_window": 8}, log_interval=20,
                                 eval_interval=20, stop_accuracy=0.99, eval_batch_size=16, calib_steps=6,
                                 curriculum=args.curriculum, curriculum_len=32,
                                 kernel_warmup=not args.no_kernel_warmup)
    else:
        if any(L < 32 for L in args.lengths):
            raise SystemExit(f"--lengths: each must be >= 32 (8 pairs need 32 tokens), got {args.lengths}")
        test = mqar.grid(sorted(set(args.lengths)), [8, 16, 32, 64, 128, 256, 512])
        cfg = mqar.HarnessConfig(patterns=[], hidden=[args.hidden], train=mqar.default_train_mix(test), test=test,
                                 vocab_size=args.vocab_size, train_examples=4_000, test_examples=1_024,
                                 steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                                 warmup=args.warmup, model={"swa_window": 32}, log_interval=250,
                                 eval_interval=250, stop_accuracy=0.99, eval_batch_size=args.batch_size,
                                 curriculum=args.curriculum, curriculum_len=128,
                                 kernel_warmup=not args.no_kernel_warmup, bf16=not args.fp32)
    lr_for = {}
    for item in args.lr_for:
        name, eq, value = item.rpartition("=")
        if not eq or name.strip() not in PATTERNS:
            raise SystemExit(f"--lr-for {item!r}: use PATTERN=LR with PATTERN one of {list(PATTERNS)}")
        try:
            lr_for[name.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"--lr-for {item!r}: {value!r} is not a number") from None
    cfg.patterns = [PATTERNS[n] for n in args.patterns]
    cfg.lr_sweep = args.lrs
    cfg.validate()
    device = mqar.resolve_device(cfg.device)
    print(f"device {device} ({mqar.environment()['device']}); {len(cfg.patterns)} models, "
          f"{args.budget:.0f}s of training in all", flush=True)
    train, tests = mqar.build_data(cfg)
    train, tests = train.to(device), {k: d.to(device) for k, d in tests.items()}
    print(f"data: {len(train):,} training examples over {len(cfg.train)} settings, "
          f"{len(tests)} test settings ({time.perf_counter() - t_start:.1f}s)", flush=True)

    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "patterns"}
    settings.update(patterns=dict(zip(args.patterns, cfg.patterns)), budget_s=args.budget, smoke=args.smoke)
    result = {"kind": "mqar", "benchmark": "benchmarks/mqar.py", "environment": mqar.environment(),
              "settings": settings, "runs": []}
    spent = 0.0  # training seconds used so far (kernel warm-ups and evaluations are not counted)
    settings["lr_for"] = lr_for
    deadline = None if args.wall_limit is None else t_start + args.wall_limit - args.reserve
    jobs = [(name, lr) for name in args.patterns for lr in (args.lrs or [lr_for.get(name, args.lr)])]
    tried: list[dict] = []  # the current pattern's runs (one per learning rate)
    overheads: list[float] = []  # untimed seconds (kernel warm-up + scoring) of each model so far
    overhead = 0.0
    if args.warm_first and cfg.kernel_warmup:
        result["warm_first_s"] = warm_all(args.patterns, cfg, train, tests, device)
    try:
        for i, (name, lr) in enumerate(jobs):
            left = len(jobs) - i
            if deadline is not None and time.perf_counter() > deadline - 5:
                result["stopped"] = f"--wall-limit {args.wall_limit:g}s reached before {name} (lr {lr:g})"
                print(result["stopped"] + "; the results so far are kept", flush=True)
                break
            budget = max(5.0, (args.budget - spent) / left)
            if deadline is not None:  # what the wall clock leaves, less each model's warm-up and scoring so far
                budget = max(5.0, min(budget, (deadline - time.perf_counter()) / left - overhead))
            t_model = time.perf_counter()
            one = dataclasses.replace(cfg, lr=lr, lr_sweep=None, time_budget_s=budget, max_time_s=1.5 * budget + 10)
            print(f"[{i + 1}/{len(jobs)}] {name}: {PATTERNS[name]} · lr {lr:g} · {budget:.0f}s budget "
                  f"({time.perf_counter() - t_start:.0f}s elapsed)", flush=True)
            try:
                rec = mqar.train_one(PATTERNS[name], cfg.hidden[0], one, train, tests, device,
                                     log=lambda s: print(s, flush=True), deadline=deadline)
                rec["name"] = name
                spent += rec["train_time_s"]
                overheads.append(rec["warmup_s"] + rec["eval_time_s"])
                overhead = sum(overheads) / len(overheads)
                print(f"  {name}: " + " ".join(f"{k} {v:.2f}" for k, v in rec["accuracy"].items())
                      + f" · {rec['steps']} steps in {rec['train_time_s']:.0f}s (+{rec['warmup_s']:.0f}s warm-up)",
                      flush=True)
            except Exception as e:  # noqa: BLE001 - record and go on
                rec = {"name": name, "layers": PATTERNS[name], "hidden": cfg.hidden[0], "lr": lr, "accuracy": {},
                       "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=10)}
                print(f"  {name} FAILED: {rec['error']}", flush=True)
                spent += time.perf_counter() - t_model
                if device.type == "cuda":
                    try:
                        torch.cuda.empty_cache()
                    except Exception:  # noqa: BLE001 - a device fault (illegal address) poisons this process's context
                        rec["fatal"] = True
            tried.append(rec)
            if (rec.get("fatal") or rec.get("interrupted") or i + 1 == len(jobs)
                    or jobs[i + 1][0] != name):  # the pattern's last rate
                best = mqar.pick_best(tried)
                if len(tried) > 1:
                    print(f"  {name}: best lr {best.get('lr', float('nan')):g} of {args.lrs}", flush=True)
                result["runs"].append(best)
                tried = []
                mqar.save({**result, "table": mqar.table_rows(result)}, args.out, plot=False)  # partial results
            if rec.get("fatal"):
                print("  the CUDA context is lost after that fault: the remaining models cannot run in this process; "
                      "results so far are saved", flush=True)
                break
            if rec.get("interrupted"):  # scored where it stopped (train_one); the user asked to stop
                result["interrupted"] = True
                print("  interrupted: the remaining models are not trained; results so far are saved", flush=True)
                break
    except KeyboardInterrupt:  # outside a model's training (warm-up, scoring): keep the finished models
        result["interrupted"] = True
        print("interrupted: saving the models finished so far", flush=True)
    result["table"] = mqar.table_rows(result)
    try:
        result["separation"] = separation(result)
    except Exception as e:  # noqa: BLE001
        result["separation"] = {"error": f"{type(e).__name__}: {e}"}
    result["total_time_s"] = round(time.perf_counter() - t_start, 1)
    paths = mqar.save(result, args.out)
    mqar.print_summary(result)
    sep = result["separation"]
    print(f"separation: attention solves {sep.get('attention_solves')}, recurrent models degrade "
          f"{sep.get('recurrent_degrade')} (drop easy->hard {sep.get('recurrent_drop')}), hybrids recover "
          f"{sep.get('hybrids_recover')} (hybrid/attention on hardest {sep.get('hybrid_recovery')}); did not learn "
          f"the task: {sep.get('not_learned') or 'none'}")
    print(f"wrote {', '.join(map(str, paths.values()))} in {result['total_time_s']:.0f}s")
    return 0 if any(not r.get("error") for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
