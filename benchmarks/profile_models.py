"""Latency of several hybrids on one GPU, and the LUT predictor against the measurements. One call:

    HYLO_COMMIT=$(git rev-parse HEAD) python benchmarks/profile_models.py --lut OLD/lut.json --out OUT

1. Builds the per-operator LUT (``hylo.profile.measure.build_lut``) for the pieces of the models measured at a
   LUT width, over contexts 1K..32K and batches 1..1024 (points whose state exceeds half the free memory are
   skipped), bf16. ``--lut PATH`` starts from an earlier table (only what it lacks is measured, and what it measured
   with a ``HYLO_*`` switch set otherwise, unless ``--keep-stale``); the table used is written to ``OUT/lut.json``;
   ``--skip-lut`` measures nothing (predicts from ``--lut`` as it is).
2. Profiles each model with random weights in bf16 (``hylo.profile.report.profile_model``): ms/token at batch 1
   (CUDA graph) at contexts 1K and 32K; the time to generate 8K tokens at batch 1 from an empty context (step
   time sampled at 3 positions of an 8K cache and integrated: the step of PyTorch ops reads attention's whole
   preallocated cache, so its time does not grow with the position, while the kernel decode step's attention,
   taken by attention + FFN models on CUDA, reads up to the position); throughput at 32K context at the largest batch
   that fits (free memory x 0.9 over state + step temporaries per row, measured) and at batches 1, 16, 128.
3. Predicts each of those numbers from the LUT and the config alone and reports the relative errors; goal:
   |error| <= 10% on every reported quantity (8K-token time, decode ms/token, throughput at every batch, max
   batch), for at least 5 hybrids. Held-out models have a width no other model has: their pieces are estimated
   from other widths (interpolated or scaled in bytes, see ``hylo.profile.lut``), as the search will do.

Models (``--models`` picks some, comma-separated): hybrids nemotron-flash-1b (DeltaNet + Mamba2 + attention),
jet-nemotron-2b (JetBlock + 2 attention + 2 SWA), swa-m2-1b (Mamba2 + SWA), gdn-a-1b (GDN, 1 attention in 4),
deltanet-a-1b (DeltaNet, 1 attention in 4), m2-1a-1b (Mamba2 + one attention layer); attention-only all-attn-1b
(nemotron-flash-1b's width, vocab, FFN and parameter count) and qwen3-0.6b; held out: nemotron-flash-d1536
(DeltaNet + Mamba2 + attention at width 1536) and jet-gdn-swa-d1792 (JetBlock + GDN + SWA + attention at 1792).
Writes ``OUT/profile_models.json`` (with a ``summary`` per model and a ``verdict``), ``OUT/lut.json`` and PNG
plots in OUT. Expected run time on an H100: ~4 min from the LUT of an earlier run (its ~15 missing points: GDN,
~15 s), ~5 min from an empty LUT (the LUT ~90 s); ~10-20 s per model at a LUT width, ~50 s per held-out model
(kernels compiled for new shapes).
``--recompute PROFILE_JSON --lut LUT`` (CPU, no measurement) recomputes the predictions of an earlier run with
this code. ``--smoke`` runs the same code on tiny models on the CPU (a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hylo.config import HyloConfig  # noqa: E402
from hylo.presets import PRESETS, preset  # noqa: E402
from hylo.profile import LUT, model_memory  # noqa: E402
from hylo.profile.measure import build_lut, cleanup  # noqa: E402
from hylo.profile.plots import plot_context, plot_prediction, plot_throughput  # noqa: E402
from hylo.profile.report import ProfileOptions, environment, profile_model  # noqa: E402

GOAL = 0.10


def all_attention_like(name: str) -> HyloConfig:
    """An all-attention ``a f a f ...`` model with the width, heads, FFN and vocab of preset ``name`` and the
    number of layer pairs whose parameter count is closest to it."""
    ref = preset(name)
    target = model_memory(ref, 1)["weights_bytes"]
    best = None
    for n in range(2, 64):
        cfg = HyloConfig(**{**PRESETS[name], "layers": " ".join(["a f"] * n), "num_meta_tokens": 0})
        d = abs(model_memory(cfg, 1)["weights_bytes"] - target)
        if best is None or d < best[0]:
            best = (d, cfg)
    return best[1]


def models_gpu() -> list[tuple[str, HyloConfig, bool]]:
    """(name, config, in the LUT). Hybrids with different operator mixes at the LUT's widths (1024, 1536, 2048),
    two attention-only references, and two hybrids held out at widths no other model has (their mixers are
    estimated from other widths, as the search will do)."""
    nf = {**PRESETS["nemotron-flash-1b"], "num_meta_tokens": 0}

    def at_2048(layers: str, **kw) -> HyloConfig:  # Nemotron-Flash-1B's width, heads, FFN and vocab
        return HyloConfig(**{**nf, "layers": layers, **kw})

    return [
        ("nemotron-flash-1b", preset("nemotron-flash-1b"), True),  # DeltaNet + Mamba2 + attention
        ("all-attn-1b", all_attention_like("nemotron-flash-1b"), True),
        ("qwen3-0.6b", preset("qwen3-0.6b"), True),
        ("jet-nemotron-2b", preset("jet-nemotron-2b"), True),  # JetBlock + attention + SWA
        ("swa-m2-1b", at_2048(" ".join(["m2 f swa f"] * 6), swa_window=1024), True),
        ("gdn-a-1b", at_2048(" ".join(["gdn f gdn f gdn f a f"] * 3)), True),  # GDN-heavy, 1 attention in 4
        ("deltanet-a-1b", at_2048(" ".join(["d f d f d f a f"] * 4)), True),
        ("m2-1a-1b", at_2048(" ".join(["m2 f"] * 6 + ["a f"] + ["m2 f"] * 6)), True),  # one attention layer
        ("nemotron-flash-d1536 (held out)", HyloConfig(**{**PRESETS["nemotron-flash-1b"], "hidden_size": 1536,
                                                          "attn_num_heads": 12, "attn_num_kv_heads": 4,
                                                          "attn_head_dim": 128, "deltanet_num_heads": 12,
                                                          "ffn_intermediate_size": 4608}), False),
        # four mixers, none measured at this width: JetBlock scaled up from 1536, GDN and SWA down from 2048
        ("jet-gdn-swa-d1792 (held out)", HyloConfig(**{**nf, "hidden_size": 1792, "attn_num_heads": 14,
                                                       "attn_num_kv_heads": 2, "attn_head_dim": 128,
                                                       "swa_window": 1024, "ffn_intermediate_size": 5376,
                                                       "jet_head_k_dim": 96, "jet_head_v_dim": 256,
                                                       "layers": " ".join(["jet f gdn f swa f jet f gdn f a f"] * 3)}),
         False),
    ]


def models_smoke() -> list[tuple[str, HyloConfig, bool]]:
    return [("tiny-all", preset("tiny-all"), True),
            ("tiny-attn", HyloConfig(**{**PRESETS["tiny-all"], "layers": "a f a f"}), True),
            ("tiny-all-d96 (held out)", preset("tiny-all", hidden_size=96), False)]


def is_hybrid(cfg: HyloConfig) -> bool:
    """More than one kind of token mixer."""
    return len({op for op in cfg.layers if op != "ffn"}) > 1


def exact_pieces(cfg: HyloConfig, lut: LUT) -> list[str]:
    """The layer operators of ``cfg`` whose signature the LUT holds (a held-out model should have none)."""
    from hylo.profile.lut import LAYER_OPS, model_pieces, sig_key

    groups = lut.groups()
    return sorted({op for op, sig, _ in model_pieces(cfg) if op in LAYER_OPS and sig_key(op, sig) in groups})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/profile")
    ap.add_argument("--lut", default=None, help="start from this LUT (read only; default OUT/lut.json when it "
                                                "exists): only the entries it lacks are measured; the table used "
                                                "is written to OUT/lut.json")
    ap.add_argument("--skip-lut", action="store_true", help="measure no LUT entry: predict from --lut as it is")
    ap.add_argument("--keep-stale", action="store_true",
                    help="keep --lut's entries measured with HYLO_* switches set otherwise (default: measure again)")
    ap.add_argument("--lut-time-limit", type=float, default=150.0, help="seconds at most for the LUT build")
    ap.add_argument("--models", default="", help="comma-separated subset of the model names (default: all)")
    ap.add_argument("--recompute", default=None, metavar="PROFILE_JSON",
                    help="no measurement: recompute the predictions of a profile_models.json with --lut and this "
                         "code (CPU), and write OUT/profile_models.json")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.recompute:
        return recompute(Path(args.recompute), args.lut, out, models_smoke() if args.smoke else models_gpu())
    if args.smoke:
        device, dtype, specs = "cpu", torch.float32, models_smoke()
        lut_ctx, lut_b = [16, 64], [1, 2, 4]
        opts = ProfileOptions(contexts=[16, 64], generate_tokens=64, prefill=[], throughput_contexts=[64],
                              sweep_batches=[1, 2], max_batch=4, steps=4, throughput_steps=4, repeats=1)
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/profile_models.py needs a CUDA device (or --smoke for a CPU check)")
        device, dtype, specs = "cuda", torch.bfloat16, models_gpu()
        lut_ctx = [1024, 2048, 4096, 8192, 16384, 32768]
        lut_b = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
        # decode at 1K and 32K (8K: the generate measure), the sweep at 3 batches below the max: ~15-20 s a model
        opts = ProfileOptions(contexts=[1024, 32768], generate_tokens=8192, prefill=[],
                              throughput_contexts=[32768], sweep_batches=[1, 16, 128], max_batch=1024, steps=32,
                              throughput_steps=8, repeats=3)
    if args.models:
        want = [w.strip() for w in args.models.split(",") if w.strip()]
        unknown = [w for w in want if w not in [n for n, _, _ in specs]]
        if unknown:
            sys.exit(f"unknown model(s) {unknown}; known: {[n for n, _, _ in specs]}")
        specs = [sp for sp in specs if sp[0] in want]
    env = environment(device)
    doc = {"date": env["date"], "device": env["device"], "versions": env["versions"],
           "dtype": str(dtype).replace("torch.", ""), "goal_abs_rel_error": GOAL, "options": vars(opts),
           "lut": None, "models": [], "summary": []}
    path = out / "profile_models.json"

    def save():
        path.write_text(json.dumps(doc, indent=1))

    # ---- 1. the LUT, before any model takes memory
    src = Path(args.lut) if args.lut else out / "lut.json"
    if args.skip_lut and not src.exists():
        sys.exit(f"--skip-lut needs a LUT: {src} does not exist (pass --lut PATH)")
    lut = LUT.load(src) if src.exists() else LUT()
    n0 = len(lut)
    t0 = time.perf_counter()
    if not args.skip_lut:
        lut = build_lut([c for _, c, in_lut in specs if in_lut], lut_ctx, lut_b, device=device, dtype=dtype,
                        lut=lut, repeats=3, target_ms=10.0, time_limit_s=args.lut_time_limit,
                        keep_stale=args.keep_stale,  # summaries ("LUT: ...") always, each point with --smoke
                        log=lambda s: print(s, flush=True) if args.smoke or s.startswith("LUT:") else None)
    lut_path = out / "lut.json"
    lut.save(lut_path)
    n_err = sum("error" in e for e in lut.entries)
    doc["lut"] = {"path": str(lut_path), "from": str(src) if n0 else None, "entries": len(lut),
                  "measured_now": len(lut) - n0, "skipped_or_failed": n_err, "build_s": time.perf_counter() - t0,
                  "held_out_pieces_in_lut": {n: exact_pieces(c, lut) for n, c, in_lut in specs if not in_lut}}
    print(f"LUT: {len(lut)} entries ({len(lut) - n0} measured now, {n_err} skipped/failed) in "
          f"{doc['lut']['build_s']:.0f} s", flush=True)
    leaked = {k: v for k, v in doc["lut"]["held_out_pieces_in_lut"].items() if v}
    if leaked:
        print(f"warning: the LUT holds pieces of held-out models (not held out for those): {leaked}", flush=True)
    save()

    # ---- 2./3. each model: measure, predict
    for name, cfg, in_lut in specs:
        t1 = time.perf_counter()
        try:
            torch.manual_seed(0)
            from hylo.model import HybridLM

            with torch.device(device):
                model = HybridLM(cfg)
            model = model.to(dtype).eval()
            rec = profile_model(model, name, opts, source="random weights", lut=lut,
                                log=lambda s: print(s, flush=True))
            rec["in_lut"] = in_lut
            del model
        except Exception as e:  # noqa: BLE001  (one failing model is recorded, not fatal)
            rec = {"name": name, "error": f"{type(e).__name__}: {e}"[:500], "trace": traceback.format_exc()[-2000:]}
            print(f"{name}: FAILED {rec['error']}", flush=True)
        cleanup(device)
        rec["seconds"] = time.perf_counter() - t1
        rec["hybrid"] = is_hybrid(cfg)
        doc["models"].append(rec)
        doc["summary"].append(summarize(rec))
        print(json.dumps(doc["summary"][-1]), flush=True)
        save()
    finish(doc, out, opts.generate_tokens, opts.throughput_contexts[0])
    save()
    print(f"→ {path}")


def recompute(src: Path, lut_arg: str | None, out: Path, specs) -> None:
    """The predictions of a measured ``profile_models.json`` again, from a LUT and the configs of this script's
    model list (matched by name), with this code: checks a predictor change offline against GPU measurements."""
    from hylo.profile.report import compare

    doc = json.loads(src.read_text())
    lut_path = Path(lut_arg) if lut_arg else src.parent / "lut.json"
    lut = LUT.load(lut_path)
    cfgs = {n: (c, in_lut) for n, c, in_lut in specs}
    doc["recomputed"] = {"from": str(src), "lut": str(lut_path), "commit": os.environ.get("HYLO_COMMIT"),
                         "held_out_pieces_in_lut": {n: exact_pieces(c, lut) for n, (c, i) in cfgs.items() if not i}}
    doc["summary"] = []
    for rec in doc["models"]:
        if "error" not in rec:
            if rec["name"] not in cfgs:
                sys.exit(f"{rec['name']!r} is not in this script's model list ({list(cfgs)})")
            cfg = cfgs[rec["name"]][0]
            rec["prediction"] = compare(cfg, lut, rec)
            rec["hybrid"] = is_hybrid(cfg)
        doc["summary"].append(summarize(rec))
    opts = doc.get("options", {})
    finish(doc, out, opts.get("generate_tokens", 0), (opts.get("throughput_contexts") or [0])[0])
    (out / "profile_models.json").write_text(json.dumps(doc, indent=1))
    print(f"→ {out / 'profile_models.json'}")


def finish(doc: dict, out: Path, gen_tokens: int, thr_context: int) -> None:
    """Plots, the verdict (max |error| over every reported quantity; hybrids within the goal) and the table."""
    ok_models = [m for m in doc["models"] if "error" not in m]
    pdoc = {"environment": {"device": doc.get("device")}, "dtype": doc.get("dtype"), "models": ok_models}
    plot_context(pdoc, out / "ms_per_token_vs_context.png")
    plot_throughput(pdoc, out / "throughput_vs_batch.png")
    plot_prediction([(s["model"], s["gen_s_measured"], s["gen_s_predicted"]) for s in doc["summary"]
                     if s.get("gen_s_measured")], out / "predicted_vs_measured_generate.png",
                    f"time to generate {gen_tokens} tokens, batch 1 (s)")
    plot_prediction([(f"{s['model']} B={s['thr_batch']}", s["thr_measured"], s["thr_predicted"])
                     for s in doc["summary"] if s.get("thr_measured")], out / "predicted_vs_measured_throughput.png",
                    f"tokens/s at context {thr_context}, max batch")
    done = [s for s in doc["summary"] if s.get("max_abs_rel_error") is not None]
    errs = [s["max_abs_rel_error"] for s in done]
    doc["verdict"] = {
        "max_abs_rel_error": max(errs) if errs else None,
        "within_goal": bool(errs) and max(errs) <= GOAL and len(done) == len(doc["summary"]),
        "hybrids_within_goal": sorted(s["model"] for s in done if s.get("hybrid") and s["within_goal"]),
        "hybrids_measured": sum(1 for s in done if s.get("hybrid")),
        "held_out_within_goal": sorted(s["model"] for s in done if not s.get("in_lut") and s["within_goal"]),
        "held_out_measured": sum(1 for s in done if not s.get("in_lut")),
    }
    print(f"{'model':34s} {'gen s':>8s} {'pred':>8s} {'err':>7s} {'B':>5s} {'tok/s':>9s} {'pred':>9s} {'err':>7s} "
          f"{'maxB':>5s} {'predB':>5s} {'max|err|':>8s}")
    for s in doc["summary"]:
        if "error" in s:
            print(f"{s['model']:34s} FAILED: {s['error'][:80]}")
            continue

        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"

        print(f"{s['model']:34s} {f(s.get('gen_s_measured'), '8.2f')} {f(s.get('gen_s_predicted'), '8.2f')} "
              f"{f(s.get('gen_rel_error'), '+7.1%')} {f(s.get('thr_batch'), '5d')} {f(s.get('thr_measured'), '9.0f')} "
              f"{f(s.get('thr_predicted'), '9.0f')} {f(s.get('thr_rel_error'), '+7.1%')} "
              f"{f(s.get('max_batch_measured'), '5d')} {f(s.get('max_batch_predicted'), '5d')} "
              f"{f(s.get('max_abs_rel_error'), '8.1%')}")
    print(f"verdict: {doc['verdict']}")


def summarize(rec: dict) -> dict:
    s = {"model": rec["name"], "in_lut": rec.get("in_lut"), "hybrid": rec.get("hybrid")}
    if "error" in rec:
        return {**s, "error": rec["error"]}
    pr = rec.get("prediction") or {}
    g = pr.get("generate")
    if g:
        s.update(gen_s_measured=g["measured"], gen_s_predicted=g["seconds"], gen_rel_error=g["rel_error"])
    if pr.get("throughput"):
        t = pr["throughput"][0]
        s.update(thr_context=t["context"], thr_batch=t["batch"], thr_measured=t["measured"],
                 thr_predicted=t["tokens_per_s"], thr_rel_error=t["rel_error"])
        mb = t.get("max_batch") or {}
        s.update(max_batch_measured=mb.get("measured"), max_batch_predicted=mb.get("predicted"))
        if mb.get("measured") and mb.get("predicted") is not None:
            s["max_batch_rel_error"] = (mb["predicted"] - mb["measured"]) / mb["measured"]
    dec = pr.get("decode") or []
    s["decode_rel_errors"] = {d["context"]: d["rel_error"] for d in dec}
    s["sweep_rel_errors"] = {t["batch"]: t["rel_error"] for t in pr.get("throughput_vs_batch", [])}
    s["estimated_pieces"] = dec[0]["scaled"] if dec else []  # not measured at this signature: from other widths
    errs = [s.get("gen_rel_error"), s.get("thr_rel_error"), s.get("max_batch_rel_error"),
            *s["decode_rel_errors"].values(), *s["sweep_rel_errors"].values()]
    errs = [abs(e) for e in errs if e is not None]
    s["max_abs_rel_error"] = max(errs) if errs else None
    s["within_goal"] = bool(errs) and max(errs) <= GOAL
    s["errors"] = [e["what"] for e in rec.get("errors", [])]
    return s


if __name__ == "__main__":
    main()
