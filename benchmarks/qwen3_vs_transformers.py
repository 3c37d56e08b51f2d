r"""hylo against transformers on Qwen3-0.6B's shape (random weights, bf16, batch 1), and both against the
memory-bandwidth floor. One call:

    HYLO_COMMIT=$(git rev-parse HEAD) python benchmarks/qwen3_vs_transformers.py \
        --out benchmarks/results/qwen3-vs-transformers-h100.json

- transformers: ``Qwen3ForCausalLM`` built from a ``Qwen3Config`` with the 0.6B shape, ``generate`` greedy, eager
  (no compile), default (dynamic) cache, 16-token prompt, 64 new tokens. ms/token = (time of 64 new tokens - time
  of 1 new token) / 63, so the prompt's prefill is left out; the plain time / 64 is reported too.
- hylo: the same weights imported with ``hylo.convert.from_transformers``; greedy decoding through
  ``hylo.engine.DecodeRunner`` (one CUDA graph per step, argmax fed back on the device) with a static cache of
  prompt + 64 tokens; also with the engine's default 2048-token cache (attention's step reads the whole cache);
  and the same with the step compiled by inductor before capture (``DecodeRunner(compile=True)``); for both, the
  GPU kernels of one step (count, summed time, the costliest) from torch.profiler. On CUDA the engine's step
  takes hylo's Triton GEMV (``hylo.ops.gemv``, ``HYLO_GEMV=auto``) for its matrix products; a mode with the suffix
  ``+cublas`` (``default+cublas``) builds its runners with ``HYLO_GEMV=off`` (cuBLAS), ``+gemv`` with ``on``; the
  suffixes join the result key (``hylo_compiled_cublas``). ``+dattn`` (``HYLO_DECODE_ATTN=on``) computes attention
  with hylo's split-KV Triton kernel (``hylo.ops.decode_attention``) instead of two matrix products and a softmax;
  ``+fuse`` (``HYLO_GEMV_FUSE=on``) moves the norms, SwiGLU's product and the residual adds into the GEMVs.
  On the CPU (``--smoke``) ``+gemv`` and ``+dattn`` modes are skipped with a note, unless ``TRITON_INTERPRET=1``
  (then the kernels run in Triton's interpreter, eager steps only).
- floor: bytes read per step (every weight once: the tied embedding is read whole by the LM head; plus the KV
  cache) / device-to-device copy bandwidth measured here with a 1 GiB copy (read + write bytes / time).
- agreement: greedy tokens of both for the first 16 new tokens (reported, not a failure: bf16 kernels differ and
  a near-tie can flip an argmax), the max abs difference of the prompt's logits and how many of its positions have
  the same argmax, in bf16 and then with both models in float32, with 16 greedy tokens of each model's plain
  ``generate`` there (in float32 they must agree: a conversion check). transformers' model is built as
  ``from_pretrained`` builds it (``_from_config(dtype=...)``) and cast with :func:`cast_keeping_rope`: a plain
  ``.to(bfloat16)`` also rounds its RoPE frequency buffer to bf16, which moved its float32 logits by 0.05 (of 8)
  from the exact ones before this was fixed.
  The logits are compared before the hylo modes and the greedy tokens after the first one; floor and goals are
  written after every mode: a run cut short (a compile at the call's limit) keeps them all.

Goals (issue 4): hylo >= 30x faster per token than transformers' eager generate; hylo <= 1.5x the floor. The
goals take hylo's fastest mode (median of its runs) and transformers' fastest run: transformers' generate is
host-bound, and its time for the same 64 tokens varied from 2.1 to 5.5 s between runs on one H100 machine.
Expected run time on an H100: ~3 min (transformers: 5 x 64 tokens; a compiled mode compiles for 30 s to over 4 min
with a cold cache; ``+blockc`` compiles each kind of block once).
``--smoke`` runs a tiny shape on the CPU (a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hylo.convert import from_transformers  # noqa: E402
from hylo.engine.runner import DecodeRunner  # noqa: E402
from hylo.engine import kernel_step as hylo_kstep  # noqa: E402
from hylo.ops import decode_attention as hylo_dattn  # noqa: E402
from hylo.ops import gemv as hylo_gemv  # noqa: E402
from hylo.ops.backend import Choice  # noqa: E402
from hylo.profile.report import environment  # noqa: E402
from timing import kernel_table  # noqa: E402  (benchmarks/timing.py)

# initializer_range 0.05 instead of 0.02: with 0.02 random weights, greedy decoding repeats one token, which makes
# the token agreement check meaningless; the values do not change the latency.
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
                 initializer_range=0.05)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
            tie_word_embeddings=True, attention_bias=False, initializer_range=0.05)


def device_and_shape(smoke: bool, script: str):
    """(device, dtype, shape, CUDA graphs) of a run: the tiny shape in float32 on the CPU for ``--smoke``, else
    Qwen3-0.6B's shape in bf16 on CUDA (exits with a message where there is none)."""
    if smoke:
        return torch.device("cpu"), torch.float32, TINY, False
    if not torch.cuda.is_available():
        sys.exit(f"benchmarks/{script} needs a CUDA device (or --smoke for a CPU check)")
    return torch.device("cuda"), torch.bfloat16, QWEN3_06B, True


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def wall(fn, dev, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t0)
    return out


