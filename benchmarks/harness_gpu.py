"""lm-evaluation-harness integration on a GPU: scoring and generation are correct there, and how fast. One call:

    HYLO_COMMIT=$(git rev-parse HEAD) python benchmarks/harness_gpu.py --out benchmarks/results/harness-h100.json \\
        [--model RUN_OR_MODEL_DIR ...]

Setup: a 4096-token BPE trained on 3 MB of the held-out corpus, hylo's tasks built from it (``--n`` examples per
task), and the requests lm_eval would send for ``hylo_lastword`` and ``hylo_nextsent`` (tokenized as lm_eval's
``hf`` model does). For two random-weight models (``mixed``: d f m2 f a f, hidden 512, 16 meta tokens; ``all-ops``:
every operator incl. sliding-window attention, hidden 256):

- ``score-exact``: fp32, right-padded batches of 32 (fla kernels, SDPA / flex attention) against one request at a
  time (no padding): max |difference| of the summed log-probs, greedy flags agreeing (expected: < 1e-3, all).
- ``score-speed``: bf16 weights, every request at batch 1 (first 256 only), 16 and 64 rows: requests/s, tokens/s,
  and the bf16 vs fp32 difference of the sums.
- ``generate``: greedy generation on hylo's engine (CUDA graphs) for 64 prompts (16 new tokens, stop at newline)
  against argmax decoding with full forwards (fp32, first 16 prompts): identical texts expected; time per call.
- ``lm_eval-suite`` (only when lm_eval is installed): lm_eval's ``simple_evaluate`` with ``--model hylo`` on all
  four hylo tasks for the ``mixed`` model and for each ``--model`` given (meaningful numbers only for trained
  models), bf16, batch 32: metrics and wall time.

Each case is recorded on its own (a failure keeps its traceback; the JSON is rewritten after every case). No case
starts after ``--budget`` seconds (default 420). Expected: 3-6 minutes on an H100, mostly Triton / flex-attention
compiles for the sliding-window model, and the lm_eval suite when lm_eval is installed.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hylo import HybridLM, HyloConfig  # noqa: E402
from hylo.data import train_tokenizer  # noqa: E402
from hylo.eval.harness import generate_greedy, score_tokens  # noqa: E402
from hylo.eval.report import write_result  # noqa: E402
from hylo.eval.tasks import build_tasks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "corpus" / "gutenberg_val.txt.gz"
SEP = "\n<|endoftext|>\n"
MODELS = {
    "mixed": dict(hidden_size=512, layers="d f m2 f a f m2 f d f a f", attn_num_heads=8, attn_num_kv_heads=2,
                  mamba2_head_dim=64, mamba2_state_size=64, num_meta_tokens=16),
    "all-ops": dict(hidden_size=256, layers="a f swa f m2 f d f gdn f jet f", attn_num_heads=4, attn_num_kv_heads=2,
                    swa_window=128, mamba2_head_dim=32, mamba2_state_size=32, num_meta_tokens=8),
}
# --device cpu (a smoke test of this script): the same patterns, tiny, on short inputs
CPU_SIZES = dict(hidden_size=64, attn_num_heads=4, attn_num_kv_heads=2, swa_window=16, mamba2_head_dim=16,
                 mamba2_state_size=16, mamba2_chunk_size=16, num_meta_tokens=2)
MAX_LEN = 1024
DEV = "cuda"  # --device cpu: a smoke test of this script


def encode_pair(tok, ctx: str, cont: str) -> tuple[list[int], list[int]]:
    """lm_eval's causal split: trailing spaces of the context move to the continuation; encode the whole, cut."""
    n = len(ctx) - len(ctx.rstrip())
    if n:
        ctx, cont = ctx[:-n], ctx[-n:] + cont
    whole, c = tok.encode(ctx + cont), tok.encode(ctx)
    return c, whole[len(c):]


