r"""Where a graphed decode step's time goes: the kernels of CUDA-graph replays on the GPU's clock, one step at a time.

Why: a kernel table (``timing.kernel_table``) sums each kernel's busy time, but it cannot show the gaps between
kernels, and with programmatic dependent launch (PDL, ``hylo.ops.pdl``) a kernel starts before the one ahead of it
ends, so its own duration counts time it spent waiting. This script profiles ``--replays`` greedy steps of a
``DecodeRunner`` (graph replay + argmax, as ``qwen3_vs_transformers.py`` times them) and reads every kernel's start
and end from the profiler's trace. Per step it reports:

- ``period_ms``: start of one step's first kernel to the next step's (what a token costs on the GPU's clock);
- ``span_ms`` (first start to last end), ``busy_ms`` (union of the kernels' intervals), ``idle_ms`` = span - busy,
  ``overlap_ms`` = summed durations - busy (kernels running at once: PDL's early launches);
- ``by_role``: per kernel role (``qkv``, ``attn``, ``combine``, ``o_proj``, ``ffn_in``, ``ffn_out``, ``head``, or
  the kernel's name elsewhere): calls, summed duration and summed *increment* -- how far
  the kernel moved the step's last end forward (end minus the latest end before it). The increments add up to the
  span, so they say what each role costs with overlap and gaps included.

Also the wall-clock ms/token of the same runner (median of timed passes), and the decode attention's
``MIN_SPLIT`` (cache slots per split at least) and ``BLOCK_SLOTS`` (slots per block) for the configs that set them.

Configs (``--configs``): the Qwen3 benchmark's modes (``eager+kstep``, ``eager+kstep+nopdl``, ``default``, ...), each
optionally suffixed ``@S`` to set the attention's ``MIN_SPLIT`` to ``S`` (``eager+kstep+nopdl@16``), or ``@S/B`` to
set its block of slots to ``B`` too (``eager@128/64``: one split and no combine kernel at an 80-slot cache, the
first 64 slots loaded before the PDL wait); each at every
``--caches`` length. One call on an H100 (Qwen3-0.6B shape, random weights, bf16, batch 1):

    HYLO_COMMIT=$(git rev-parse HEAD) python benchmarks/decode_timeline.py \
        --configs 'eager+kstep+nopdl,eager+kstep+nopdl@16,eager+kstep,eager+kstep@16' --caches 80 2048 \
        --out benchmarks/results/decode-timeline-h100.json

``--smoke`` runs a tiny shape on the CPU without graphs (operators stand in for kernels: a check of the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qwen3_vs_transformers import (device_and_shape, hylo_ms_per_token, mode_switches, parse_modes,  # noqa: E402
                                   switched, sync)

from hylo.convert import from_transformers  # noqa: E402
from hylo.engine.runner import DecodeRunner  # noqa: E402
from hylo.ops import decode_attention as hylo_dattn  # noqa: E402
from hylo.profile.report import environment  # noqa: E402

# a GEMV's role in the kernel step follows from the kernel before it (hylo.engine.kernel_step's order)
_GEMV_AFTER = {"attn_out": "ffn_in", "attn": "o_proj", "combine": "o_proj", "o_proj": "ffn_in", "ffn_in": "ffn_out", "ffn_out": "qkv",
               "embed": "qkv"}


def roles(names: list[str]) -> list[str]:
    """A role per kernel of one kernel step, from the names in order; other kernels keep their (shortened) name.
    The last GEMV of the step is the LM head."""
    out, prev = [], "embed"
    last_gemv = max((i for i, n in enumerate(names) if "gemv" in n), default=-1)
    for i, n in enumerate(names):
        if "gemv" in n:
            r = "head" if i == last_gemv else _GEMV_AFTER.get(prev, "gemv")
        elif "_split_kernel" in n:
            r = "attn"
        elif "_attn_out_kernel" in n:
            r = "attn_out"
        elif "_combine_kernel" in n:
            r = "combine"
        elif "indexSelect" in n or "embedding" in n.lower() or "_embed_kernel" in n:
            r = "embed"
        elif "_finish_kernel" in n:
            r = "finish"
        else:
            r = n[:60]
        out.append(r)
        prev = r if r in _GEMV_AFTER or r in ("qkv", "head") else prev
    return out


def trace_kernels(fn, replays: int, cuda: bool) -> list[dict]:
    """Kernels (or CPU operators without CUDA) of ``replays`` calls of ``fn``, from the profiler's Chrome trace, in
    start order: ``{"name", "ts", "dur"}`` in microseconds."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(replays):
            fn()
        sync(torch.device("cuda" if cuda else "cpu"))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    want = ("kernel", "gpu_memcpy", "gpu_memset") if cuda else ("cpu_op",)
    ks = [{"name": e["name"], "ts": float(e["ts"]), "dur": float(e.get("dur", 0.0))} for e in events
          if e.get("ph") == "X" and e.get("cat") in want]
    return sorted(ks, key=lambda e: e["ts"])


