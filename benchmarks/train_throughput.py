"""Training throughput and MFU of hylo's trainer: a ~125M all-attention model vs a ~125M Nemotron-Flash hybrid.

Runs the real trainer (``hylo.train.train``) on prepared data at sequence 2048, bf16 autocast, eager and under
``torch.compile``, with the LM head + loss either plain (full logits, float32 cross-entropy) or fused
(``hylo.ops.linear_ce``: chunked, fla's kernels), and reports steady-state tokens/s (log records after the first
``--skip`` steps, so compilation and autotuning are excluded) and MFU = tokens/s x training FLOPs per token
(``hylo.flops``, every operator counted) / peak. Peak is given two ways: the datasheet's dense bf16 number and a
large bf16 matmul measured in the same run.

Before the runs, a correctness check compares the fused loss with the plain one (forward and backward, bf16
autocast and float32, with weight normalization and ignored targets, against a float64 truth; and run twice for
determinism), and the LM head + loss alone is timed, forward + backward at the training shape, for each loss
(fused at several chunk sizes; after the runs, compiled too, if time is left), with its peak memory and the time
of its three matmuls alone. Each run then goes in its own process (a crash or the ``--time-limit`` ends that run
only, and every run compiles from the same start; the trainer's final evaluation is skipped unless ``--eval``);
eager runs also time each operator's block alone.

    python benchmarks/train_throughput.py --data DATA_DIR --out results.json
    python benchmarks/train_throughput.py --data DATA_DIR --out r.json --models attn-125m \\
        --compile compiled max-autotune-no-cudagraphs --loss plain fused --time-limit 290
    python benchmarks/train_throughput.py --data DATA_DIR --out r.json --models attn-125m --compile compiled \\
        --sdpa auto cudnn   # PyTorch's SDPA kernel for causal attention (hylo.ops.backend's HYLO_SDPA)
        --nan-check deferred sync   # the trainer's non-finite check without / with a host sync every step
        --rope torch triton   # RoPE's q/k rotation: fused by inductor, or hylo's Triton kernel (HYLO_ROPE; auto = triton on CUDA)
    python benchmarks/train_throughput.py --data DATA_DIR --out smoke.json --smoke   # CPU, tiny: checks the script
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import multiprocessing as mp
import os
import statistics
import time
import traceback

import torch
import torch.nn.functional as F

from hylo.flops import model_flops, peak_bf16_tflops
from hylo.model import HybridLM
from hylo.ops import backend, linear_ce, rope
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
LOSSES = {"plain": "ref", "fused": "fused"}  # --loss value -> hylo.ops.linear_ce implementation
SMOKE = dict(hidden_size=64, attn_num_heads=4, attn_num_kv_heads=2, deltanet_num_heads=4, mamba2_head_dim=16,
             mamba2_state_size=16, mamba2_chunk_size=16)


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


def _autocast(dev: torch.device):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


def _head_loss(model: HybridLM, impl: str, chunk: int = linear_ce.DEFAULT_CHUNK):
    """final norm + LM head + cross-entropy, as ``HybridLM.forward(targets=...)`` runs them."""
    def f(h, y):
        with _autocast(h.device):
            return linear_ce.linear_cross_entropy(model.norm(h).flatten(0, 1), model.head_weight(), y, chunk=chunk,
                                                  impl=impl)
    return f


# ----------------------------------------------------------------------------------------------- correctness
def loss_correctness(device: str, n: int, d: int, v: int, chunk: int) -> dict:
    """Fused vs plain loss, loss x 0.5 backward (grads of h and of the weight *parameter*), against float64.

    Cases: bf16 autocast and float32 (TF32 off), each with and without weight normalization; 20% of the targets
    ignored; ``n`` not a multiple of ``chunk``. Errors are relative Frobenius norms. bf16 passes when the fused
    error is at most 1.5x the plain one plus 1e-3 (both carry bf16 rounding of the inputs); float32 passes at 1e-4.
    The fused loss is also run twice: ``deterministic`` says whether both runs agree bit for bit."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    h0 = torch.randn(n, d, device=dev, generator=g)
    w0 = torch.randn(v, d, device=dev, generator=g) * d ** -0.5 * 4
    t = torch.randint(0, v, (n,), device=dev, generator=g)
    t[torch.rand(n, device=dev, generator=g) < 0.2] = -100
    kernel = linear_ce.resolve(h0, "fused")
    out = {"n": n, "d": d, "v": v, "chunk": chunk, "kernel": kernel, "cases": [], "ok": True}
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for bf16 in (True, False):
            for norm in (False, True):
                case = {"dtype": "bf16-autocast" if bf16 else "float32", "weight_norm": norm}
                try:
                    def run(impl, dtype=torch.float32, autocast=bf16):
                        h = h0.to(dtype, copy=True).requires_grad_()  # fresh leaves: no grads carried over
                        w = w0.to(dtype, copy=True).requires_grad_()
                        wt = w / w.norm(dim=1, keepdim=True).clamp_min(1e-6) if norm else w
                        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                            if impl == "truth":
                                loss = F.cross_entropy(F.linear(h, wt), t, ignore_index=-100)
                            else:
                                loss = linear_ce.linear_cross_entropy(h, wt, t, chunk=chunk, impl=impl)
                        (loss * 0.5).backward()
                        return [loss.detach().double(), h.grad.double(), w.grad.double()]

                    truth = run("truth", torch.float64, False)
                    plain, fused, again = run("ref"), run("fused"), run("fused")

                    def err(a, b):
                        return [float((x - y).norm() / y.norm().clamp_min(1e-30)) for x, y in zip(a, b)]

                    case.update({f"{k}_rel_err_{q}": e for k, a, b in [("plain", plain, truth), ("fused", fused, truth),
                                                                         ("fused_vs_plain", fused, plain)]
                                 for q, e in zip(("loss", "dh", "dw"), err(a, b))})
                    case["deterministic"] = all(torch.equal(x, y) for x, y in zip(fused, again))
                    e_f = [case[f"fused_rel_err_{q}"] for q in ("loss", "dh", "dw")]
                    e_p = [case[f"plain_rel_err_{q}"] for q in ("loss", "dh", "dw")]
                    case["ok"] = all(f <= 1.5 * p + 1e-3 if bf16 else f <= 1e-4 for f, p in zip(e_f, e_p))
                except Exception as e:  # noqa: BLE001
                    case.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
                out["ok"] = out["ok"] and case["ok"]
                out["cases"].append(case)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return out


