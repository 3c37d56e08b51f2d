"""`hylo eval ppl` / `retrieval` on a GPU: the sliding window on the CUDA kernels is exact, and how fast it runs.

    python benchmarks/eval_ppl_check.py --out benchmarks/results/eval-ppl-h100.json

Random-weight models (``tiny-all`` at hidden 256: every operator + meta tokens; the ``nemotron-flash-1b`` preset),
random token ids (no tokenizer needed; bits per byte and the data paths are covered by the CPU tests):

- ``window_vs_brute``: per-token NLL from :func:`hylo.eval.ppl.sliding_window_nll` (context 32, stride 12,
  batch 4, 97 tokens) against a brute-force forward of each token's own context, tiny-all in fp32 and amp-bf16;
- ``chunks``: stride == context against independent per-chunk losses (tiny-all, fp32);
- ``gpu_vs_cpu``: the same fp32 model and windows on the GPU (fla / Triton kernels) and on the CPU (torch
  reference paths): max |ΔNLL| per token and Δ mean NLL;
- ``greedy``: :func:`hylo.eval.retrieval.greedy_generate` (hylo decode cache, fp32 and bf16) against the argmax
  of one teacher-forced forward (first mismatch, if any, and the top-2 logit gap there: random weights give
  near-ties, which may flip);
- ``speed``: nemotron-flash-1b, 32,768 tokens, context 1024 / stride 512 and context 4096 / stride 2048,
  batch 8, amp-bf16 and bf16 weights: scored tokens/s (WikiText-103 test is ~280k tokens with a 131k vocab);
  and one batched passkey prompt set (4 x 4096 tokens, 8 new tokens) in seconds.

Each case is recorded on its own; a failure is stored with its traceback and the script goes on. About 3 minutes
on an H100 (mostly Triton autotuning for the many window lengths of the brute-force case).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hylo import HybridLM  # noqa: E402
from hylo.eval.common import Precision  # noqa: E402
from hylo.eval.ppl import sliding_window_nll  # noqa: E402
from hylo.eval.retrieval import greedy_generate  # noqa: E402
from hylo.presets import preset  # noqa: E402
from hylo.runinfo import versions  # noqa: E402

DEV = "cuda"
FP32 = Precision("fp32", torch.float32, False)
AMP = Precision("amp-bf16", torch.float32, True)




def build(name: str, device=None, dtype=torch.float32) -> HybridLM:
    base, kw = {"tiny-all-d256": ("tiny-all", dict(hidden_size=256)),
                "nemotron-flash-1b": ("nemotron-flash-1b", {})}[name]
    torch.manual_seed(0)
    with torch.device(device or DEV):
        m = HybridLM(preset(base, **kw))
    return m.to(dtype).eval()


def rand_ids(n, vocab, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).numpy()


@torch.no_grad()
def brute_force(model, ids, context, stride, prec):
    out = np.full(len(ids), np.nan)
    dev = next(model.parameters()).device
    for t in range(1, len(ids)):
        k = max(0, (t - context) // stride + 1)
        x = torch.as_tensor(ids[k * stride: t + 1], device=dev)[None]
        with prec.context(dev):
            logits = model(x).logits[0, -2]
        out[t] = -torch.log_softmax(logits.double(), -1)[int(ids[t])].item()
    return out


def case_window_vs_brute():
    model = build("tiny-all-d256")
    ids = rand_ids(97, model.config.vocab_size)
    res = {}
    for prec in (FP32, AMP):
        got = sliding_window_nll(model, ids, 32, 12, batch_size=4, precision=prec)
        want = brute_force(model, ids, 32, 12, prec)
        d = np.abs(got[1:] - want[1:])
        res[prec.name] = {"max_abs_diff": float(d.max()), "mean_nll": float(np.nanmean(got)),
                          "mean_nll_brute": float(np.nanmean(want)),
                          "ok": bool(d.max() < (1e-3 if prec is FP32 else 5e-2))}
    return res


def case_chunks():
    model = build("tiny-all-d256")
    ids = rand_ids(130, model.config.vocab_size, 1)
    nll = sliding_window_nll(model, ids, 32, 32, batch_size=3, precision=FP32)
    total = 0.0
    with torch.no_grad():
        for b in range(0, len(ids), 32):
            x = torch.as_tensor(ids[b:b + 32], device=DEV)[None]
            total += model(x, labels=x).loss.item() * (x.shape[1] - 1)
    rel = abs(float(np.nansum(nll)) - total) / total
    return {"sum_window": float(np.nansum(nll)), "sum_chunks": total, "rel_diff": rel, "ok": rel < 1e-4}


def case_gpu_vs_cpu():
    gpu = build("tiny-all-d256")
    cpu = build("tiny-all-d256", device="cpu")
    ids = rand_ids(300, gpu.config.vocab_size, 2)
    a = sliding_window_nll(gpu, ids, 128, 64, batch_size=4, precision=FP32)
    b = sliding_window_nll(cpu, ids, 128, 64, batch_size=4, precision=FP32)
    d = np.abs(a[1:] - b[1:])
    return {"max_abs_diff": float(d.max()), "mean_nll_gpu": float(np.nanmean(a)), "mean_nll_cpu": float(np.nanmean(b)),
            "ok": bool(d.max() < 2e-3)}


def case_greedy():
    """Cached greedy decoding vs the argmax of one teacher-forced forward; a mismatch counts as a near-tie (not a
    bug) when the teacher-forced top-2 logit gap there is below ``tie``."""
    res = {}
    for dtype, tie in ((torch.float32, 1e-3), (torch.bfloat16, 0.1)):
        model = build("tiny-all-d256", dtype=dtype)
        g = torch.Generator().manual_seed(3)
        x = torch.randint(0, model.config.vocab_size, (4, 300), generator=g).to(DEV)
        out = greedy_generate(model, x, 12)
        with torch.no_grad():
            logits = model(torch.cat([x, out[:, :-1]], 1)).logits[:, x.shape[1] - 1:].float()
        tf = logits.argmax(-1)
        rows = []
        for r in range(4):
            i = next((i for i in range(out.shape[1]) if out[r, i] != tf[r, i]), None)
            gap = None if i is None else float(logits[r, i].topk(2).values.diff().abs())
            rows.append({"first_mismatch": i, "top2_gap_there": gap})
        res[str(dtype).removeprefix("torch.")] = {"rows": rows, "ok": all(
            r["first_mismatch"] is None or r["top2_gap_there"] < tie for r in rows)}
    return res


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return r, time.perf_counter() - t


def case_speed():
    out = {}
    ids = rand_ids(32768, 131072, 4)
    for wname, wdtype, prec in (("amp-bf16", torch.float32, AMP), ("bf16", torch.bfloat16, None)):
        model = build("nemotron-flash-1b", dtype=wdtype)
        prec = prec or Precision("bf16", torch.bfloat16, False)
        for ctx, stride in ((1024, 512), (4096, 2048)):
            sliding_window_nll(model, ids[: 3 * ctx], ctx, stride, batch_size=8, precision=prec)  # warm up / autotune
            nll, s = timed(lambda: sliding_window_nll(model, ids, ctx, stride, batch_size=8, precision=prec))
            n = int(np.isfinite(nll).sum())
            out[f"{wname} ctx{ctx}/s{stride}"] = {"tokens": n, "seconds": s, "tokens_per_s": n / s,
                                                  "mean_nll": float(np.nanmean(nll)),
                                                  "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
            torch.cuda.reset_peak_memory_stats()
        if wname == "bf16":
            x = torch.as_tensor(rand_ids(4 * 4096, 131072, 5), device=DEV).view(4, 4096)
            greedy_generate(model, x[:, :512], 8)
            _, s = timed(lambda: greedy_generate(model, x, 8))
            out["passkey batch 4 x 4096 + 8 tokens (bf16)"] = {"seconds": s}
        del model
        torch.cuda.empty_cache()
    return out


CASES = {"window_vs_brute": case_window_vs_brute, "chunks": case_chunks, "gpu_vs_cpu": case_gpu_vs_cpu,
         "greedy": case_greedy, "speed": case_speed}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("eval_ppl_check.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons mean fp32
    torch.backends.cudnn.allow_tf32 = False
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0), **versions()}
    print(json.dumps(meta), flush=True)
    results = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.cases:
        t = time.perf_counter()
        try:
            results[name] = {"result": CASES[name](), "seconds": time.perf_counter() - t}
        except Exception as e:  # noqa: BLE001  (record and go on)
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                             "seconds": time.perf_counter() - t}
        print(name, json.dumps(results[name], default=str)[:1500], flush=True)
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