def step_stats(ks: list[dict], replays: int) -> dict:
    """Per-step timeline figures (module doc) from the kernels of ``replays`` steps; medians over the steps."""
    if not ks or len(ks) % replays:
        return {"error": f"{len(ks)} kernels over {replays} steps: not one equal share per step"}
    k = len(ks) // replays
    steps = [ks[i * k:(i + 1) * k] for i in range(replays)]
    rl = roles([e["name"] for e in steps[0]])
    per: dict[str, list[float]] = {x: [] for x in ("span_ms", "busy_ms", "idle_ms", "overlap_ms", "sum_ms")}
    periods = [(steps[i + 1][0]["ts"] - steps[i][0]["ts"]) / 1e3 for i in range(replays - 1)]
    by_role: dict[str, dict[str, list[float]]] = {}
    for st in steps:
        start, end, busy, last = st[0]["ts"], st[0]["ts"], 0.0, st[0]["ts"]
        acc: dict[str, list[float]] = {}
        for e, r in zip(st, rl):
            s, f = e["ts"], e["ts"] + e["dur"]
            busy += max(0.0, f - max(s, last))  # union of intervals, in start order
            inc = max(0.0, f - last)
            last = max(last, f)
            a = acc.setdefault(r, [0, 0.0, 0.0])
            a[0] += 1
            a[1] += e["dur"]
            a[2] += inc
            end = max(end, f)
        total = sum(e["dur"] for e in st)
        for key, v in (("span_ms", end - start), ("busy_ms", busy), ("idle_ms", end - start - busy),
                       ("overlap_ms", total - busy), ("sum_ms", total)):
            per[key].append(v / 1e3)
        for r, (c, dur, inc) in acc.items():
            b = by_role.setdefault(r, {"calls": [], "dur_ms": [], "incr_ms": []})
            b["calls"].append(c)
            b["dur_ms"].append(dur / 1e3)
            b["incr_ms"].append(inc / 1e3)
    med = {key: round(statistics.median(v), 4) for key, v in per.items()}
    return {"kernels_per_step": k, "period_ms": round(statistics.median(periods), 4) if periods else None, **med,
            "by_role": {r: {"calls": b["calls"][0], "dur_ms": round(statistics.median(b["dur_ms"]), 4),
                            "incr_ms": round(statistics.median(b["incr_ms"]), 4)}
                        for r, b in sorted(by_role.items(), key=lambda kv: -statistics.median(kv[1]["incr_ms"]))}}


def time_and_trace(runner, start: int, steps: int, replays: int, dev) -> tuple[float, dict]:
    """A runner's wall-clock ms/token (``hylo_ms_per_token``: greedy steps from ``start``) and the timeline of
    ``replays`` more steps from the profiler's trace (:func:`step_stats`)."""
    ms = hylo_ms_per_token(runner, start, steps, 3, dev)
    runner.set_positions(start)
    holder = {"t": torch.zeros(1, dtype=torch.long, device=dev)}

    def one():
        holder["t"] = runner.step(holder["t"], greedy=True)
    one()
    sync(dev)
    return ms, step_stats(trace_kernels(one, replays, dev.type == "cuda"), replays)


