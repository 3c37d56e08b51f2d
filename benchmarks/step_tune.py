r"""The kernel step's preloading GEMV configs (tile of outputs ``BN``, warps) chosen by timing the whole step.

Why: Triton's autotuner times each config of a product alone, where what makes the kernel step fast -- each GEMV
loading its weights into registers before its PDL wait, while the kernel before it runs -- gains nothing, and how
much of the next kernel fits beside the running one depends on both kernels' registers. Its picks also vary from
process to process (the same step took 0.674-0.734 ms/token in calls minutes apart on one H100, while in one
process interleaved passes agree to within 0.5%: ``benchmarks/results/qwen3-vs-transformers-h100-run19.json``).
Measured: 0.583 against the autotuner's 0.643 ms/token (``step-tune-h100.json``); on a second H100 the shipped
table 0.582, that machine's own tune 0.591, the autotuner's 0.632 (``step-tune-h100-run2.json``).

What it does, for the Qwen3-0.6B shape (random weights) or ``--model`` (any model that takes the kernel step: a
preset, config or checkpoint as ``hylo profile`` takes them), bf16, batch 1, an 80-slot cache, the kernel step with
the switches it runs under (e.g. ``HYLO_STEP_GLU``): times the step with the autotuner's picks
(``HYLO_GEMV_CONFIGS=autotune``), then coordinate descent over the step's products (q/k/v, gate/up, down; one role
per distinct shape): for each, every ``BN`` x warps whose tile fits ``PRELOAD_ELEMS`` is timed in the step (a
runner built and captured per config: ms/token of greedy steps from ``--start``, median of ``--passes``), the
fastest kept, for ``--sweeps`` sweeps; then the autotuned and the tuned step (and the device's shipped table,
``hylo/ops/gemv_configs``, where there is one) side by side in ``--rounds`` interleaved rounds. The result's
``pre_configs`` is the value for ``HYLO_GEMV_PRE_CONFIGS`` (``hylo.ops.gemv.PRE_CONFIGS``), or the ``configs`` of a
device table (``--save-table`` adds it there). Saved after every timing.

    HYLO_COMMIT=$(git rev-parse HEAD) python benchmarks/step_tune.py --out benchmarks/results/step-tune-h100.json

``--smoke`` runs the tiny shape on the CPU under Triton's interpreter, without graphs (a check of the script).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("HYLO_GEMV", "on")  # the kernel step is built on it ("auto" takes it on CUDA only)

from decode_timeline import random_qwen3  # noqa: E402
from qwen3_vs_transformers import device_and_shape, hylo_ms_per_token, side_by_side  # noqa: E402

from hylo.engine import kernel_step  # noqa: E402
from hylo.engine.runner import DecodeRunner  # noqa: E402
from hylo.layers.attention import Attention  # noqa: E402
from hylo.layers.ffn import SwiGLU  # noqa: E402
from hylo.ops import gemv as G  # noqa: E402
from hylo.ops.backend import triton_interpreting  # noqa: E402
from hylo.profile.report import environment, open_model  # noqa: E402

WARPS = (4, 8, 16)


def products(model, glu: bool) -> dict[str, tuple[int, int, bool]]:
    """The step's preloading products by role, ``(N, K, glu)`` as :data:`hylo.ops.gemv.PRE_CONFIGS` keys them:
    each attention block's q/k/v product, each FFN's gate/up and down (the fused attention's output projection is
    not a GEMV; the LM head takes the plain kernel); a role per distinct shape (``qkv``, ``qkv_2``, ...)."""
    out: dict[str, tuple[int, int, bool]] = {}

    def add(role, key):
        if key not in out.values() and G.preload_fits(key[1]):
            n = sum(r == role or r.startswith(role + "_") for r in out)
            out[role if n == 0 else f"{role}_{n + 1}"] = key
    for block in model.layers:
        m = block.mixer
        if isinstance(m, Attention):
            add("qkv", tuple(m.qkv_proj.weight.shape) + (False,))
        elif isinstance(m, SwiGLU):
            n2, k = m.gate_up_proj.weight.shape
            add("gate_up", (n2 // 2, k, True) if glu else (n2, k, False))
            add("down", tuple(m.down_proj.weight.shape) + (False,))
    return out


def candidates(key: tuple[int, int, bool]) -> list[tuple[int, int]]:
    """Every (BN, warps) whose tile of whole rows (K padded to a power of two) fits ``PRELOAD_ELEMS``."""
    n, k, glu = key
    per_out = (1 << (k - 1).bit_length()) * (2 if glu else 1)
    bns = [1 << p for p in range(6) if (1 << p) * per_out <= max(G.PRELOAD_ELEMS, per_out) and (1 << p) <= n]
    return [(bn, w) for bn in bns for w in WARPS]


def autotuned(keys: dict[str, tuple[int, int, bool]]) -> dict[str, tuple[int, int] | None]:
    """The autotuner's picks for the roles' products (M = 1, one chunk), or None where it has none."""
    if triton_interpreting():
        return {r: None for r in keys}
    cache = getattr(G._jit_pre(False, True), "cache", {})
    named = [dict(zip(G.PRE_TUNE_KEY, key)) for key in cache]  # the key's named values (dtypes follow them)
    out = {}
    for role, (n, k, glu) in keys.items():
        hits = [c for key, c in zip(named, cache.values())
                if (key["M"], key["N"], key["K"], key["S"], key["GLU"]) == (1, n, k, 1, glu)]
        out[role] = (hits[0].kwargs["BN"], hits[0].num_warps) if hits else None
    return out


def spec(cfgs: dict[tuple[int, int, bool], tuple[int, int]]) -> str:
    """``HYLO_GEMV_PRE_CONFIGS``'s value for ``cfgs``."""
    return ",".join(f"{n}x{k}{'g' if glu else ''}={bn}/{w}" for (n, k, glu), (bn, w) in sorted(cfgs.items()))


