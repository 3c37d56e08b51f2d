"""A short real training run: a 78M Nemotron-Flash-style hybrid on the Gutenberg corpus, with and without
weight normalization, equal tokens, then perplexity on held-out books and WikiText-103 valid.

Both runs use the same data order, seed, schedule and learning rate; only ``model.weight_norm`` differs (with it
on, weight decay is 0, as Nemotron-Flash does). Writes a JSON with both runs' curves and evaluations, and one PNG
with the two training curves and validation points.

    python benchmarks/gutenberg_run.py --data DATA_DIR --heldout gutenberg_val.txt.gz \\
        --wikitext wiki.valid.tokens --tokens 40_000_000 --out DIR
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch

from hylo.presets import NEMOTRON_FLASH_1B
from hylo.train import train
from hylo.runinfo import versions

# 78.0M with the 16k vocabulary: the first 16 blocks of Nemotron-Flash-1B's layout (2 DeltaNet, 4 Mamba2, 2 attention,
# 8 FFNs) at the widths of train_throughput.py's hybrid, so the fla kernels tuned for one serve the other
MODEL = dict(hidden_size=768, layers=" ".join(NEMOTRON_FLASH_1B.split()[:16]), attn_num_heads=12, attn_num_kv_heads=4,
             deltanet_num_heads=12, mamba2_head_dim=64, mamba2_state_size=128, num_meta_tokens=32)




def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r, color in zip(runs, ("tab:blue", "tab:orange")):
        if "history" not in r:
            continue
        h = [x for x in r["history"] if x.get("kind", "train") == "train"]
        ax.plot([x["tokens"] / 1e6 for x in h], [x["loss"] for x in h], color=color, alpha=0.6, lw=1,
                label=f"train, weight norm {'on' if r['weight_norm'] else 'off'}")
        if "heldout_books" in r:  # the exported model on held-out books (sliding window), at the end
            ax.plot([r["tokens"] / 1e6], [r["heldout_books"]["nll"]], "*", color=color, ms=12,
                    label=f"held-out books (exported model), weight norm {'on' if r['weight_norm'] else 'off'}")
        ev = [] if r.get("evals_invalid") else r.get("evals", [])
        if ev:
            ax.plot([x["tokens"] / 1e6 for x in ev], [x["val_loss"] for x in ev], "o-", color=color, ms=4,
                    label=f"validation split (during training), weight norm {'on' if r['weight_norm'] else 'off'}")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("78M Nemotron-Flash-style hybrid on Gutenberg, H100")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data")
    ap.add_argument("--heldout", help="held-out books (.txt/.txt.gz) for `hylo eval ppl`")
    ap.add_argument("--wikitext", help="wiki.valid.tokens")
    ap.add_argument("--tokens", type=int, default=40_000_000)
    ap.add_argument("--train-seconds", type=float, default=None,
                    help="size each run to about this much training time instead of --tokens: a 30-step calibration "
                         "(weight norm on, same shapes) measures tokens/s first; --tokens then caps the result")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--eval-context", type=int, default=2048)
    ap.add_argument("--eval-stride", type=int, default=1024)
    ap.add_argument("--eval-max-tokens", type=int, default=400_000)
    ap.add_argument("--modes", nargs="*", default=["on", "off"])
    ap.add_argument("--runs-dir", type=Path, help="keep the run folders here (RUNS_DIR/wn-on, wn-off: checkpoints and "
                                                  "the exported model) instead of a temporary folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: checks the script only")
    ap.add_argument("--replot", type=Path, help="only redraw the PNG of this gutenberg_run.json into --out")
    args = ap.parse_args()
    if not args.replot and not args.data:
        ap.error("--data is required (a folder made by `hylo data prepare`)")
    if args.replot:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        plot(json.loads(args.replot.read_text())["runs"], Path(args.out) / "gutenberg_run.png")
        return
    if args.smoke:
        MODEL.update(hidden_size=64, attn_num_heads=4, attn_num_kv_heads=2, deltanet_num_heads=4, mamba2_head_dim=16,
                     mamba2_state_size=16, mamba2_chunk_size=16, num_meta_tokens=4, layers="d f m2 f a f")
        args.tokens, args.seq_len, args.batch_size = 40 * 4 * 64, 64, 4
        args.eval_context, args.eval_stride, args.eval_max_tokens = 64, 32, 2000
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "gutenberg_run", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "versions": versions(), "commit": os.environ.get("HYLO_COMMIT"), "model": MODEL, "tokens": args.tokens,
              "seq_len": args.seq_len, "batch_size": args.batch_size, "lr": args.lr, "runs": []}
    if args.train_seconds:
        cal = train(dict(model=dict(MODEL, weight_norm=True), data=args.data, seq_len=args.seq_len,
                         batch_size=args.batch_size, max_steps=8 if args.smoke else 30, eval_batches=1,
                         optimizer=dict(lr=args.lr), schedule=dict(kind="constant"), compile=args.compile,
                         logging=dict(log_interval=5)), progress=False)
        recs = [r for r in cal.history if r.get("kind", "train") == "train" and r["step"] >= 10 - 5 * args.smoke]
        tps = (recs[-1]["tokens"] - recs[0]["tokens"]) / (recs[-1]["elapsed_s"] - recs[0]["elapsed_s"])
        per_step = args.seq_len * args.batch_size
        args.tokens = min(args.tokens, max(1, int(tps * args.train_seconds / per_step)) * per_step)
        result.update(tokens=args.tokens, calibration_tokens_per_s=tps, train_seconds_target=args.train_seconds)
        print(f"calibration: {tps:,.0f} tok/s -> {args.tokens:,} tokens per run", flush=True)
    for mode in args.modes:
        wn = mode == "on"
        run = {"weight_norm": wn}
        tmp = args.runs_dir / f"wn-{mode}" if args.runs_dir else Path(tempfile.mkdtemp(prefix=f"hylo-wn-{mode}-"))
        try:
            t0 = time.perf_counter()
            res = train(dict(model=dict(MODEL, weight_norm=wn), data=args.data, seq_len=args.seq_len,
                             batch_size=args.batch_size, max_tokens=args.tokens,
                             optimizer=dict(lr=args.lr, weight_decay=0.1, grad_clip=1.0),
                             schedule=dict(kind="cosine", warmup=0.02, min_lr_ratio=0.1),
                             eval_interval=10 if args.smoke else 100,
                             eval_batches=16, compile=args.compile, logging=dict(log_interval=10)),
                        out_dir=tmp / "run", progress=False)
            run.update(wall_s=time.perf_counter() - t0, train_s=res.elapsed_s, steps=res.steps, tokens=res.tokens,
                       params=res.num_params, tokens_per_s=res.tokens_per_s, val_loss=res.val_loss,
                       val_ppl=res.val_ppl, train_loss=res.train_loss, history=res.history, evals=res.evals)
            print(f"weight norm {mode}: {res.steps} steps, {res.tokens:,} tokens in {res.elapsed_s:.0f} s, "
                  f"val loss {res.val_loss:.4f} (ppl {res.val_ppl:.2f})", flush=True)
            from hylo.eval import perplexity
            from hylo.loading import load

            model, tok = load(tmp / "run", device=device, need_tokenizer=True)
            for key, path in (("heldout_books", args.heldout), ("wikitext103_valid", args.wikitext)):
                if path:
                    r = perplexity(model, tok, path, context=args.eval_context, stride=args.eval_stride,
                                   max_tokens=args.eval_max_tokens)
                    run[key] = r
                    print(f"  {key}: {json.dumps({k: v for k, v in r.items() if not isinstance(v, (list, dict))})}",
                          flush=True)
            del model
        except Exception as e:
            run["error"] = f"{type(e).__name__}: {e}"
            run["traceback"] = traceback.format_exc()[-3000:]
            print(run["traceback"], flush=True)
        result["runs"].append(run)
        torch.cuda.empty_cache()
        (out / "gutenberg_run.json").write_text(json.dumps(result, indent=1))
    plot(result["runs"], out / "gutenberg_run.png")
    print(f"\n{'weight norm':<12}{'tokens':>12}{'train s':>9}{'tok/s':>10}{'val ppl':>9}{'books ppl':>10}"
          f"{'wiki ppl':>10}{'wiki bpb':>9}")
    for r in result["runs"]:
        if "error" in r:
            print(f"{'on' if r['weight_norm'] else 'off':<12} ERROR {r['error'][:90]}")
            continue
        b, w = r.get("heldout_books", {}), r.get("wikitext103_valid", {})
        print(f"{'on' if r['weight_norm'] else 'off':<12}{r['tokens']:>12,}{r['train_s']:>9.0f}"
              f"{r['tokens_per_s']:>10,.0f}{r['val_ppl']:>9.2f}{b.get('ppl', float('nan')):>10.2f}"
              f"{w.get('ppl', float('nan')):>10.2f}{w.get('bits_per_byte', float('nan')):>9.3f}")


if __name__ == "__main__":
    main()
