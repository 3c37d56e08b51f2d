"""The inference engine on a GPU: graphed decoding ≡ eager decoding ≡ full-forward argmax, and its speed. One call:

    python benchmarks/engine_check.py --out benchmarks/results/engine-h100.json

For two random-weight models, first in float32 (``correctness_fp32``: greedy graphed tokens must equal the
full forward's argmax), then in bf16 (``tiny-all`` at hidden 256: every operator + meta tokens; the
``nemotron-flash-1b`` preset):
- correctness, ragged batch of 4 prompts, greedy, 32 new tokens: the CUDA-graphed engine against the eager engine
  (expected identical: the same kernels), and both against the argmax of one full forward over prompt + generated
  tokens (teacher forcing: equal to recomputing the forward for every new token up to the first mismatch).
  bf16 near-ties can flip late, so the first mismatching position is reported rather than failing; also one
  decode step's logits graphed vs eager (max abs diff), and seeded sampling graphed vs eager;
- the same forced decoding with the step compiled by inductor before capture (``compile=True``);
- speed: one decode step (``DecodeRunner`` at context 128 in a 512-token cache) for batch 1 and 8, graphed,
  eager and compiled + graphed, in ms/step (CUDA events), and end-to-end engine decoding (graph replay +
  sampling + host loop) in ms/step and tokens/s for 64 new tokens.

``attn-swa-d512`` (attention, a wrapping sliding window, FFN, meta tokens; not in the default set) is the model
the kernel decode step applies to: ``HYLO_KERNEL_STEP=on python benchmarks/engine_check.py --models attn-swa-d512
--no-compile --out X.json`` checks that step on a GPU (``kernel_step`` in the correctness records says whether the
engine's runners took it; ``matches_forward_first_32`` in float32 is the verdict).

Each case is recorded on its own; a failure is stored with its traceback and the script goes on. About 2 minutes
on an H100 (most of it compiling flex attention for the prefill shapes and the eager 1B runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hylo import HybridLM  # noqa: E402
from hylo.engine import DecodeRunner, Engine, SamplingParams  # noqa: E402
from hylo.presets import preset  # noqa: E402
from hylo.runinfo import versions  # noqa: E402

MODELS = {"tiny-all-d256": ("tiny-all", dict(hidden_size=256)), "nemotron-flash-1b": ("nemotron-flash-1b", {}),
          # attention, a sliding window that wraps, FFN and meta tokens only: what the kernel decode step
          # (HYLO_KERNEL_STEP=on) applies to, at Qwen3's head layout
          "attn-swa-d512": ("qwen3-0.6b", dict(vocab_size=8192, hidden_size=512, layers="a f swa f a f swa f",
                                               attn_num_heads=8, attn_num_kv_heads=4, attn_head_dim=64,
                                               ffn_intermediate_size=1536, swa_window=16, num_meta_tokens=4))}
RAGGED = [29, 17, 41, 8]
NEW = 32
DEV = "cuda"  # --device cpu: a smoke test of this script (no graphs: "graphed" runs eager)




def build(name: str, dtype=torch.bfloat16) -> HybridLM:
    base, overrides = MODELS[name]
    torch.manual_seed(0)
    with torch.device(DEV):
        model = HybridLM(preset(base, **overrides))
    return model.to(dtype).eval()


def prompts_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def first_mismatch(a, b) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


@torch.no_grad()
def teacher_forced_argmax(model, prompt, generated) -> list[int]:
    seq = torch.tensor([prompt + generated[:-1]], device=DEV)
    logits = model(seq).logits[0, len(prompt) - 1:]
    return logits.argmax(-1).tolist()


def check_correctness(model, compiled: bool = True) -> dict:
    V = model.config.vocab_size
    prompts = prompts_of(RAGGED, V)
    sp = SamplingParams(max_new_tokens=NEW)
    out: dict = {"prompt_lengths": RAGGED, "new_tokens": NEW}
    t = time.perf_counter()
    eng_g = Engine(model, max_batch_size=8, max_seq_len=256, cuda_graphs=DEV == "cuda")
    graphed = [o.token_ids for o in eng_g.generate(prompts, sp)]
    out["graphed_first_call_s"] = time.perf_counter() - t  # capture + flex-attention compiles for these shapes
    # which step the runners took (HYLO_KERNEL_STEP=on: hylo's own kernels where the model allows)
    out["kernel_step"] = sorted({bool(getattr(r, "kernel_step", False)) for r in eng_g._runners.values()})
    eng_e = Engine(model, max_batch_size=8, max_seq_len=256, cuda_graphs=False)
    eager = [o.token_ids for o in eng_e.generate(prompts, sp)]
    rows = []
    for p, g, e in zip(prompts, graphed, eager):
        ref = teacher_forced_argmax(model, p, g)
        rows.append({"prompt_len": len(p), "graphed_vs_eager_first_mismatch": first_mismatch(g, e),
                     "graphed_vs_forward_first_mismatch": first_mismatch(g, ref),
                     "graphed": g, "forward_argmax": ref})
    out["rows"] = rows
    out["graphed_equals_eager"] = graphed == eager
    out["matches_forward_first_32"] = all(r["graphed_vs_forward_first_mismatch"] is None for r in rows)
    # single prompts one at a time (batch bucket 1) against the same rows of the ragged batch
    single = [eng_g.generate([p], sp)[0].token_ids for p in prompts]
    out["batch1_vs_ragged_first_mismatch"] = [first_mismatch(s, g) for s, g in zip(single, graphed)]
    # seeded sampling: the graphed and eager engines draw the same tokens from the same logits
    ss = SamplingParams(max_new_tokens=NEW, temperature=0.8, top_k=50, top_p=0.9, seed=123)
    sg = [o.token_ids for o in eng_g.generate(prompts, ss)]
    se = [o.token_ids for o in eng_e.generate(prompts, ss)]
    out["sampled_graphed_equals_eager"] = sg == se
    out["sampled_repeatable"] = sg == [o.token_ids for o in eng_g.generate(prompts, ss)]
    del eng_g, eng_e
    # one decode step's logits, graphed vs eager, after the same 8 tokens
    rg = DecodeRunner(model, 4, 64, cuda_graph=DEV == "cuda")
    re_ = DecodeRunner(model, 4, 64, cuda_graph=False)
    toks = torch.randint(0, V, (8, 4), device=DEV)
    diffs = [(rg.step(t).float() - re_.step(t).float()).abs().max().item() for t in toks]
    out["step_logits_max_abs_diff_graphed_vs_eager"] = max(diffs)
    del rg, re_
    out["forced_decode"] = forced_decode(model)
    if compiled:
        out["forced_decode_compiled"] = forced_decode(model, compile=True)  # the step through inductor, then graphed
    return out


def check_correctness_fp32(model) -> dict:
    """The correctness check in float32 (TF32 off): rounding no longer hides a wrong cache or position, so the
    graphed engine's greedy tokens must equal the full forward's argmax (``matches_forward_first_32``)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return check_correctness(model, compiled=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@torch.no_grad()
def forced_decode(model, B: int = 4, L: int = 29, n: int = 32, compile: bool = False) -> dict:
    """Random-weight greedy continuations repeat a token, so also force *random* tokens through the graphed
    decode step (after a cached prefill) and compare its logits with one full forward over the same sequence."""
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(5)
    seq = torch.randint(0, V, (B, L + n), generator=g).to(DEV)
    r = DecodeRunner(model, B, L + n, cuda_graph=DEV == "cuda", compile=compile)
    h = model.hidden_states(seq[:, :L], cache=r.cache)
    steps = [model.logits(h[:, -1])] + [r.step(seq[:, t]).clone() for t in range(L, L + n - 1)]
    got = torch.stack(steps, 1).float()
    ref = model(seq).logits[:, L - 1:L - 1 + n].float()
    return {"batch": B, "prompt_len": L, "steps": n, "max_abs_diff": (got - ref).abs().max().item(),
            "ref_logit_std": ref.std().item(),
            "argmax_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def time_runner(model, B: int, graphed: bool, ctx: int = 128, max_len: int = 512, steps: int = 50,
                compile: bool = False) -> float:
    r = DecodeRunner(model, B, max_len, cuda_graph=graphed and DEV == "cuda", compile=compile)
    tok = torch.randint(0, model.config.vocab_size, (B,), device=DEV)
    r.set_positions(ctx)
    for _ in range(5):
        r.step(tok)
    r.set_positions(ctx)
    if DEV != "cuda":
        t = time.perf_counter()
        for _ in range(steps):
            r.step(tok)
        return 1e3 * (time.perf_counter() - t) / steps
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(steps):
        r.step(tok)
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / steps


def time_engine(model, B: int, graphed: bool, new: int = 64) -> dict:
    eng = Engine(model, max_batch_size=B, max_seq_len=512, cuda_graphs=graphed and DEV == "cuda")
    prompts = prompts_of([RAGGED[0]] * B, model.config.vocab_size, seed=1)  # a prefill shape seen before
    sp = SamplingParams(max_new_tokens=new, temperature=0.8, top_p=0.9, seed=0)
    eng.generate(prompts, SamplingParams(max_new_tokens=4))  # capture / compile outside the timing
    eng.generate(prompts, sp)
    s = eng.last_stats
    return {"ms_per_step": 1e3 * s["decode_s"] / max(s["decode_steps"], 1), "prefill_ms": 1e3 * s["prefill_s"],
            "tokens_per_s": s["tokens_per_s"], "decode_tokens_per_s": B * s["decode_steps"] / s["decode_s"]}


def run_case(results, name, what, fn):
    t = time.perf_counter()
    rec = {"model": name, "case": what}
    try:
        rec.update(fn())
        rec["ok"] = True
    except Exception as e:  # noqa: BLE001  (record and go on)
        rec.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    rec["seconds"] = round(time.perf_counter() - t, 2)
    results.append(rec)
    short = {k: v for k, v in rec.items() if k not in ("rows", "traceback")}
    print(json.dumps(short), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke test of the script")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the cases that compile the step with inductor (minutes for a large model)")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("engine_check.py needs a CUDA device (or --device cpu for a smoke test)")

    for knob in ("recompile_limit", "cache_size_limit"):  # flex attention compiles once per prefill shape
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
            **versions()}
    from hylo.engine import kernel_step
    meta["fused_max_pos"] = kernel_step.FUSED_MAX_POS  # where HYLO_STEP_ATTN_OUT=fused hands over to the chain
    print(json.dumps(meta), flush=True)
    results: list = []
    t0 = time.perf_counter()

    def save():  # after every case: a run stopped at its time limit keeps what it did
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    for name in args.models:
        try:
            model = build(name, torch.float32)
        except Exception as e:  # noqa: BLE001
            results.append({"model": name, "case": "build", "ok": False, "error": f"{type(e).__name__}: {e}"})
            continue
        run_case(results, name, "correctness_fp32", lambda: check_correctness_fp32(model))
        save()
        model.to(torch.bfloat16)
        run_case(results, name, "correctness", lambda: check_correctness(model, compiled=not args.no_compile))
        save()
        for B in (1, 8):
            run_case(results, name, f"runner_step_b{B}", lambda: {
                "batch": B, "context": 128, "max_len": 512,
                "graphed_ms": time_runner(model, B, True), "eager_ms": time_runner(model, B, False),
                **({} if args.no_compile else {"compiled_graphed_ms": time_runner(model, B, True, compile=True)})})
            for graphed in (True, False):
                run_case(results, name, f"engine_b{B}_{'graphed' if graphed else 'eager'}",
                         lambda: {"batch": B, "graphed": graphed, **time_engine(model, B, graphed)})
            save()
        del model
        if DEV == "cuda":
            torch.cuda.empty_cache()
    meta["total_s"] = round(time.perf_counter() - t0, 1)
    save()
    print(f"wrote {args.out} in {meta['total_s']} s")


if __name__ == "__main__":
    main()