# ----------------------------------------------------------------------------------------------- timing
def _timed(fn, dev: torch.device, reps: int = 10) -> dict:
    """median fwd+bwd ms of ``fn()`` and the peak memory it adds (GiB, CUDA only)."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    ms = median_ms(fn, reps)
    mem = (torch.cuda.max_memory_allocated() - base) / 2 ** 30 if dev.type == "cuda" else None
    return {"fwd_bwd_ms": ms, "peak_extra_gib": mem}


def head_times(model: HybridLM, batch: int, seq_len: int, chunks=(2048, 8192, 16384), compile_backend=None,
               reps: int = 10) -> dict:
    """Final norm + LM head + loss alone, forward+backward at the training shape, bf16 autocast: plain, fused (its
    default chunk and ``chunks``); or, with ``compile_backend``, plain and fused under ``torch.compile``. Eager
    also times the head's three matmuls alone (logits, dh, dweight in bf16): the floor a fused loss approaches."""
    dev = next(model.parameters()).device
    d, vocab, n = model.config.hidden_size, model.config.vocab_size, batch * seq_len
    h = torch.randn(batch, seq_len, d, device=dev, requires_grad=True)
    y = torch.randint(0, vocab, (n,), device=dev)
    out = {}
    if compile_backend is None:
        variants = [("plain", "ref", linear_ce.DEFAULT_CHUNK), ("fused", "fused", linear_ce.DEFAULT_CHUNK)]
        variants += [(f"fused[chunk={c}]", "fused", c) for c in chunks if c != linear_ce.DEFAULT_CHUNK]
    else:
        variants = [("plain[compiled]", "ref", linear_ce.DEFAULT_CHUNK),
                    ("fused[compiled]", "fused", linear_ce.DEFAULT_CHUNK)]
    for name, impl, chunk in variants:
        try:
            f = _head_loss(model, impl, chunk)
            if compile_backend is not None:
                f = torch.compile(f, backend=compile_backend)
                t0 = time.monotonic()
                f(h, y).backward()
                compile_s = time.monotonic() - t0
            out[name] = {**_timed(lambda f=f: f(h, y).backward(), dev, reps), "chunk": chunk,
                         "kernel": linear_ce.resolve(h, impl)}
            if compile_backend is not None:
                out[name]["compile_s"] = compile_s
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        h.grad = None
        model.zero_grad(set_to_none=True)
    if compile_backend is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
        hb, wb = torch.randn(n, d, device=dev, dtype=dt), torch.randn(vocab, d, device=dev, dtype=dt)
        gb = torch.randn(n, vocab, device=dev, dtype=dt)
        out["matmuls_only"] = {"fwd_bwd_ms": median_ms(lambda: (hb @ wb.t(), gb @ wb, gb.t() @ hb), reps),
                               "tflop": 3 * 2 * n * vocab * d / 1e12}
        del hb, wb, gb
    return out


