"""lm-evaluation-harness integration on a GPU: scoring and generation are correct there, and how fast. One call:

    HYLO_COMMIT=$(git rev-parse HEAD) python benchmarks/harness_gpu.py --out benchmarks/results/harness-h100.json \\
        [--model RUN_OR_MODEL_DIR ...] [--time-limit 80]

Setup: hylo's tasks built from the held-out corpus (``--n`` examples per task); after the trained models' suites, for
the random ones, a 4096-token BPE trained on 3 MB of it and the requests lm_eval would send for ``hylo_lastword`` and
``hylo_nextsent`` (tokenized as lm_eval's ``hf`` model does). Two random-weight models: ``mixed`` (d f m2 f a f,
hidden 512, 16 meta tokens) and ``all-ops`` (every operator incl. sliding-window attention, hidden 256). Cases, most
informative first, so that a time limit cuts the least useful ones:

- ``lm_eval-suite/<model>`` (when lm_eval is installed and ``--model`` is given): lm_eval's ``simple_evaluate``
  with ``--model hylo`` on all four hylo tasks (``--suite-limit`` examples each), bf16, batch 32, max_length 1024
  (on the CPU smoke test too), for each trained ``--model``: the numbers that mean something, so they run first,
  right after the tasks are built (before the tokenizer the random models need is trained); the random-weight
  checks get what time is left.
- ``mixed/score-exact``: fp32, right-padded batches of 32 (256 requests) against one request at a time without
  padding (the first ``--rowwise`` requests): max |difference| of the summed log-probs, greedy flags agreeing
  (expected: < 1e-3, all).
- ``mixed/new-shape-cost`` (GPU only; diagnostic): ms per batch-1 forward at lengths never seen before against one
  length repeated, with cuDNN on and off. Row-by-row scoring and the engine's ragged prefill meet a new shape per
  request; this says what each costs and whether cuDNN's per-shape convolution planning is the reason.
- ``mixed/generate``: greedy generation on hylo's engine (CUDA graphs) for 64 prompts (16 new tokens, stop at
  newline), twice, against argmax decoding with full forwards (fp32, 16 prompts, right-padded to one shape: one
  forward per new token): identical texts expected; time per call.
- ``lm_eval-suite/random-mixed`` (when lm_eval is installed and no ``--model`` is given): the same suite on the
  random ``mixed`` model, a pipeline check.
- ``mixed/score-speed``: bf16 weights, batch 1 (first 64 requests), 16 and 64 rows (all): requests/s, tokens/s,
  and the bf16 vs fp32 difference of the sums.
- ``all-ops/score-exact``, ``all-ops/generate``, ``all-ops/score-speed``: the same for the model with every
  operator; its sliding-window layer compiles flex attention once per shape, so it is padded to multiples of 256
  and its row-by-row reference runs on the PyTorch reference path (no compiles).

Time: ``--time-limit`` (default 80 s) counts from the start of the script. A case starts only when its estimate
fits in what is left (else it is recorded as skipped); a case still running at the limit is recorded as
interrupted and the script exits (status 0). The JSON is rewritten before and after every case (a case killed
from outside shows as ``running``), and on SIGTERM. One failing case is recorded with its traceback, not fatal.
Expected on an H100: setup ~10 s, the mixed cases and two suites of 200 examples ~40-60 s.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # the time limit counts imports too

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hylo import HybridLM, HyloConfig  # noqa: E402
from hylo.eval.report import write_result  # noqa: E402

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


# ----------------------------------------------------------------------------------------------- the case runner
class Cases:
    """Runs named cases under a time limit and keeps ``result["cases"]`` written to ``out`` at every change.

    ``run(name, fn, estimate)`` records ``fn()``'s dict (``ok: true``), or the error and its traceback, or
    ``skipped`` when fewer than ``estimate`` seconds are left. Before ``fn`` starts the case is written as
    ``running``, so a run killed from outside shows where it stopped. ``watchdog()`` starts a timer that, at the
    limit, records the running case as interrupted, writes, and calls ``on_limit`` (default: exit the process).
    """

    def __init__(self, out: str | os.PathLike, result: dict, limit: float, start: float | None = None,
                 kind: str = "harness-gpu", on_limit: Callable[[], None] | None = None):
        self.out, self.result, self.limit, self.kind = Path(out), result, float(limit), kind
        self.start = time.perf_counter() if start is None else start
        self.result.setdefault("cases", {})
        self.current: str | None = None
        self._t_case = 0.0
        self._lock = threading.RLock()
        self._timer: threading.Timer | None = None
        self.on_limit = on_limit or (lambda: os._exit(0))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.limit - self.elapsed()

    def write(self) -> None:
        """Rewrite the JSON (through a temporary file: a kill while writing keeps the previous one)."""
        with self._lock:
            self.result["elapsed_s"] = round(self.elapsed(), 1)
            tmp = self.out.with_name(self.out.name + ".tmp")
            write_result(tmp, self.kind, self.result)
            os.replace(tmp, self.out)

    def run(self, name: str, fn: Callable[[], dict], estimate: float = 0.0) -> dict:
        cases = self.result["cases"]
        if self.left() < estimate:
            return self.skip(name, estimate)
        with self._lock:
            self.current, self._t_case = name, time.perf_counter()
            cases[name] = {"running": True, "started_at_s": round(self.elapsed(), 1)}
        self.write()
        try:
            rec = {"ok": True, **fn()}
        except Exception as e:  # noqa: BLE001  (one failing case is recorded, not fatal)
            rec = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        rec["seconds"] = round(time.perf_counter() - self._t_case, 2)
        with self._lock:
            cases[name] = rec
            self.current = None
        self.write()
        print(name, json.dumps({k: v for k, v in rec.items() if k != "traceback"})[:600], flush=True)
        return rec

    def skip(self, name: str, estimate: float) -> dict:
        """Record ``name`` as skipped for lack of time."""
        with self._lock:
            rec = self.result["cases"][name] = {
                "skipped": f"time limit: {max(self.left(), 0):.0f} s of {self.limit:.0f} s left, the case needs "
                           f"~{estimate:.0f} s"}
        self.write()
        print(name, "skipped", flush=True)
        return rec

    def stop(self, why: str) -> None:
        """Record the running case as interrupted (``why``) and write; used at the time limit and on SIGTERM."""
        with self._lock:
            if self.current is not None:
                self.result["cases"][self.current] = {
                    "ok": False, "interrupted": why, "seconds": round(time.perf_counter() - self._t_case, 2)}
            self.result["stopped"] = why
            self.write()
        print(f"stopped: {why}", flush=True)

    def _at_limit(self) -> None:
        self.stop(f"time limit of {self.limit:.0f} s reached")
        self.on_limit()

    def watchdog(self) -> None:
        self._timer = threading.Timer(max(self.left(), 0.0), self._at_limit)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


# ----------------------------------------------------------------------------------------------- helpers
def has_swa(name: str) -> bool:
    return "swa" in MODELS[name]["layers"].split()


def pad_multiple(name: str) -> int:
    """Batch lengths are rounded up to this: few shapes; 256 with sliding windows (flex attention compiles once
    per shape on CUDA); 16 on the CPU (short inputs)."""
    if DEV != "cuda":
        return 16
    return 256 if has_swa(name) else 64


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
def greedy_reference(model, prompts: list[list[int]], new: int, pad_id: int = 0, multiple: int = 64) -> list[list[int]]:
    """Argmax continuations by full forwards (no cache): all prompts right-padded into one ``[B, T]`` batch of a
    fixed length, one forward per new token, each row read at its own last position. Exact for causal models
    (padding after a row's end never reaches it) and one shape for every step, so nothing is planned or compiled
    per length."""
    dev = next(model.parameters()).device
    longest = max(len(p) for p in prompts) + new
    T = -(-longest // multiple) * multiple
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = torch.tensor(p)
    ids = ids.to(dev)
    pos = torch.tensor([len(p) for p in prompts], device=dev)
    rows = torch.arange(len(prompts), device=dev)
    out = []
    for _ in range(new):
        nxt = model(ids).logits[rows, pos - 1].argmax(-1)
        ids[rows, pos] = nxt
        pos = pos + 1
        out.append(nxt)
    return torch.stack(out, 1).tolist()


def new_shape_cost(model, vocab: int, lengths: list[int], repeat: int) -> dict:
    """ms per batch-1 forward at each of ``lengths`` (the first call at that shape) vs ``repeat`` calls at a length
    seen before, for fp32 and bf16 weights, each with cuDNN on and off. Each of the four runs shifts the lengths by
    one, so every run meets new shapes; the lengths are 5 mod 16 plus the shift (< 4) plus the meta tokens (16 in
    ``mixed``), so Triton's integer specialisation (multiples of 16) never differs from the warm-up's."""
    g = torch.Generator().manual_seed(0)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    out, summary = {}, {}
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        for shift, (label, m, cudnn) in enumerate((("fp32_cudnn_on", model, True), ("fp32_cudnn_off", model, False),
                                                   ("bf16_cudnn_on", m16, True), ("bf16_cudnn_off", m16, False))):
            with torch.backends.cudnn.flags(enabled=cudnn):
                def fwd(n):
                    x = torch.randint(0, vocab, (1, n), generator=g).to(DEV)
                    t0 = now()
                    m(x)
                    return 1000 * (now() - t0)

                fwd(lengths[0] - 32 + shift)  # warm-up: first-call costs that are not per shape
                new = [fwd(n + shift) for n in lengths]
                same = [fwd(lengths[0] + shift) for _ in range(repeat)]
            out[label] = {"new_length_ms": [round(v, 2) for v in new], "same_length_ms": [round(v, 2) for v in same]}
            summary[label] = round(med(new) - med(same), 2)
    del m16
    out["new_minus_same_median_ms"] = summary
    return out


@contextlib.contextmanager
def no_lm_eval_env_report():
    """lm_eval's ``simple_evaluate`` collects torch's environment report (pip and nvidia-smi subprocesses, seconds
    per call) into its results; this JSON records versions in ``meta`` already, so skip it."""
    import lm_eval.evaluator as ev

    old = ev.add_env_info
    ev.add_env_info = lambda storage: None
    try:
        yield
    finally:
        ev.add_env_info = old


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--n", type=int, default=500, help="examples per task")
    ap.add_argument("--model", action="append", default=[], help="trained model/run folder for the lm_eval suite")
    ap.add_argument("--time-limit", "--budget", dest="time_limit", type=float, default=80.0,
                    help="seconds for the whole run, from the script's start (default 80)")
    ap.add_argument("--rowwise", type=int, default=32, help="requests scored one at a time for the exactness check")
    ap.add_argument("--suite-limit", type=int, default=200,
                    help="examples per task in each lm_eval suite (0: all --n)")
    ap.add_argument("--skip-all-ops", action="store_true", help="leave out the all-ops model's cases")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests this script")
    args = ap.parse_args(argv)
    global DEV, MAX_LEN
    DEV = args.device
    if DEV == "cpu":
        MAX_LEN = 96
        for cfg in MODELS.values():
            cfg.update({k: v for k, v in CPU_SIZES.items() if k != "swa_window" or "swa_window" in cfg})
    result: dict = {"settings": {"n": args.n, "max_length": MAX_LEN, "models": MODELS, "trained": args.model,
                                 "rowwise": args.rowwise, "suite_limit": args.suite_limit or None,
                                 "time_limit_s": args.time_limit}, "cases": {}}
    cases = Cases(args.out, result, args.time_limit, start=T_START)
    cases.watchdog()
    signal.signal(signal.SIGTERM, lambda *_: (cases.stop("SIGTERM"), os._exit(143)))

    from hylo.data import train_tokenizer
    from hylo.eval.harness import generate_greedy, score_tokens
    from hylo.eval.tasks import build_tasks
    from hylo.ops.backend import backend

    # ---- the tasks (all the trained models' suites need), then those suites: first, while the time is there
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="hylo-harness-"))
    build_tasks(tmp / "tasks", corpus=args.corpus, n=args.n, seed=0)
    result["tasks_setup_s"] = round(time.perf_counter() - t0, 2)
    cases.write()
    try:
        import lm_eval  # noqa: F401

        have_lm_eval = True
    except ImportError as e:
        have_lm_eval = False
        result["cases"]["lm_eval-suite"] = {"skipped": f"lm_eval not installed ({e}); pip install 'hylo[eval]'"}
        cases.write()

    def run_suites(suites: list[tuple[str, Path]], max_len: int) -> None:
        from hylo.eval import harness

        tm = harness.task_manager(tmp / "tasks", include_defaults=False)
        for label, path in suites:
            def suite(path=path):
                with no_lm_eval_env_report():
                    res = harness.simple_evaluate(
                        model="hylo", model_args=f"pretrained={path},dtype=bf16,max_length={max_len}",
                        tasks=["hylo"], task_manager=tm, batch_size=32, device=DEV, bootstrap_iters=0,
                        limit=args.suite_limit or None)
                return {"results": res["results"], "limit": args.suite_limit or None}

            cases.run(f"lm_eval-suite/{label}", suite, estimate=10)

    if have_lm_eval and args.model:
        run_suites([(m, Path(m)) for m in args.model], 1024)  # 1024 on the CPU too: the model's own tokenizer

    # ---- the random-weight checks: a tokenizer, the requests lm_eval would send, the prompts
    t1 = time.perf_counter()
    with gzip.open(args.corpus, "rt", encoding="utf-8") as f:
        (tmp / "corpus").mkdir()
        (tmp / "corpus" / "slice.txt").write_text(f.read(3_000_000), encoding="utf-8")
    tok = train_tokenizer(tmp / "corpus", 4096, tmp / "tok", show_progress=False)
    rows = requests(tok, tmp / "tasks")
    result["settings"]["requests"] = len(rows)
    result["settings"]["request_tokens"] = sum(min(len(a) + len(b), MAX_LEN) for a, b in rows)
    prompts = [tok.encode(json.loads(line)["context"])[-(MAX_LEN - 32):]
               for line in (tmp / "tasks" / "hylo_lastword.jsonl").read_text().splitlines()[:64]]
    pad = tok.eos_token_id
    result["tokenizer_setup_s"] = round(time.perf_counter() - t1, 2)
    result["setup_s"] = round(result["tasks_setup_s"] + result["tokenizer_setup_s"], 2)
    cases.write()

    def build(name: str):
        torch.manual_seed(0)
        return HybridLM(HyloConfig(vocab_size=len(tok), **MODELS[name])).to(DEV).eval()

    def exact(model, fp32: dict, name: str) -> dict:
        multiple = pad_multiple(name)
        sub, ref_rows = rows[:256], rows[:args.rowwise]
        # the row-by-row reference: no padding; with sliding windows on the PyTorch path (flex would compile per
        # length)
        ref_path = backend("ref") if has_swa(name) else contextlib.nullcontext()
        t0 = now()
        with ref_path:
            one = score_tokens(model, ref_rows, max_length=MAX_LEN, pad_id=pad, batch_rows=1, pad_multiple=1)
        t1 = now()
        bat = score_tokens(model, sub, max_length=MAX_LEN, pad_id=pad, batch_rows=32, pad_multiple=multiple)
        t2 = now()
        fp32["sums"] = [a for a, _ in bat]
        diff = max(abs(a - b) for (a, _), (b, _) in zip(one, bat))
        agree = sum(ga == gb for (_, ga), (_, gb) in zip(one, bat))
        return {"requests": len(sub), "rowwise_requests": len(one), "rowwise_path": "ref" if has_swa(name) else
                "fast", "max_abs_diff": diff, "greedy_agree": f"{agree}/{len(one)}",
                "passed": diff < 1e-3 and agree == len(one), "rowwise_s": round(t1 - t0, 3),
                "rowwise_ms_per_request": round(1000 * (t1 - t0) / len(one), 1), "batched_s": round(t2 - t1, 3)}

    def speed(model, fp32: dict, name: str) -> dict:
        multiple = pad_multiple(name)
        m16 = copy.deepcopy(model).to(torch.bfloat16)
        out = {}
        for bs in (1, 16, 64):
            sub = rows[:64] if bs == 1 else rows
            score_tokens(m16, sub[:bs * 2], max_length=MAX_LEN, pad_id=pad, batch_rows=bs,
                         pad_multiple=multiple)  # warm-up
            t0 = now()
            res = score_tokens(m16, sub, max_length=MAX_LEN, pad_id=pad, batch_rows=bs, pad_multiple=multiple)
            dt = now() - t0
            toks = sum(min(len(a) + len(b), MAX_LEN) for a, b in sub)
            out[f"batch{bs}"] = {"requests": len(sub), "s": round(dt, 3), "req_per_s": round(len(sub) / dt, 1),
                                 "tok_per_s": round(toks / dt)}
            if bs == 16 and fp32.get("sums"):
                d = [abs(a - b) for (a, _), b in zip(res, fp32["sums"])]
                out["bf16_vs_fp32_sum_abs_diff"] = {"mean": sum(d) / len(d), "max": max(d)}
        del m16
        return out

    def generate(model, name: str) -> dict:
        cache: dict = {}
        t0 = now()
        texts = generate_greedy(model, tok, prompts, 16, ["\n"], 32, MAX_LEN, cache)
        t1 = now()
        again = generate_greedy(model, tok, prompts, 16, ["\n"], 32, MAX_LEN, cache)
        t2 = now()
        ref = []
        for ids in greedy_reference(model, prompts[:16], 16, pad_id=pad, multiple=pad_multiple(name)):
            if tok.eos_token_id in ids:
                ids = ids[:ids.index(tok.eos_token_id)]
            ref.append(tok.decode(ids, skip_special_tokens=True).split("\n")[0])
        t3 = now()
        same = sum(a == b for a, b in zip(texts, ref))
        return {"prompts": len(prompts), "same_as_reference": f"{same}/{len(ref)}", "passed": same == len(ref)
                and texts == again, "first_call_s": round(t1 - t0, 3), "second_call_s": round(t2 - t1, 3),
                "reference_s": round(t3 - t2, 3), "examples": [[a, b] for a, b in zip(texts[:3], ref[:3])]}

    # ---- the mixed model: correctness, the per-shape diagnostic, generation
    model = build("mixed")
    fp32: dict = {}
    cases.run("mixed/score-exact", lambda: exact(model, fp32, "mixed"), estimate=8)
    if DEV == "cuda":
        cases.run("mixed/new-shape-cost", lambda: new_shape_cost(model, len(tok), [293, 325, 357, 389], 4),
                  estimate=4)
    cases.run("mixed/generate", lambda: generate(model, "mixed"), estimate=5)

    # ---- no trained model given: the lm_eval suite on the random one, as a pipeline check
    if have_lm_eval and not args.model:
        model.save_pretrained(tmp / "mixed")
        tok.save_pretrained(tmp / "mixed")
        run_suites([("random-mixed", tmp / "mixed")], MAX_LEN)

    # ---- speed on the mixed model, then the all-ops model
    cases.run("mixed/score-speed", lambda: speed(model, fp32, "mixed"), estimate=8)
    del model
    if DEV == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_all_ops:
        # flex attention compiles once per shape (B, T) for the sliding-window layer: tens of seconds in all
        est = {"score-exact": 40, "generate": 20, "score-speed": 60} if DEV == "cuda" else {}
        if cases.left() < est.get("score-exact", 0):
            for c in est:
                cases.skip(f"all-ops/{c}", est[c])
        else:
            model = build("all-ops")
            fp32 = {}
            cases.run("all-ops/score-exact", lambda: exact(model, fp32, "all-ops"), est.get("score-exact", 0))
            cases.run("all-ops/generate", lambda: generate(model, "all-ops"), est.get("generate", 0))
            cases.run("all-ops/score-speed", lambda: speed(model, fp32, "all-ops"), est.get("score-speed", 0))
            del model
    cases.cancel()
    result["total_seconds"] = round(cases.elapsed(), 1)
    cases.write()
    print("wrote", args.out)


if __name__ == "__main__":
    main()