def random_qwen3(shape: dict, dtype, dev):
    """A hylo model converted from a transformers ``Qwen3ForCausalLM`` of ``shape`` with random weights (seed 0)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    with torch.device(dev):
        tf = Qwen3ForCausalLM(Qwen3Config(**shape))
    return from_transformers(tf.to(dtype).eval(), dtype=dtype).to(dev).eval()


def parse_configs(spec: str) -> list[tuple[str, bool | str, dict[str, str], int | None, int | None]]:
    """``--configs`` -> ``(key, compile, switches, min_split, block)``: the Qwen3 benchmark's modes plus ``@S``
    or ``@S/B`` (the attention's ``MIN_SPLIT`` and ``BLOCK_SLOTS``)."""
    out = []
    for c in (c.strip() for c in spec.split(",")):
        if not c:
            continue
        mode, _, at = c.partition("@")
        split, _, block = at.partition("/")
        if (at and not split.isdigit()) or (block and (not block.isdigit() or int(block) < 16
                                                        or int(block) & (int(block) - 1))):
            raise SystemExit(f"--configs: {c!r}: after '@' give cache slots per split, optionally '/B' with B the "
                             "slots per block (a power of two >= 16)")
        (key, compile, switches), = parse_modes(mode)
        key += (f"_split{split}" if split else "") + (f"_block{block}" if block else "")
        out.append((key, compile, switches, int(split) if split else None, int(block) if block else None))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/decode-timeline.json")
    ap.add_argument("--configs", default="eager+kstep+nopdl,eager+kstep")
    ap.add_argument("--caches", type=int, nargs="+", default=[80, 2048], help="cache lengths (static) to time at")
    ap.add_argument("--start", type=int, default=16, help="position of the first timed step")
    ap.add_argument("--steps", type=int, default=64, help="greedy steps per timed pass")
    ap.add_argument("--replays", type=int, default=12, help="steps in the profiled trace")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, no graphs: checks the script")
    args = ap.parse_args()
    configs = parse_configs(args.configs)
    dev, dtype, shape, graphs = device_and_shape(args.smoke, "decode_timeline.py")
    if min(args.caches) < args.start + args.steps:
        sys.exit(f"--caches must all be at least --start + --steps = {args.start + args.steps}")
    env = environment(dev)
    res: dict = {"date": env["date"], "device": env["device"], "versions": env["versions"], "shape": shape,
                 "dtype": str(dtype).replace("torch.", ""), "batch": 1, "start": args.start, "steps": args.steps,
                 "replays": args.replays, "errors": [], "configs": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    hy = random_qwen3(shape, dtype, dev)
    default_split = hylo_dattn.MIN_SPLIT
    for key, compile, switches, split, block in configs:
        sw = mode_switches(switches)
        for L in args.caches:
            name = f"{key}_cache{L}"
            hylo_dattn.MIN_SPLIT = split or default_split
            hylo_dattn.BLOCK_SLOTS = block
            try:
                with switched(sw), torch.no_grad():
                    runner = DecodeRunner(hy, 1, L, cuda_graph=graphs, compile=compile)
                    rec = {"cache_len": L, "min_split": hylo_dattn.MIN_SPLIT, "block_slots": block,
                           "attn_splits": hylo_dattn.num_splits(L, hy.layers[0].mixer.num_kv_heads)
                           if hasattr(hy.layers[0].mixer, "num_kv_heads") else None,
                           "graphed": runner.graphed, "kernel_step": runner.kernel_step, "pdl": runner.pdl,
                           "gemv": runner.gemv, "switches": sw}
                    rec["ms_per_token"], rec["timeline"] = time_and_trace(runner, args.start, args.steps,
                                                                          args.replays, dev)
                    del runner
            except Exception as e:  # noqa: BLE001  (one config's failure must not lose the others)
                res["errors"].append({"what": name, "error": f"{type(e).__name__}: {e}"[:500],
                                      "trace": traceback.format_exc()[-1500:]})
                continue
            finally:
                hylo_dattn.MIN_SPLIT, hylo_dattn.BLOCK_SLOTS = default_split, None
            res["configs"][name] = rec
            tl = rec["timeline"]
            print(f"{name}: {rec['ms_per_token']:.3f} ms/token wall; GPU period {tl.get('period_ms')} ms, busy "
                  f"{tl.get('busy_ms')}, idle {tl.get('idle_ms')}, overlap {tl.get('overlap_ms')}", flush=True)
            out.write_text(json.dumps(res, indent=1))
    out.write_text(json.dumps(res, indent=1))
    print(f"→ {out}")


if __name__ == "__main__":
    main()