def block_times(model: HybridLM, batch: int, seq_len: int, loss_impl: str, reps: int = 10) -> dict:
    """Forward and forward+backward ms of one block of each operator, alone, bf16 autocast; and of the head + loss
    in the run's loss implementation (``lm_head+loss``)."""
    out = {}
    dev = next(model.parameters()).device
    d = model.config.hidden_size
    for block in model.layers:
        if block.op in out:
            continue
        x = torch.randn(batch, seq_len, d, device=dev, requires_grad=True)
        g = torch.randn(batch, seq_len, d, device=dev)

        def fwd(block=block, x=x):
            with _autocast(dev):
                return block(x)

        def fwd_bwd(fwd=fwd, g=g):
            y = fwd()
            y.backward(g.to(y.dtype))

        out[block.op] = {"fwd_ms": median_ms(fwd, reps), "fwd_bwd_ms": median_ms(fwd_bwd, reps),
                         "count": sum(b.op == block.op for b in model.layers),
                         "fwd_bwd_kernels": kernel_table(fwd_bwd, top=10)}  # where the block's time goes
    h = torch.randn(batch, seq_len, d, device=dev, requires_grad=True)
    y = torch.randint(0, model.config.vocab_size, (batch * seq_len,), device=dev)
    head = _head_loss(model, loss_impl)
    out["lm_head+loss"] = {"fwd_bwd_ms": median_ms(lambda: head(h, y).backward(), reps), "count": 1,
                           "loss_kernel": linear_ce.resolve(h, loss_impl)}
    return out


def host_enqueue_ms(fn, dev, rep: int = 3) -> float:
    """Median host milliseconds ``fn()`` takes to return, from an idle GPU: the time to enqueue its work. Close to
    its GPU wall time (``fwd_bwd_wall_ms``) means the host cannot keep ahead of the GPU (launch-bound); far below,
    the GPU's idle gaps come from elsewhere (a synchronisation inside, or kernel boundaries)."""
    times = []
    for _ in range(rep):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return statistics.median(times)