def requests(tok, tasks: Path) -> list[tuple[list[int], list[int]]]:
    rows = []
    for line in (tasks / "hylo_lastword.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.append(encode_pair(tok, r["context"], " " + r["target"]))
    for line in (tasks / "hylo_nextsent.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows += [encode_pair(tok, r["context"], " " + c) for c in r["choices"]]
    return rows


def now() -> float:
    if DEV == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


@torch.no_grad()
def greedy_reference(model, prompt: list[int], new: int) -> list[int]:
    seq = list(prompt)
    for _ in range(new):
        seq.append(int(model(torch.tensor([seq], device=DEV)).logits[0, -1].argmax()))
    return seq[len(prompt):]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--n", type=int, default=500, help="examples per task")
    ap.add_argument("--model", action="append", default=[], help="trained model/run folder for the lm_eval suite")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds after which no new case starts")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests this script")
    args = ap.parse_args()
    global DEV, MAX_LEN
    DEV = args.device
    if DEV == "cpu":
        MAX_LEN = 96
        for cfg in MODELS.values():
            cfg.update({k: v for k, v in CPU_SIZES.items() if k != "swa_window" or "swa_window" in cfg})
    t_start = time.perf_counter()
    result: dict = {"settings": {"n": args.n, "max_length": MAX_LEN, "models": MODELS, "trained": args.model},
                    "cases": {}}

    def case(name: str, fn) -> None:
        if time.perf_counter() - t_start > args.budget:
            result["cases"][name] = {"skipped": f"time budget of {args.budget:.0f} s spent"}
        else:
            t0 = time.perf_counter()
            try:
                result["cases"][name] = {"ok": True, **fn()}
            except Exception as e:  # noqa: BLE001  (one failing case is recorded, not fatal)
                result["cases"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                         "traceback": traceback.format_exc()}
            result["cases"][name]["seconds"] = round(time.perf_counter() - t0, 2)
            print(name, json.dumps({k: v for k, v in result["cases"][name].items() if k != "traceback"})[:600],
                  flush=True)
        write_result(args.out, "harness-gpu", result)

    tmp = Path(tempfile.mkdtemp(prefix="hylo-harness-"))
    with gzip.open(args.corpus, "rt", encoding="utf-8") as f:
        (tmp / "corpus").mkdir()
        (tmp / "corpus" / "slice.txt").write_text(f.read(3_000_000), encoding="utf-8")
    tok = train_tokenizer(tmp / "corpus", 4096, tmp / "tok", show_progress=False)
    build_tasks(tmp / "tasks", corpus=args.corpus, n=args.n, seed=0)
    rows = requests(tok, tmp / "tasks")
    result["settings"]["requests"] = len(rows)
    result["settings"]["request_tokens"] = sum(min(len(a) + len(b), MAX_LEN) for a, b in rows)
    prompts = [tok.encode(json.loads(line)["context"])[-(MAX_LEN - 32):]
               for line in (tmp / "tasks" / "hylo_lastword.jsonl").read_text().splitlines()[:64]]
    pad = tok.eos_token_id

    for name, cfg in MODELS.items():
        torch.manual_seed(0)
        model = HybridLM(HyloConfig(vocab_size=len(tok), **cfg)).to(DEV).eval()
        fp32: dict = {}

        def exact(model=model, fp32=fp32):
            sub = rows[:256]
            t0 = now()
            one = score_tokens(model, sub, max_length=MAX_LEN, pad_id=pad, batch_rows=1, pad_multiple=1)
            t1 = now()
            bat = score_tokens(model, sub, max_length=MAX_LEN, pad_id=pad, batch_rows=32)
            t2 = now()
            fp32["sums"] = [a for a, _ in bat]
            diff = max(abs(a - b) for (a, _), (b, _) in zip(one, bat))
            agree = sum(ga == gb for (_, ga), (_, gb) in zip(one, bat))
            return {"requests": len(sub), "max_abs_diff": diff, "greedy_agree": agree, "passed": diff < 1e-3
                    and agree == len(sub), "rowwise_s": round(t1 - t0, 3), "batched_s": round(t2 - t1, 3)}

        def speed(model=model, fp32=fp32):
            m16 = copy.deepcopy(model).to(torch.bfloat16)
            out = {}
            for bs in (1, 16, 64):
                sub = rows[:256] if bs == 1 else rows
                score_tokens(m16, sub[:bs * 2], max_length=MAX_LEN, pad_id=pad, batch_rows=bs)  # warm-up
                t0 = now()
                res = score_tokens(m16, sub, max_length=MAX_LEN, pad_id=pad, batch_rows=bs)
                dt = now() - t0
                toks = sum(min(len(a) + len(b), MAX_LEN) for a, b in sub)
                out[f"batch{bs}"] = {"requests": len(sub), "s": round(dt, 3), "req_per_s": round(len(sub) / dt, 1),
                                     "tok_per_s": round(toks / dt)}
                if bs == 16 and fp32.get("sums"):
                    d = [abs(a - b) for (a, _), b in zip(res, fp32["sums"])]
                    out["bf16_vs_fp32_sum_abs_diff"] = {"mean": sum(d) / len(d), "max": max(d)}
            del m16
            return out

        def generate(model=model):
            cache: dict = {}
            t0 = now()
            texts = generate_greedy(model, tok, prompts, 16, ["\n"], 32, MAX_LEN, cache)
            t1 = now()
            again = generate_greedy(model, tok, prompts, 16, ["\n"], 32, MAX_LEN, cache)
            t2 = now()
            ref = []
            for p in prompts[:16]:
                ids = greedy_reference(model, p, 16)
                if tok.eos_token_id in ids:
                    ids = ids[:ids.index(tok.eos_token_id)]
                ref.append(tok.decode(ids, skip_special_tokens=True).split("\n")[0])
            same = sum(a == b for a, b in zip(texts, ref))
            return {"prompts": len(prompts), "same_as_reference": f"{same}/{len(ref)}", "passed": same == len(ref)
                    and texts == again, "first_call_s": round(t1 - t0, 3), "second_call_s": round(t2 - t1, 3),
                    "examples": [[a, b] for a, b in zip(texts[:3], ref[:3])]}

        case(f"{name}/score-exact", exact)
        case(f"{name}/score-speed", speed)
        case(f"{name}/generate", generate)
        if name == "mixed":
            model.save_pretrained(tmp / "mixed")
            tok.save_pretrained(tmp / "mixed")
        del model
        if DEV == "cuda":
            torch.cuda.empty_cache()

    try:
        import lm_eval  # noqa: F401

        have_lm_eval = True
    except ImportError as e:
        have_lm_eval = False
        result["cases"]["lm_eval-suite"] = {"skipped": f"lm_eval not installed ({e}); pip install 'hylo[eval]'"}
        write_result(args.out, "harness-gpu", result)
    if have_lm_eval:
        from hylo.eval import harness

        for label, path in [("random-mixed", tmp / "mixed")] + [(p, Path(p)) for p in args.model]:
            def suite(path=path):
                res = harness.simple_evaluate(
                    model="hylo", model_args=f"pretrained={path},dtype=bf16,max_length={MAX_LEN}", tasks=["hylo"],
                    task_manager=harness.task_manager(tmp / "tasks", include_defaults=False), batch_size=32,
                    device=DEV, bootstrap_iters=0)
                return {"results": res["results"]}

            case(f"lm_eval-suite/{label}", suite)
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    write_result(args.out, "harness-gpu", result)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
