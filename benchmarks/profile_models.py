"""Latency of several hybrids on one GPU, and the LUT predictor against the measurements. One call:

    HYLO_COMMIT=$(git rev-parse HEAD) python benchmarks/profile_models.py --out benchmarks/results/profile-h100

1. Builds the per-operator LUT (``hylo.profile.measure.build_lut``) for the pieces of the models below, over
   contexts 1K..32K and batches 1..1024 (points whose state exceeds half the free memory are skipped), bf16.
2. Profiles each model with random weights in bf16 (``hylo.profile.report.profile_model``): ms/token at batch 1
   (CUDA graph) at contexts 1K, 8K, 32K; the time to generate 8K tokens at batch 1 from an empty context (step
   time sampled at 3 positions of an 8K cache and integrated: hylo's attention step reads its whole preallocated
   cache, so the step time does not grow with the position); throughput at 32K context at the largest batch
   that fits (free memory x 0.9 over state + step temporaries per row, measured) and at smaller batches.
3. Predicts each of those numbers from the LUT and the config alone, and reports the relative error
   (goal: |error| <= 10% for the 8K-token time and the 32K throughput). The last model's width is not in the
   LUT (held out): its pieces are scaled from other widths, as the search will do.

Models: nemotron-flash-1b (d/m2/a), an all-attention model of the same parameter count (same width, vocab and
FFN), qwen3-0.6b's shape, jet-nemotron-2b (JetBlock-heavy with 2 attention + 2 SWA), a SWA/Mamba2 hybrid, and
nemotron-flash's pattern at hidden 1536 (held out). Writes ``OUT/profile_models.json``, ``OUT/lut.json`` and
PNG plots in OUT. Expected run time on an H100: ~4-5 min (LUT at most 150 s, ~20 s per model).
``--smoke`` runs the same code on tiny models on the CPU (a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
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
    """(name, config, in the LUT)."""
    nf = PRESETS["nemotron-flash-1b"]
    return [
        ("nemotron-flash-1b", preset("nemotron-flash-1b"), True),
        ("all-attn-1b", all_attention_like("nemotron-flash-1b"), True),
        ("qwen3-0.6b", preset("qwen3-0.6b"), True),
        ("jet-nemotron-2b", preset("jet-nemotron-2b"), True),
        ("swa-m2-1b", HyloConfig(**{**nf, "layers": " ".join(["m2 f swa f"] * 6), "swa_window": 1024,
                                    "num_meta_tokens": 0}), True),
        ("nemotron-flash-d1536 (held out)", HyloConfig(**{**nf, "hidden_size": 1536, "attn_num_heads": 12,
                                                          "attn_num_kv_heads": 4, "attn_head_dim": 128,
                                                          "deltanet_num_heads": 12, "ffn_intermediate_size": 4608}),
         False),
    ]


def models_smoke() -> list[tuple[str, HyloConfig, bool]]:
    return [("tiny-all", preset("tiny-all"), True),
            ("tiny-attn", HyloConfig(**{**PRESETS["tiny-all"], "layers": "a f a f"}), True),
            ("tiny-all-d96 (held out)", preset("tiny-all", hidden_size=96), False)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/profile")
    ap.add_argument("--lut", default=None, help="reuse (and extend) this LUT instead of OUT/lut.json")
    ap.add_argument("--lut-time-limit", type=float, default=150.0, help="seconds at most for the LUT build")
    ap.add_argument("--models", default="", help="comma-separated subset of the model names (default: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
        opts = ProfileOptions(contexts=[1024, 8192, 32768], generate_tokens=8192, prefill=[],
                              throughput_contexts=[32768], sweep_batches=None, max_batch=1024, steps=32,
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
    lut_path = Path(args.lut) if args.lut else out / "lut.json"
    lut = LUT.load(lut_path) if lut_path.exists() else LUT()
    t0 = time.perf_counter()
    lut = build_lut([c for _, c, in_lut in specs if in_lut], lut_ctx, lut_b, device=device, dtype=dtype, lut=lut,
                    repeats=3, target_ms=10.0, time_limit_s=args.lut_time_limit,
                    log=lambda s: print(s, flush=True) if args.smoke else None)
    lut.save(lut_path)
    n_err = sum("error" in e for e in lut.entries)
    doc["lut"] = {"path": str(lut_path), "entries": len(lut), "skipped_or_failed": n_err,
                  "build_s": time.perf_counter() - t0}
    print(f"LUT: {len(lut)} entries ({n_err} skipped/failed) in {doc['lut']['build_s']:.0f} s", flush=True)
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
        doc["models"].append(rec)
        doc["summary"].append(summarize(rec))
        print(json.dumps(doc["summary"][-1]), flush=True)
        save()

    # ---- plots and the verdict
    ok_models = [m for m in doc["models"] if "error" not in m]
    pdoc = {"environment": {"device": env["device"]}, "dtype": doc["dtype"], "models": ok_models}
    plot_context(pdoc, out / "ms_per_token_vs_context.png")
    plot_throughput(pdoc, out / "throughput_vs_batch.png")
    plot_prediction([(s["model"], s["gen_s_measured"], s["gen_s_predicted"]) for s in doc["summary"]
                     if s.get("gen_s_measured")], out / "predicted_vs_measured_generate.png",
                    f"time to generate {opts.generate_tokens} tokens, batch 1 (s)")
    plot_prediction([(f"{s['model']} B={s['thr_batch']}", s["thr_measured"], s["thr_predicted"])
                     for s in doc["summary"] if s.get("thr_measured")], out / "predicted_vs_measured_throughput.png",
                    f"tokens/s at context {opts.throughput_contexts[0]}, max batch")
    errs = [abs(v) for s in doc["summary"] for k, v in s.items() if k.endswith("_rel_error") and v is not None]
    doc["verdict"] = {"max_abs_rel_error": max(errs) if errs else None,
                      "within_goal": bool(errs) and max(errs) <= GOAL}
    save()
    print(f"{'model':34s} {'gen s':>8s} {'pred':>8s} {'err':>7s} {'B':>5s} {'tok/s':>9s} {'pred':>9s} {'err':>7s} "
          f"{'maxB':>5s} {'predB':>5s}")
    for s in doc["summary"]:
        if "error" in s:
            print(f"{s['model']:34s} FAILED: {s['error'][:80]}")
            continue

        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"

        print(f"{s['model']:34s} {f(s.get('gen_s_measured'), '8.2f')} {f(s.get('gen_s_predicted'), '8.2f')} "
              f"{f(s.get('gen_rel_error'), '+7.1%')} {f(s.get('thr_batch'), '5d')} {f(s.get('thr_measured'), '9.0f')} "
              f"{f(s.get('thr_predicted'), '9.0f')} {f(s.get('thr_rel_error'), '+7.1%')} "
              f"{f(s.get('max_batch_measured'), '5d')} {f(s.get('max_batch_predicted'), '5d')}")
    print(f"verdict: {doc['verdict']}  → {path}")


def summarize(rec: dict) -> dict:
    s = {"model": rec["name"], "in_lut": rec.get("in_lut")}
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
    dec = pr.get("decode") or []
    s["decode_rel_errors"] = {d["context"]: d["rel_error"] for d in dec}
    s["sweep_rel_errors"] = {t["batch"]: t["rel_error"] for t in pr.get("throughput_vs_batch", [])}
    s["errors"] = [e["what"] for e in rec.get("errors", [])]
    return s


if __name__ == "__main__":
    main()