def step_kernels(model: HybridLM, batch: int, seq_len: int, loss_impl: str) -> dict:
    """The kernels of one forward + backward of the run's own model (compiled if the run was) at its training
    shape, by family (matmul, attention, inductor's fused kernels, fla's, ...): where a step's time goes. Also the
    forward + backward's own time (CUDA events: kernel time plus the GPU's idle gaps) and the kernels of the rest
    of a trainer step, gradient clipping and the fused AdamW update (the run's tokens/s include both)."""
    dev = next(model.parameters()).device
    x = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=dev)

    def fwd_bwd():
        # a compile mode that replays CUDA graphs (reduce-overhead) must see each call as a new step, or the
        # gradients accumulated over calls read outputs its last replay overwrote (as the trainer does per batch)
        torch.compiler.cudagraph_mark_step_begin()
        with linear_ce.use_impl(loss_impl), _autocast(dev):
            loss = model(input_ids=x, targets=x).loss
        loss.backward()
    try:
        out = kernel_table(fwd_bwd, top=30)
        out["fwd_bwd_wall_ms"] = median_ms(fwd_bwd, 3, warmup=1)
        out["fwd_bwd_host_ms"] = host_enqueue_ms(fwd_bwd, dev)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=dev.type == "cuda")

        def update():  # as the trainer's step after backward: clip, then the (fused) AdamW update
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        out["clip_and_adamw"] = kernel_table(update, top=8)
        out["clip_and_adamw"]["wall_ms"] = median_ms(update, 3, warmup=1)
    except Exception as e:  # noqa: BLE001  (a profiler failure must not cost the run's numbers)
        out = {"error": f"{type(e).__name__}: {e}"}
    model.zero_grad(set_to_none=True)
    return out


# ----------------------------------------------------------------------------------------------- one run
RUN_KEYS = ("model", "mode", "loss", "sdpa", "nan_check", "rope", "model_config")  # what a run record copies from its spec


def one_run(spec: dict) -> dict:
    """One training run (in a child process): tokens/s, MFU, peak memory; blocks for eager runs."""
    a = spec["args"]
    run = {k: spec[k] for k in RUN_KEYS}
    try:
        backend.set_sdpa(spec["sdpa"])  # before the model is built and compiled (read at each attention call)
        rope.set_rope(spec["rope"])  # likewise: the q/k rotation (hylo.ops.rope, HYLO_ROPE)
        from hylo.train.trainer import Trainer

        Trainer._defer_checks = spec["nan_check"] == "deferred"  # the trainer's per-step check (module docstring)
        impl = run["loss_impl"] = LOSSES[spec["loss"]]
        cuda = torch.cuda.is_available()
        dev = torch.device("cuda" if cuda else "cpu")
        run["loss_kernel"] = linear_ce.resolve(torch.empty(0, device=dev), impl)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.monotonic()
        with linear_ce.use_impl(impl):
            res = train(dict(model=spec["model_config"], data=a["data"], seq_len=a["seq_len"],
                             batch_size=a["batch_size"], max_steps=a["steps"], optimizer=dict(lr=1e-3),
                             schedule=dict(kind="constant"), eval_batches=1,
                             compile={"eager": False, "compiled": True}.get(spec["mode"], spec["mode"]),
                             logging=dict(log_interval=5)),
                        progress=False, return_model=True)
        run["train_wall_s"] = time.monotonic() - t0
        fl = model_flops(res.model, a["seq_len"])
        tps = steady_tps(res.history, a["skip"])
        sheet, measured = spec["peak_tflops_datasheet"], spec["peak_tflops_measured_matmul"]
        run.update(params=res.num_params, tokens_per_s=tps, train_flops_per_token=fl["train"],
                   forward_flops_by_operator=fl["by_operator"], model_tflops=tps * fl["train"] / 1e12,
                   mfu_datasheet=tps * fl["train"] / (sheet * 1e12) if sheet else None,
                   mfu_measured_peak=tps * fl["train"] / (measured * 1e12), final_loss=res.train_loss,
                   val_loss=res.val_loss, peak_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None)
        run["step_kernels"] = step_kernels(res.model, a["batch_size"], a["seq_len"], impl)
        if spec["mode"] == "eager":
            run["blocks"] = block_times(res.model, a["batch_size"], a["seq_len"], impl)
    except Exception as e:  # noqa: BLE001
        run["error"] = f"{type(e).__name__}: {e}"
        run["traceback"] = traceback.format_exc()[-3000:]
    return run