def copy_bandwidth(dev, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s: (read + write bytes) / median time of ``y.copy_(x)``."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    y = torch.empty_like(x)
    y.copy_(x)
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            y.copy_(x)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            y.copy_(x)
            times.append(time.perf_counter() - t0)
    return 2 * x.numel() * x.element_size() / statistics.median(times)


def unique_param_bytes(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        n += p.numel() * p.element_size()
    return n


@torch.no_grad()
def hylo_greedy(model, runner: DecodeRunner, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """Prefill into the runner's cache, then ``n_new - 1`` graphed steps; argmax stays on the device."""
    runner.reset()
    h = model.hidden_states(prompt, cache=runner.cache)
    tok = model.logits(h[:, -1]).argmax(-1)
    runner.set_positions(prompt.shape[1])
    out = [tok]
    for _ in range(n_new - 1):
        tok = runner.step(tok, greedy=True).clone()  # the step's own argmax (a buffer the next step overwrites)
        out.append(tok)
    return torch.stack(out, 1)


@torch.no_grad()
def hylo_ms_per_token(runner: DecodeRunner, start: int, steps: int, repeats: int, dev) -> float:
    """Median ms per greedy step (graph replay + argmax fed back: the kernel step's own, else ``logits.argmax``)
    over ``steps`` steps from position ``start``."""
    tok = torch.zeros(1, dtype=torch.long, device=dev)
    times = []
    for r in range(repeats + 1):
        runner.set_positions(start)
        t = tok
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            t = runner.step(t, greedy=True)
        sync(dev)
        if r:  # the first pass warms up
            times.append((time.perf_counter() - t0) / steps * 1e3)
    return statistics.median(times)


@torch.no_grad()
def kernel_profile(runner: DecodeRunner, dev, top: int = 12) -> dict:
    """GPU kernels of one decode step, run outside the graph (the same kernels the graph replays): how many, their
    summed time (busy time; the rest of a replay's time is gaps between kernels), and the costliest ones (the
    position reset before the step adds a kernel or two)."""
    tok = torch.zeros(runner.batch_size, dtype=torch.long, device=dev)

    def step():
        runner.set_positions(16)
        runner._call(tok)  # the step as the graph captured it (with HYLO_GEMV=on, through the GEMV)
    t = kernel_table(step, top)
    return {"kernels_per_step": t.pop("kernels"), **t}


def measure_hylo(hy, prompt, n: int, graphs: bool, compile: bool, repeats: int, dev) -> tuple[dict, list[int]]:
    """ms/token of greedy decoding with a cache of prompt + ``n`` tokens and with a 2048-token cache."""
    T = prompt.shape[1]
    runner = DecodeRunner(hy, 1, T + n, cuda_graph=graphs, compile=compile)
    tokens = hylo_greedy(hy, runner, prompt, n)[0].tolist()
    rec = {"ms_per_token": hylo_ms_per_token(runner, T, n, repeats, dev), "cache_len": T + n,
           "graphed": runner.graphed, "compiled": compile, "kv_cache_bytes": runner.cache.nbytes(),
           # what the runner took (its own decisions from the switches, the device and the model)
           "gemv": runner.gemv, "fused": runner.fused, "kernel_step": runner.kernel_step, "pdl": runner.pdl,
           "generate_s_incl_prefill": statistics.median(wall(lambda: hylo_greedy(hy, runner, prompt, n), dev, repeats))}
    del runner
    r2 = DecodeRunner(hy, 1, 2048, cuda_graph=graphs, compile=compile)
    rec["ms_per_token_cache_2048"] = hylo_ms_per_token(r2, T, n, repeats, dev)
    rec["kv_cache_bytes_2048"] = r2.cache.nbytes()
    return rec, tokens


def try_profile(res: dict, make_runner, dev) -> dict | None:
    try:
        return kernel_profile(make_runner(), dev)
    except Exception as e:  # noqa: BLE001  (a diagnostic: never lose the timings for it)
        res["errors"].append({"what": "kernel profile", "error": f"{type(e).__name__}: {e}"[:300]})
        return None


SUFFIXES = {"gemv": ("gemv", "on"), "cublas": ("gemv", "off"),  # mode suffix -> (switch, value)
            "dattn": ("decode_attn", "on"), "fuse": ("fuse", "on"), "kstep": ("kernel_step", "on"),
            "nopdl": ("pdl", "off"), "perspdl": ("pdl", "persistent"),
            "blockc": ("compile_scope", "block"), "nokstep": ("kernel_step", "off"),
            "pre": ("gemv_preload", "on"), "nopre": ("gemv_preload", "off"),
            "noearly": ("attn_early_kv", "off"), "aosplit": ("step_attn_out", "split"),
            "aofused": ("step_attn_out", "fused"), "ffnsplit": ("step_ffn_split", "on"),
            "noao": ("step_attn_out", "off"), "noffnsplit": ("step_ffn_split", "off"),
            "torchio": ("step_io", "torch"), "glu": ("step_glu", "up"), "noglu": ("step_glu", "down"),
            "autotune": ("gemv_configs", "autotune")}
# the switches a mode may set (SUFFIXES' first field) -> their environment names (keys of Choice.registry)
SWITCH_ENV = {"gemv": "HYLO_GEMV", "decode_attn": "HYLO_DECODE_ATTN", "fuse": "HYLO_GEMV_FUSE",
              "kernel_step": "HYLO_KERNEL_STEP", "pdl": "HYLO_PDL", "compile_scope": "HYLO_COMPILE_SCOPE",
              "gemv_preload": "HYLO_GEMV_PRELOAD", "attn_early_kv": "HYLO_ATTN_EARLY_KV",
              "step_attn_out": "HYLO_STEP_ATTN_OUT", "step_ffn_split": "HYLO_STEP_FFN_SPLIT", "step_io": "HYLO_STEP_IO",
              "step_glu": "HYLO_STEP_GLU", "gemv_configs": "HYLO_GEMV_CONFIGS"}


def cast_keeping_rope(model, dtype) -> None:
    """``model.to(dtype)`` with its RoPE frequency buffers (``*inv_freq``) left in float32 and exact: transformers
    computes them in float32 when it builds a model, but a plain ``.to(bfloat16)`` casts them too, and its rotary
    embedding then uses the rounded frequencies in every later dtype."""
    keep = {n: b.float().clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    model.to(dtype)
    for n, b in keep.items():
        mod, _, attr = n.rpartition(".")
        setattr(model.get_submodule(mod), attr, b)


def mode_switches(switches: dict[str, str]) -> dict[str, str]:
    """Every switch a mode runs under, by its ``HYLO_*`` name: the mode's own value, else the current one. The
    kernel step takes the GEMV on unless the mode says otherwise (it is built on it; ``auto`` would leave it off
    under the interpreter)."""
    out = {env: switches.get(k, Choice.registry[env].value) for k, env in SWITCH_ENV.items()}
    if switches.get("kernel_step") == "on" and "gemv" not in switches:
        out["HYLO_GEMV"] = "on"
    return out


@contextlib.contextmanager
def switched(values: dict[str, str]):
    """Run under the switches ``values`` (``HYLO_*`` name -> value), each put back afterwards."""
    with contextlib.ExitStack() as stack:
        for env, v in values.items():
            stack.enter_context(Choice.registry[env].use(v))
        yield


def parse_modes(spec: str) -> list[tuple[str, bool | str, dict[str, str]]]:
    """``--modes`` -> ``(result key, DecodeRunner's compile argument, switches)`` per mode: ``eager`` (no compile),
    ``default`` (``compile=True``) or another ``torch.compile`` mode, each optionally suffixed: ``+cublas``
    (``HYLO_GEMV=off``: cuBLAS products instead of the engine's default Triton GEMV on CUDA), ``+gemv``
    (``HYLO_GEMV=on``, also where ``auto`` would not take it), ``+dattn`` (``HYLO_DECODE_ATTN=on``: the split-KV
    Triton attention kernel), ``+fuse`` (``HYLO_GEMV_FUSE=on``: norms, SwiGLU and residual adds inside the GEMVs,
    ``hylo.engine.fused``; it needs the GEMV), ``+kstep`` (``HYLO_KERNEL_STEP=on``: the step as hylo's Triton
    kernels chained with programmatic dependent launch, ``hylo.engine.kernel_step``; never compiled, so take it
    with ``eager``: ``eager+kstep``; the default where it applies, so ``+kstep`` only insists), ``+nokstep``
    (``HYLO_KERNEL_STEP=off``: the graphed step of PyTorch ops, as before it was the default), ``+nopdl``
    (``HYLO_PDL=off``), ``+perspdl`` (``HYLO_PDL=persistent``: PDL with
    persistent GEMV grids), ``+blockc`` (``HYLO_COMPILE_SCOPE=block``: ``default+blockc`` compiles each kind of
    block once instead of the whole step), ``+pre`` / ``+nopre`` (``HYLO_GEMV_PRELOAD=on|off``: the step's GEMVs
    hold their weights in registers, loaded before the PDL wait; on by default), ``+noearly``
    (``HYLO_ATTN_EARLY_KV=off``: its attention loads no K/V before the wait), ``+aofused`` / ``+aosplit`` / ``+noao``
    (``HYLO_STEP_ATTN_OUT``), ``+ffnsplit`` / ``+noffnsplit`` (``HYLO_STEP_FFN_SPLIT``), ``+torchio``
    (``HYLO_STEP_IO=torch``: the kernel step's embedding, position increment and greedy argmax as PyTorch's
    kernels), ``+glu`` / ``+noglu`` (``HYLO_STEP_GLU=up|down``: SwiGLU in the gate/up GEMV or the down one),
    ``+autotune`` (``HYLO_GEMV_CONFIGS=autotune``: the preloading GEMVs' configs from Triton's autotuner instead of
    the device's table of configs timed in the step);
    suffixes combine
    (``default+dattn+cublas``)."""
    out = []
    for m in (m.strip() for m in spec.split(",")):
        if not m:
            continue
        base, *suffixes = m.split("+")
        bad = [x for x in suffixes if x not in SUFFIXES]
        if bad:
            raise SystemExit(f"--modes: unknown suffix {bad[0]!r} in {m!r} (known: {', '.join(SUFFIXES)})")
        key, compile = {"eager": ("hylo", False), "default": ("hylo_compiled", True)}.get(
            base, (f"hylo_compiled_{base.replace('-', '_')}", base))
        switches = dict(SUFFIXES[x] for x in suffixes)
        out.append(("_".join([key, *suffixes]), compile, switches))
    return out


def side_by_side(runners: dict, start: int, steps: int, rounds: int, dev, after_round=None) -> dict[str, list]:
    """ms/token of each runner (``name -> runner`` or ``(runner, switches)``, the switches scoped around its
    timing) in ``rounds`` rounds, each timing every runner once (:func:`hylo_ms_per_token`, one pass of ``steps``
    from ``start`` after a warm-up pass), the order reversed every other round so that a drift weighs on all
    alike; ``after_round`` is called after each round."""
    times = {k: [] for k in runners}
    for r in range(rounds):
        for key in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
            runner, sw = runners[key] if isinstance(runners[key], tuple) else (runners[key], {})
            with switched(sw), torch.no_grad():  # a graph captured lazily (the fused kernel's second step) sees them
                times[key].append(hylo_ms_per_token(runner, start, steps, 1, dev))
        if after_round:
            after_round()
    return times


def interleaved_rounds(res: dict, modes, hy, T: int, n: int, rounds: int, graphs: bool, dev) -> None:
    """Machine noise (the same step took 0.674-0.734 ms/token in four calls within minutes on one H100) is as
    large as the differences between modes, so time them side by side: one runner per mode that ran (cache
    ``T + n``), then ``rounds`` rounds, each timing every mode once (one pass of ``n`` greedy steps from ``T`` after
    a warm-up pass; the order reversed every other round, so a drift weighs on all alike) and measuring the copy
    bandwidth. Per mode: ``ms_per_token_rounds`` (each round's) and ``ms_per_token_interleaved`` (their median);
    ``copy_bandwidth_GBps_rounds``; :func:`floor_and_goals` then judges the goals on these medians too."""
    runners = {}
    for key, compile, switches in modes:
        if key not in res:
            continue
        sw = mode_switches(switches)
        with switched(sw):
            runners[key] = (DecodeRunner(hy, 1, T + n, cuda_graph=graphs, compile=compile), sw)
    if not runners:
        return
    bws = []
    times = side_by_side(runners, T, n, rounds, dev, after_round=lambda: bws.append(
        copy_bandwidth(dev, (1 << 30) if dev.type == "cuda" else (1 << 24)) / 1e9))
    for key, ts in times.items():
        res[key]["ms_per_token_rounds"] = ts
        res[key]["ms_per_token_interleaved"] = statistics.median(ts)
    res["copy_bandwidth_GBps_rounds"] = bws
    res["rounds"] = rounds


def floor_and_goals(res: dict, bw: float | None) -> None:
    """The memory-bandwidth floor of a step and each mode's ratios to it and to transformers; the goals.
    Every mode's cache holds the same bytes. Called after each mode, so a run cut short keeps them."""
    hylo_keys = [k for k in res if k == "hylo" or k.startswith("hylo_")]
    if bw and hylo_keys:
        first = res[hylo_keys[0]]
        floor_small = (res["weights_bytes"] + first["kv_cache_bytes"]) / bw * 1e3
        floor_2048 = (res["weights_bytes"] + first["kv_cache_bytes_2048"]) / bw * 1e3
        res["floor_ms_per_token"] = floor_small
        res["floor_ms_per_token_cache_2048"] = floor_2048
        tf_res = res.get("transformers")
        for k in hylo_keys:
            hc = res[k]
            hc["x_floor"] = hc["ms_per_token"] / floor_small
            hc["x_floor_cache_2048"] = hc["ms_per_token_cache_2048"] / floor_2048
            if tf_res:
                hc["speedup_vs_transformers"] = tf_res["ms_per_token"] / hc["ms_per_token"]
                hc["speedup_vs_transformers_fastest"] = tf_res["ms_per_token_fastest"] / hc["ms_per_token"]
        if tf_res:
            tf_res["x_floor"] = tf_res["ms_per_token"] / floor_small
        best = min(hylo_keys, key=lambda k: res[k]["ms_per_token"])
        res["best_mode"] = best
        # the speed-up goal is judged against transformers' fastest run (its times are host-bound and vary a lot
        # between runs; its fastest is the least favourable to hylo)
        res["goals"] = {"hylo_30x_faster": bool(tf_res) and res[best]["speedup_vs_transformers_fastest"] >= 30,
                        "hylo_within_1.5x_floor": res[best]["x_floor"] <= 1.5}
        inter = [k for k in hylo_keys if "ms_per_token_interleaved" in res[k]]
        if inter and res.get("copy_bandwidth_GBps_rounds"):  # the same on interleaved_rounds' medians
            bw_med = statistics.median(res["copy_bandwidth_GBps_rounds"]) * 1e9
            floor_r = (res["weights_bytes"] + first["kv_cache_bytes"]) / bw_med * 1e3
            res["floor_ms_per_token_interleaved"] = floor_r
            for k in inter:
                res[k]["x_floor_interleaved"] = res[k]["ms_per_token_interleaved"] / floor_r
            best_r = min(inter, key=lambda k: res[k]["ms_per_token_interleaved"])
            res["best_mode_interleaved"] = best_r
            res["goals_interleaved"] = {
                "hylo_30x_faster": bool(tf_res) and tf_res["ms_per_token_fastest"] / res[best_r][
                    "ms_per_token_interleaved"] >= 30,
                "hylo_within_1.5x_floor": res[best_r]["x_floor_interleaved"] <= 1.5}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/qwen3-vs-transformers.json")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each hylo measurement (median)")
    ap.add_argument("--tf-repeats", type=int, default=5,
                    help="timed runs of transformers' generate (host-bound, so noisier: median and fastest kept)")
    ap.add_argument("--modes", default="eager,eager+nokstep,default+nokstep+blockc",
                    help="hylo decode steps to time: eager (graph of eager kernels; on CUDA the kernel step where it "
                         "applies), default (compiled) or another torch.compile mode, e.g. "
                         "max-autotune-no-cudagraphs (minutes to compile); suffixes as in parse_modes, e.g. "
                         "+nokstep (the step of PyTorch ops), +cublas (HYLO_GEMV=off)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="after the modes, time them side by side in this many interleaved rounds (median kept)")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: checks the script")
    args = ap.parse_args()
    modes = parse_modes(args.modes)  # bad names fail here, before anything runs
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dev, dtype, shape, graphs = device_and_shape(args.smoke, "qwen3_vs_transformers.py")
    env = environment(dev)
    res: dict = {"date": env["date"], "device": env["device"], "versions": env["versions"],
                 "dtype": str(dtype).replace("torch.", ""), "shape": shape, "prompt_tokens": args.prompt,
                 "new_tokens": args.new_tokens, "batch": 1, "errors": []}
    from hylo.engine import kernel_step
    from hylo.ops import decode_attn_out as dao
    # the knobs of HYLO_STEP_ATTN_OUT=fused (read from the environment at import), for modes that take it
    res["attn_out_kernel"] = {"tile": dao.TILE_ELEMS, "block": dao.BLOCK, "warps": dao.WARPS, "pre_kv": dao.PRE_KV,
                              "fused_max_pos": kernel_step.FUSED_MAX_POS}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(res, indent=1))

    n, T = args.new_tokens, args.prompt
    torch.manual_seed(0)
    cfg = Qwen3Config(**shape)
    with torch.device(dev):  # as from_pretrained(dtype=...) builds it: RoPE's frequencies stay float32
        tf = Qwen3ForCausalLM._from_config(cfg, dtype=dtype).eval()
    hy = from_transformers(tf, dtype=dtype).to(dev).eval()  # shares the weight tensors
    res["params"] = sum(p.numel() for p in tf.parameters())
    res["weights_bytes"] = unique_param_bytes(tf)
    res["attn_implementation"] = getattr(tf.config, "_attn_implementation", None)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, T), generator=g).to(dev)

    # --- bandwidth floor
    try:
        bw = copy_bandwidth(dev, (1 << 30) if dev.type == "cuda" else (1 << 24))
        res["copy_bandwidth_GBps"] = bw / 1e9
    except Exception as e:  # noqa: BLE001
        bw = None
        res["errors"].append({"what": "bandwidth", "error": f"{type(e).__name__}: {e}"[:300]})

    # --- transformers generate (eager, dynamic cache)
    tf_tokens = None
    try:
        kw = dict(do_sample=False, pad_token_id=0)
        with torch.no_grad():
            tf.generate(prompt, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up
            t1 = wall(lambda: tf.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw), dev, args.tf_repeats)
            holder = {}

            def gen():
                holder["out"] = tf.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)

            tn = wall(gen, dev, args.tf_repeats)
        tf_tokens = holder["out"][0, T:].tolist()
        res["transformers"] = {"ms_per_token": 1e3 * (statistics.median(tn) - statistics.median(t1)) / (n - 1),
                               "ms_per_token_fastest": 1e3 * (min(tn) - min(t1)) / (n - 1),
                               "ms_per_token_incl_prefill": 1e3 * statistics.median(tn) / n,
                               "generate_s": tn, "one_token_s": t1, "cache": "DynamicCache (default)",
                               "compiled": False}
        print(f"transformers generate: {res['transformers']['ms_per_token']:.2f} ms/token", flush=True)
    except Exception as e:  # noqa: BLE001
        res["errors"].append({"what": "transformers generate", "error": f"{type(e).__name__}: {e}"[:500],
                              "trace": traceback.format_exc()[-1500:]})
    save()

    # --- agreement of the prompt's logits, before the hylo modes (a mode cut off at the call's limit loses nothing)
    # bf16 (as timed), then both models in float32: equal logits there show that bf16 rounding, not a
    # conversion error, is what separates the two models' greedy tokens (random weights: near-ties everywhere);
    # then back to the timed dtype (bf16 -> float32 -> bf16 is exact)
    for to, tag in ((None, ""), (torch.float32, "_fp32")):
        try:
            with torch.no_grad():
                if to is not None:
                    cast_keeping_rope(tf, to), hy.to(to)
                a = tf(prompt).logits.float()
                b = hy(prompt).logits.float()
                res[f"prompt_logits_max_abs_diff{tag}"] = (a - b).abs().max().item()
                res[f"prompt_logits_max_abs{tag}"] = a.abs().max().item()
                res[f"prompt_argmax_agree{tag}"] = [int((a.argmax(-1) == b.argmax(-1)).sum()), a.shape[1]]
                if to is not None:  # each model's own generate, float32: greedy tokens must agree
                    k = min(16, n)
                    kw = dict(max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
                    want, got = (m.generate(prompt, **kw)[0, T:].tolist() for m in (tf, hy))
                    same = [x == y for x, y in zip(want, got)]
                    res["greedy_fp32"] = {"compared": k, "agree": sum(same),
                                          "first_mismatch": same.index(False) if not all(same) else None,
                                          "transformers": want, "hylo": got, "hylo_path": "HybridLM.generate"}
        except Exception as e:  # noqa: BLE001
            res["errors"].append({"what": f"logits{tag}", "error": f"{type(e).__name__}: {e}"[:300]})
        finally:
            cast_keeping_rope(tf, dtype), hy.to(dtype)
    save()

    # --- hylo: DecodeRunner, CUDA graph, cache = prompt + new tokens (and the engine's default 2048); then the same
    # with the step compiled (inductor) before capture, which fuses the norms, RoPE, gates and adds
    hy_tokens = None
    for key, compile, switches in modes:
        sw = mode_switches(switches)
        gemv, dattn, fuse = (sw[e] for e in ("HYLO_GEMV", "HYLO_DECODE_ATTN", "HYLO_GEMV_FUSE"))
        asked_kstep = switches.get("kernel_step") == "on"  # on by default, but taken only where the GEMV is
        forced = [op for op, v in ((hylo_gemv, gemv), (hylo_dattn, dattn), (hylo_gemv, fuse),
                                   (hylo_gemv, "on" if asked_kstep else "off")) if v == "on"]
        if forced and (not all(op.supported(dev) for op in forced) or (dev.type != "cuda" and compile)):
            res.setdefault("skipped", {})[key] = (
                "HYLO_GEMV=on, HYLO_DECODE_ATTN=on, HYLO_GEMV_FUSE=on and HYLO_KERNEL_STEP=on need CUDA and Triton, "
                "or TRITON_INTERPRET=1 on the CPU for eager steps (the interpreter cannot be traced by torch.compile)")
            continue
        try:
            with switched(sw):
                rec, tokens = measure_hylo(hy, prompt, n, graphs, compile, args.repeats, dev)
                rec["kernels"] = try_profile(
                    res, lambda: DecodeRunner(hy, 1, T + n, cuda_graph=False, compile=compile), dev)
            rec["compile_mode"] = compile if isinstance(compile, str) else ("default" if compile else None)
            rec["switches"] = sw
            if asked_kstep and not rec["kernel_step"]:  # timed, but not what the mode's name says
                why = hylo_kstep.applicable(hy, 1, hy.head_weight()) or f"HYLO_GEMV={gemv}"
                res["errors"].append({"what": f"{key}: the kernel step was not taken", "error": why})
            if hy_tokens is not None:
                k = min(16, n)
                rec["greedy_agree_with_first_mode"] = sum(x == y for x, y in zip(tokens[:k], hy_tokens[:k]))
            if hy_tokens is None and tf_tokens is not None:  # greedy tokens of the first mode against transformers'
                k = min(16, n)
                same = [x == y for x, y in zip(tf_tokens[:k], tokens[:k])]
                res["greedy"] = {"compared": k, "agree": sum(same), "hylo_mode": key,
                                 "first_mismatch": same.index(False) if not all(same) else None,
                                 "transformers": tf_tokens[:k], "hylo": tokens[:k]}
            hy_tokens = hy_tokens or tokens
            res[key] = rec
            print(f"{key}: {rec['ms_per_token']:.3f} ms/token (cache {T + n}), {rec['ms_per_token_cache_2048']:.3f} "
                  f"ms/token (cache 2048)", flush=True)
        except Exception as e:  # noqa: BLE001
            res["errors"].append({"what": f"{key} decode", "error": f"{type(e).__name__}: {e}"[:500],
                                  "trace": traceback.format_exc()[-1500:]})
        floor_and_goals(res, bw)
        save()

    res["gemv_tuned"] = hylo_gemv.tuned()  # the GEMVs' autotuned blocks and warps (the kernel step's products)
    if dev.type == "cuda":  # and the fixed configs that modes without +autotune took instead where they apply
        res["gemv_table"] = {"device": torch.cuda.get_device_name(dev), "pre_configs": {
            f"{n}x{k}{'g' if glu else ''}": list(c) for (n, k, glu), c in
            {**hylo_gemv.device_configs(torch.cuda.get_device_name(dev)), **hylo_gemv.PRE_CONFIGS}.items()}}
    if args.rounds:
        try:
            interleaved_rounds(res, modes, hy, T, n, args.rounds, graphs, dev)
            for k in (k for k in res if k.startswith("hylo") and isinstance(res[k], dict)):
                if "ms_per_token_rounds" in res[k]:
                    print(f"{k}: interleaved {[round(t, 3) for t in res[k]['ms_per_token_rounds']]} ms/token",
                          flush=True)
        except Exception as e:  # noqa: BLE001
            res["errors"].append({"what": "interleaved rounds", "error": f"{type(e).__name__}: {e}"[:500],
                                  "trace": traceback.format_exc()[-1500:]})
        floor_and_goals(res, bw)
    save()
    keys = ["transformers"] + [k for k in res if k == "hylo" or k.startswith("hylo_")] + [
        "floor_ms_per_token", "copy_bandwidth_GBps", "best_mode", "goals", "floor_ms_per_token_interleaved",
        "copy_bandwidth_GBps_rounds", "best_mode_interleaved", "goals_interleaved", "greedy", "greedy_fp32",
        "prompt_logits_max_abs_diff", "prompt_argmax_agree", "prompt_logits_max_abs_diff_fp32",
        "prompt_argmax_agree_fp32", "skipped", "errors"]
    print(json.dumps({k: res.get(k) for k in keys}, indent=1, default=str))
    print(f"→ {out}")


if __name__ == "__main__":
    main()