def save_table(device_name: str, res: dict, overwrite: bool) -> str | None:
    """Add ``res``'s tuned configs to the table of ``device_name`` (:func:`hylo.ops.gemv.device_configs` reads it;
    created where there is none): products the table already holds keep their entry unless ``overwrite``. The path
    written, or None where nothing changed."""
    path = G.CONFIG_DIR / (device_name.replace(" ", "_").replace("/", "_") + ".json")
    old = G.parse_pre_configs(json.loads(path.read_text())["configs"]) if path.is_file() else {}
    tuned = G.parse_pre_configs(res["pre_configs"])
    table = {**old, **tuned} if overwrite else {**tuned, **old}
    if table == old:
        print(f"{path} holds these products already: kept (--overwrite replaces their entries)", flush=True)
        return None
    res = {**res, "pre_configs": spec(table)}
    about = (f"The preloading GEMV's (BN outputs per program, warps) per product NxK (g: SwiGLU's gate/up, N outputs "
             f"of 2N rows), timed in the kernel step of {res['shape'].get('model', 'the Qwen3-0.6B shape')} by "
             f"benchmarks/step_tune.py on "
             f"{device_name}, {res['date']}, commit {res['commit']}")
    path.write_text(json.dumps({"about": about, "configs": res["pre_configs"]}, indent=1) + "\n")
    G.device_configs.cache_clear()
    print(f"→ {path}", flush=True)
    return str(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/step-tune.json")
    ap.add_argument("--model", default="",
                    help="a model of attention and FFN blocks to tune for: a preset, config.json, model folder or "
                         "checkpoint (hylo profile's forms; random weights for configs); default: Qwen3-0.6B's shape")
    ap.add_argument("--start", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--passes", type=int, default=2, help="timed passes per config (median), after a warm-up pass")
    ap.add_argument("--sweeps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds of autotuned against tuned at the end")
    ap.add_argument("--wall-limit", type=float, default=0, help="stop descending after this many seconds (0: none)")
    ap.add_argument("--max-candidates", type=int, default=0, help="per product and sweep (0: all)")
    ap.add_argument("--save-table", action="store_true",
                    help="add the tuned configs to this device's table (hylo/ops/gemv_configs/<device>.json), "
                         "which the engine then takes by default; products it holds keep their entries unless "
                         "--overwrite")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (interpreter, no graphs)")
    args = ap.parse_args()
    dev, dtype, shape, graphs = device_and_shape(args.smoke, "step_tune.py")
    if args.smoke:
        args.start, args.steps, args.passes, args.sweeps, args.rounds, args.max_candidates = 2, 2, 1, 1, 2, 1
    t_start = time.monotonic()
    env = environment(dev)
    if args.model:
        hy, source = open_model(args.model, dev, dtype)
        hy.eval()
        shape = {"model": args.model, "source": source, "config": hy.config.to_diff_dict()}
    else:
        hy = random_qwen3(shape, dtype, dev)
    glu = kernel_step.glu_up(hy)
    keys = products(hy, glu)
    cache_len = args.start + args.steps
    res: dict = {"date": env["date"], "device": env["device"], "versions": env["versions"],
                 "commit": os.environ.get("HYLO_COMMIT", "unknown"), "shape": shape,
                 "dtype": str(dtype).replace("torch.", ""), "batch": 1, "cache_len": cache_len, "start": args.start,
                 "steps": args.steps, "glu_up": glu, "products": {r: list(k) for r, k in keys.items()},
                 "errors": [], "timings": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(res, indent=1))

    def build(cfgs, mode: str = "autotune"):
        G.PRE_CONFIGS.clear()
        G.PRE_CONFIGS.update(cfgs)
        with G.gemv_configs_mode(mode):  # "autotune": the autotuner where cfgs says nothing; "table": the device's
            runner = DecodeRunner(hy, 1, cache_len, cuda_graph=graphs)
        if not runner.kernel_step:
            sys.exit("the kernel step does not apply here (HYLO_KERNEL_STEP, HYLO_GEMV): nothing to tune")
        return runner

    def time_cfgs(cfgs, what: str) -> float | None:
        try:
            with torch.no_grad():
                runner = build(cfgs)
                ms = hylo_ms_per_token(runner, args.start, args.steps, args.passes, dev)
            del runner
        except Exception as e:  # noqa: BLE001  (one config's failure, e.g. out of resources, must not end the run)
            res["errors"].append({"what": what, "error": f"{type(e).__name__}: {e}"[:400],
                                  "trace": traceback.format_exc()[-1200:]})
            return None
        res["timings"].append({"what": what, "configs": spec(cfgs), "ms_per_token": ms})
        print(f"{what}: {ms:.4f} ms/token  [{spec(cfgs)}]", flush=True)
        save()
        return ms

    saved = dict(G.PRE_CONFIGS)
    try:
        base_ms = time_cfgs({}, "autotuned")
        picks = autotuned(keys)
        res["autotuned"] = {r: list(p) if p else None for r, p in picks.items()}
        cur = {keys[r]: (p or candidates(keys[r])[-1]) for r, p in picks.items()}
        best = time_cfgs(cur, "start")
        for sweep in range(args.sweeps):
            changed = False
            for role, key in keys.items():
                for cand in candidates(key)[:args.max_candidates or None]:
                    if cand == cur[key] or (args.wall_limit and time.monotonic() - t_start > args.wall_limit):
                        continue
                    ms = time_cfgs({**cur, key: cand}, f"sweep {sweep} {role} {cand[0]}/{cand[1]}")
                    if ms is not None and (best is None or ms < best):
                        best, cur, changed = ms, {**cur, key: cand}, True
            if not changed:
                break
        res["pre_configs"] = spec(cur)
        res["tuned"] = {r: list(cur[k]) for r, k in keys.items()}
        if args.save_table and dev.type == "cuda":
            res["saved_table"] = save_table(torch.cuda.get_device_name(dev), res, args.overwrite)
        save()
        # side by side: the autotuner's picks, the tuned configs and the device's shipped table (hylo/ops/gemv_configs,
        # where it has one), alternating order each round
        runners = {"autotuned": build({}), "tuned": build(cur)}
        table = {k: G.device_configs(torch.cuda.get_device_name(dev)).get(k) for k in keys.values()} \
            if dev.type == "cuda" else {}
        res["device_table"] = spec({k: v for k, v in table.items() if v})
        if any(table.values()):
            runners["table"] = build({}, "table")
        rounds = side_by_side(runners, args.start, args.steps, args.rounds, dev)
        res["rounds"] = rounds
        res["ms_per_token"] = {k: statistics.median(v) for k, v in rounds.items()}
        res["autotuned_first_ms"] = base_ms
        print(f"interleaved medians: {res['ms_per_token']}; HYLO_GEMV_PRE_CONFIGS={res['pre_configs']}", flush=True)
    finally:
        G.PRE_CONFIGS.clear()
        G.PRE_CONFIGS.update(saved)
        save()
    print(f"→ {out}")


if __name__ == "__main__":
    main()
