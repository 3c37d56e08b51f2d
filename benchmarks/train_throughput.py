"""Training throughput and MFU of hylo's trainer: a ~125M all-attention model vs a ~125M Nemotron-Flash hybrid.

Runs the real trainer (``hylo.train.train``) on prepared data at sequence 2048, bf16 autocast, eager and under
``torch.compile``, and reports steady-state tokens/s (log records after the first ``--skip`` steps, so compilation
and autotuning are excluded) and MFU = tokens/s x training FLOPs per token (``hylo.flops``, every operator
counted) / peak. Peak is given two ways: the datasheet's dense bf16 number and a large bf16 matmul measured in the
same run. For the hybrid, each operator's block (pre-norm + mixer + residual) is then timed alone, forward +
backward at the same shape, to show where its time goes.

    python benchmarks/train_throughput.py --data DATA_DIR --out results.json
    python benchmarks/train_throughput.py --data DATA_DIR --out smoke.json --smoke   # CPU, tiny: checks the script
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import traceback

import torch

from hylo.flops import model_flops, peak_bf16_tflops
from hylo.model import HybridLM
from hylo.presets import NEMOTRON_FLASH_1B
from hylo.train import train
from hylo.runinfo import versions
from timing import kernel_table, median_ms  # benchmarks/timing.py

MODELS = {
    # 12 x (attn + SwiGLU) at 768: 117M parameters with a 32k vocabulary (tied)
    "attn-125m": dict(hidden_size=768, layers=" ".join(["a f"] * 12), attn_num_heads=12),
    # Nemotron-Flash-1B's layout (deltanet, mamba2, attention; 12 mixers + 12 FFNs) at width 768
    "nemotron-flash-125m": dict(hidden_size=768, layers=NEMOTRON_FLASH_1B, attn_num_heads=12, attn_num_kv_heads=4,
                                deltanet_num_heads=12, mamba2_head_dim=64, mamba2_state_size=128),
}




def matmul_tflops(n: int = 8192, reps: int = 20, device: str = "cuda") -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms = median_ms(lambda: [a @ b for _ in range(reps)], 5) / reps
    return 2 * n ** 3 / (ms / 1e3) / 1e12


def steady_tps(history: list[dict], skip: int) -> float:
    recs = [r for r in history if r.get("kind", "train") == "train" and r["step"] >= skip]
    if len(recs) < 2:
        raise RuntimeError("too few log records after the warm-up steps")
    a, b = recs[0], recs[-1]
    return (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"])


def block_times(model: HybridLM, batch: int, seq_len: int, reps: int = 10) -> dict:
    """Forward and forward+backward ms of one block of each operator, alone, bf16 autocast; and of the head."""
    out = {}
    dev = next(model.parameters()).device
    d = model.config.hidden_size
    autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")  # noqa: E731
    for block in model.layers:
        if block.op in out:
            continue
        x = torch.randn(batch, seq_len, d, device=dev, requires_grad=True)
        g = torch.randn(batch, seq_len, d, device=dev)

        def fwd(block=block, x=x):
            with autocast():
                return block(x)

        def fwd_bwd(fwd=fwd, g=g):
            y = fwd()
            y.backward(g.to(y.dtype))

        out[block.op] = {"fwd_ms": median_ms(fwd, reps), "fwd_bwd_ms": median_ms(fwd_bwd, reps),
                         "count": sum(b.op == block.op for b in model.layers),
                         "fwd_bwd_kernels": kernel_table(fwd_bwd, top=10)}  # where the block's time goes
    h = torch.randn(batch, seq_len, d, device=dev, requires_grad=True)
    y = torch.randint(0, model.config.vocab_size, (batch * seq_len,), device=dev)

    def head():  # final norm + LM head + cross-entropy over the vocabulary
        with autocast():
            logits = model.logits(model.norm(h))
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y).backward()

    out["lm_head+loss"] = {"fwd_bwd_ms": median_ms(head, reps), "count": 1}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="folder prepared by `hylo data prepare`")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=15, help="warm-up steps left out of the tokens/s")
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--compile", nargs="*", default=["eager", "compiled"],
                    help="eager, compiled (torch.compile default mode) or a torch.compile mode, e.g. "
                         "max-autotune-no-cudagraphs")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script, numbers mean nothing")
    args = ap.parse_args()
    if args.smoke:
        for m in MODELS.values():
            m.update(hidden_size=64, attn_num_heads=4, attn_num_kv_heads=2, deltanet_num_heads=4, mamba2_head_dim=16,
                     mamba2_state_size=16, mamba2_chunk_size=16)
        MODELS["attn-125m"]["layers"] = "a f a f"
        args.seq_len, args.batch_size, args.steps, args.skip, args.vocab_size = 64, 2, 12, 5, 16384
        args.compile = ["eager"]
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (or --smoke to check the script on the CPU)")
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    measured_peak = matmul_tflops(128 if args.smoke else 8192, device="cuda" if torch.cuda.is_available() else "cpu")
    sheet_peak = peak_bf16_tflops(name)
    result = {"benchmark": "train_throughput", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "device": name, "versions": versions(), "commit": os.environ.get("HYLO_COMMIT"),
              "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps, "skip": args.skip,
              "vocab_size": args.vocab_size, "peak_tflops_datasheet": sheet_peak,
              "peak_tflops_measured_matmul": measured_peak, "smoke": args.smoke, "runs": []}
    print(f"{name}: bf16 matmul {measured_peak:.0f} TFLOP/s measured, {sheet_peak} datasheet", flush=True)
    for mname in args.models:
        mcfg = dict(MODELS[mname], vocab_size=args.vocab_size)
        for mode in args.compile:
            run = {"model": mname, "mode": mode, "model_config": mcfg}
            try:
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                res = train(dict(model=mcfg, data=args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                                 max_steps=args.steps, optimizer=dict(lr=1e-3), schedule=dict(kind="constant"),
                                 eval_batches=1, compile={"eager": False, "compiled": True}.get(mode, mode),
                                 logging=dict(log_interval=5)),
                            progress=False, return_model=True)
                fl = model_flops(res.model, args.seq_len)
                tps = steady_tps(res.history, args.skip)
                run.update(params=res.num_params, tokens_per_s=tps, train_flops_per_token=fl["train"],
                           forward_flops_by_operator=fl["by_operator"], model_tflops=tps * fl["train"] / 1e12,
                           mfu_datasheet=tps * fl["train"] / (sheet_peak * 1e12) if sheet_peak else None,
                           mfu_measured_peak=tps * fl["train"] / (measured_peak * 1e12),
                           final_loss=res.train_loss, peak_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None)
                if mode == "eager":
                    run["blocks"] = block_times(res.model, args.batch_size, args.seq_len)
                del res
            except Exception as e:
                run["error"] = f"{type(e).__name__}: {e}"
                run["traceback"] = traceback.format_exc()[-3000:]
            result["runs"].append(run)
            torch.cuda.empty_cache()
            print(json.dumps({k: v for k, v in run.items() if k not in ("traceback", "blocks",
                                                                           "forward_flops_by_operator")}), flush=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    base = {r["mode"]: r.get("tokens_per_s") for r in result["runs"] if r["model"] == "attn-125m"}
    print(f"\n{'model':<22}{'mode':<10}{'params':>12}{'tok/s':>12}{'MFU':>8}{'vs attn':>9}")
    for r in result["runs"]:
        if "error" in r:
            print(f"{r['model']:<22}{r['mode']:<10} ERROR {r['error'][:80]}")
            continue
        rel = r["tokens_per_s"] / base[r["mode"]] if base.get(r["mode"]) else float("nan")
        r["relative_to_attn"] = rel
        print(f"{r['model']:<22}{r['mode']:<10}{r['params']:>12,}{r['tokens_per_s']:>12,.0f}"
              f"{(r['mfu_datasheet'] or 0):>8.1%}{rel:>9.2f}")
        for op, b in r.get("blocks", {}).items():
            print(f"    {op:<14} x{b['count']:<3} fwd+bwd {b['fwd_bwd_ms']:.2f} ms each")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