def _child(spec: dict, conn) -> None:
    if not spec["args"]["eval"]:  # this process is thrown away after the run: skip the final evaluation
        from hylo.train.trainer import Trainer

        Trainer.evaluate = lambda self: float("nan")
    conn.send(one_run(spec))
    conn.close()


def run_in_child(spec: dict, timeout: float | None) -> dict:
    """``one_run(spec)`` in a fresh (spawned) process, ended after ``timeout`` seconds."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(spec, send), daemon=False)
    t0 = time.monotonic()
    p.start()
    send.close()
    got = recv.poll(timeout)  # None: wait for as long as it takes
    run = None
    if got:  # an answer, or the end of the pipe when the child died
        try:
            run = recv.recv()
        except EOFError:
            pass
        p.join(30)
    if p.is_alive():  # past the time limit (or hung after answering)
        p.terminate()
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
    if run is None:
        run = {k: spec[k] for k in RUN_KEYS}
        run["error"] = (f"time limit: stopped after {time.monotonic() - t0:.0f} s" if not got
                        else f"the run's process died (exit code {p.exitcode})")
    run["wall_s"] = time.monotonic() - t0
    return run


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="folder prepared by `hylo data prepare`")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=15, help="warm-up steps left out of the tokens/s")
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--compile", nargs="*", default=["eager", "compiled"],
                    help="eager, compiled (torch.compile default mode) or a torch.compile mode, e.g. "
                         "max-autotune-no-cudagraphs")
    ap.add_argument("--loss", nargs="*", default=["fused"], choices=list(LOSSES),
                    help="LM head + loss of the runs: plain (full logits, float32 cross-entropy) and/or fused "
                         "(hylo.ops.linear_ce, what the trainer takes on CUDA by default)")
    ap.add_argument("--sdpa", nargs="+", default=["auto"], choices=list(backend.SDPA_BACKENDS),
                    help="PyTorch SDPA kernel of causal full attention (hylo.ops.backend.set_sdpa), one set of runs "
                         "each: auto (PyTorch chooses: FlashAttention-2 on an H100), flash, cudnn, efficient, math. "
                         "Without CUDA or with --smoke, only auto and math run")
    ap.add_argument("--nan-check", nargs="+", default=["deferred"], choices=["deferred", "sync"],
                    help="the trainer's per-step non-finite check, one set of runs each: deferred (its default: no "
                         "GPU->host sync per step, with a fused AdamW) or sync (loss and grad norm read every step)")
    ap.add_argument("--rope", nargs="+", default=["auto"], choices=["auto", "torch", "triton"],
                    help="RoPE's q/k rotation (hylo.ops.rope, HYLO_ROPE), one set of runs each: auto (the default: "
                         "triton on CUDA), torch (inductor fuses it) or triton (hylo's kernel, forward and "
                         "backward). Without CUDA or with --smoke, triton is skipped")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds for the whole script: a run still going then is stopped (recorded as such), "
                         "later steps are skipped, and what was measured is saved")
    ap.add_argument("--eval", action="store_true",
                    help="let each run end with the trainer's evaluation (not measured; compiled, it is a second "
                         "compilation under no_grad, so it is skipped by default)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny models on the CPU: checks the script, numbers mean nothing")
    args = ap.parse_args()
    t_start = time.monotonic()

    def left() -> float | None:
        return None if args.time_limit is None else args.time_limit - (time.monotonic() - t_start)

    if args.smoke:
        for m in MODELS.values():
            m.update(SMOKE)
        MODELS["attn-125m"]["layers"] = "a f a f"
        args.seq_len, args.batch_size, args.steps, args.skip, args.vocab_size = 64, 2, 12, 5, 16384
        args.compile = ["eager"]
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (or --smoke to check the script on the CPU)")
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    skipped = []
    if args.smoke or not cuda:  # flash, cudnn and efficient: CUDA kernels (the CPU runs the reference attention)
        skipped = [f"--sdpa {s}: needs CUDA and no --smoke" for s in args.sdpa if s not in ("auto", "math")]
        args.sdpa = [s for s in args.sdpa if s in ("auto", "math")]
        skipped += [f"--rope {r}: needs CUDA and no --smoke" for r in args.rope if r == "triton"]
        args.rope = [r for r in args.rope if r != "triton"] or ["torch"]
        for s in skipped:
            print(f"skipped: {s}", flush=True)
    measured_peak = matmul_tflops(128 if args.smoke else 8192, device=dev.type)
    sheet_peak = peak_bf16_tflops(name)
    result = {"benchmark": "train_throughput", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "device": name, "versions": versions(), "commit": os.environ.get("HYLO_COMMIT"),
              "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps, "skip": args.skip,
              "vocab_size": args.vocab_size, "loss_default_chunk": linear_ce.DEFAULT_CHUNK,
              "peak_tflops_datasheet": sheet_peak, "peak_tflops_measured_matmul": measured_peak,
              "smoke": args.smoke, "time_limit_s": args.time_limit, "skipped": skipped, "runs": []}

    def save():
        result["elapsed_s"] = time.monotonic() - t_start
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    print(f"{name}: bf16 matmul {measured_peak:.0f} TFLOP/s measured, {sheet_peak} datasheet", flush=True)

    # 1. correctness of the fused loss (fla's kernels on CUDA; the PyTorch loop in --smoke)
    t0 = time.monotonic()
    size = dict(n=300, d=64, v=1000, chunk=128) if args.smoke else dict(n=6000, d=768, v=32000, chunk=2048)
    try:
        result["loss_correctness"] = loss_correctness(dev.type, **size)
    except Exception as e:  # noqa: BLE001
        result["loss_correctness"] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                      "traceback": traceback.format_exc()[-3000:]}
    result["loss_correctness"]["wall_s"] = time.monotonic() - t0
    lc = result["loss_correctness"]
    print(f"loss correctness ({lc.get('kernel')}): {'ok' if lc['ok'] else 'FAILED'}", flush=True)
    for c in lc.get("cases", []):
        print("   ", json.dumps({k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in c.items()
                                 if k != "traceback"}), flush=True)
    save()

    # 2. the LM head + loss alone, eager (one model of the first config: the head depends on width and vocab only)
    hcfg = dict(MODELS[args.models[0]], vocab_size=args.vocab_size)
    from hylo.config import HyloConfig

    head_model = HybridLM(HyloConfig(**hcfg)).to(dev)
    result["head_loss"] = {"hidden_size": hcfg["hidden_size"], "vocab_size": args.vocab_size,
                           "tokens": args.batch_size * args.seq_len, "weight_norm": head_model.config.weight_norm}
    result["head_loss"].update(head_times(head_model, args.batch_size, args.seq_len))
    for k, v in result["head_loss"].items():
        if isinstance(v, dict):
            print(f"    head+loss {k:<22} {v.get('fwd_bwd_ms', float('nan')):8.2f} ms fwd+bwd"
                  + (f", +{v['peak_extra_gib']:.2f} GiB" if v.get("peak_extra_gib") is not None else "")
                  + (f"  {v['error']}" if "error" in v else ""), flush=True)
    save()
    if cuda:
        torch.cuda.empty_cache()

    # 3. the training runs, each in its own process
    for mname, mode, loss, sdpa, nan_check, rope_path in itertools.product(args.models, args.compile, args.loss,
                                                                           args.sdpa, args.nan_check, args.rope):
        tag = f"{mname}/{mode}/{loss}/sdpa={sdpa}/nan_check={nan_check}/rope={rope_path}"
        if left() is not None and left() < 30:
            result["skipped"].append(f"run {tag}: time limit")
            continue
        spec = dict(model=mname, mode=mode, loss=loss, sdpa=sdpa, nan_check=nan_check, rope=rope_path,
                    model_config=dict(MODELS[mname], vocab_size=args.vocab_size), smoke=args.smoke,
                    args=vars(args), peak_tflops_datasheet=sheet_peak, peak_tflops_measured_matmul=measured_peak)
        run = run_in_child(spec, left())
        result["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items()
                          if k not in ("traceback", "blocks", "model_config", "forward_flops_by_operator")}),
              flush=True)
        save()

    # 4. the head + loss compiled, if time is left (a compile takes tens of seconds)
    if any(m != "eager" for m in args.compile) or args.smoke:
        if left() is None or left() > 90:
            result["head_loss"].update(head_times(head_model, args.batch_size, args.seq_len,
                                                  compile_backend="aot_eager" if args.smoke else "inductor"))
        else:
            result["skipped"].append("compiled head+loss timing: time limit")
    save()

    # relative_to_attn: vs the attn-125m run of the same mode, loss and SDPA kernel; relative_to_sdpa_auto: vs the
    # same model, mode and loss with PyTorch's own kernel choice (when --sdpa has auto)
    tps = {(r["model"], r["mode"], r["loss"], r["sdpa"], r["nan_check"], r["rope"]): r.get("tokens_per_s")
           for r in result["runs"]}
    print(f"\n{'model':<22}{'mode':<28}{'loss':<7}{'sdpa':<10}{'check':<9}{'rope':<8}{'params':>12}{'tok/s':>12}{'MFU':>8}{'vs attn':>9}"
          f"{'vs auto':>9}{'peak GiB':>10}{'loss@end':>10}")
    for r in result["runs"]:
        if "error" in r:
            print(f"{r['model']:<22}{r['mode']:<28}{r['loss']:<7}{r['sdpa']:<10}{r['nan_check']:<9}{r['rope']:<8} "
                  f"ERROR {r['error'][:80]}")
            continue
        base = tps.get(("attn-125m", r["mode"], r["loss"], r["sdpa"], r["nan_check"], r["rope"]))
        auto = tps.get((r["model"], r["mode"], r["loss"], "auto", r["nan_check"], r["rope"]))
        rel = r["relative_to_attn"] = r["tokens_per_s"] / base if base else float("nan")
        rel_auto = r["relative_to_sdpa_auto"] = r["tokens_per_s"] / auto if auto else float("nan")
        print(f"{r['model']:<22}{r['mode']:<28}{r['loss']:<7}{r['sdpa']:<10}{r['nan_check']:<9}{r['rope']:<8}"
              f"{r['params']:>12,}"
              f"{r['tokens_per_s']:>12,.0f}{(r['mfu_datasheet'] or 0):>8.1%}{rel:>9.2f}{rel_auto:>9.2f}"
              f"{(r['peak_mem_gib'] or 0):>10.1f}{r['final_loss']:>10.3f}")
        for op, b in r.get("blocks", {}).items():
            print(f"    {op:<14} x{b['count']:<3} fwd+bwd {b['fwd_bwd_ms']:.2f} ms each")
    for k, v in result["head_loss"].items():
        if isinstance(v, dict) and "fwd_bwd_ms" in v:
            print(f"head+loss {k:<24} {v['fwd_bwd_ms']:8.2f} ms")
    for s in result["skipped"]:
        print(f"skipped: {s}")
    print(f"total {time.monotonic() - t_start:.0f} s")
    save()


if __name__ == "__main__":
    main()
