r"""The kernel step's attention with its output projection in one kernel (``HYLO_STEP_ATTN_OUT``,
``hylo.ops.decode_attn_out``) against the chain of kernels it replaces: checked and timed in one process.

For a Qwen3-0.6B-shaped model (random weights, bf16, batch 1) at each ``--caches`` length: the default kernel step
(split attention, combine, output GEMV), then each ``--variants`` entry: ``ao:BLOCK/TILE/WARPS`` the fused kernel
(slots per block, weights per tile, warps; ``HYLO_STEP_ATTN_OUT=fused``; ``/p`` after it: the first block of the
cache loaded before the PDL wait, ``HYLO_ATTN_OUT_PREKV``), ``split`` the split attention whose
partials the projection's kernel merges (``HYLO_STEP_ATTN_OUT=split``), ``ffn`` the FFN's down projection split
over K into a float32 sum (``HYLO_STEP_FFN_SPLIT``), ``noglu`` SwiGLU in the down projection
(``HYLO_STEP_GLU=down``; every other entry, the chain's too, has it in the gate/up GEMV), ``+``-joined. Per entry:

- check: ``--check-steps`` steps fed the same tokens from position 0, logits against the chain's (max abs
  difference, and whether the argmax agrees at every step), and greedy decoding from the same start (the steps
  until the first differing token: bf16 summation orders differ, so an eventual divergence is expected);
- time: wall-clock ms/token (median of passes of ``--steps`` greedy steps from ``--start``, graph replay + argmax,
  as ``qwen3_vs_transformers.py``), and the profiler's timeline (``decode_timeline.step_stats``: per-role time);
  with ``--more-starts``, ms/token from each of those positions too (for where the fused kernel stops gaining:
  run with ``HYLO_STEP_FUSED_MAX_POS`` above them, or the runner leaves it there).

    HYLO_COMMIT=$(git rev-parse HEAD) python benchmarks/attn_out_check.py --caches 80 2048 \
        --out benchmarks/results/attn-out-h100.json

``--smoke`` runs the tiny shape on the CPU under Triton's interpreter, without graphs (a check of the script).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from decode_timeline import random_qwen3, time_and_trace  # noqa: E402
from qwen3_vs_transformers import device_and_shape, hylo_ms_per_token, switched  # noqa: E402

from hylo.engine.runner import DecodeRunner  # noqa: E402
from hylo.ops import decode_attn_out as dao  # noqa: E402
from hylo.profile.report import environment  # noqa: E402

ON = {"HYLO_KERNEL_STEP": "on", "HYLO_GEMV": "on"}


def parse_variants(spec: str) -> list[tuple[str, tuple | None, bool, bool, bool, bool]]:
    """``--variants`` -> ``(name, (block, tile, warps, pre_kv) of the fused attention or None, FFN split, split
    attention's sum, PyTorch's first and last kernels, SwiGLU in the gate/up GEMV)`` per entry: ``+``-joined ``ao``
    (``HYLO_STEP_ATTN_OUT=fused`` at the module's defaults), ``ao:BLOCK/TILE/WARPS[/p]``, ``split``
    (``HYLO_STEP_ATTN_OUT=split``), ``ffn`` (``HYLO_STEP_FFN_SPLIT=on``) and ``torchio`` (``HYLO_STEP_IO=torch``:
    the step's embedding, zeroing, position increment and the greedy argmax as PyTorch kernels), ``noglu``
    (``HYLO_STEP_GLU=down``: SwiGLU in the down projection's prologue instead of the gate/up GEMV's epilogue)."""
    out = []
    for v in (v.strip() for v in spec.split(",") if v.strip()):
        ao, ffn, split, tio, glu = None, False, False, False, True
        for part in v.split("+"):
            if part == "ffn":
                ffn = True
            elif part == "noglu":
                glu = False
            elif part == "torchio":
                tio = True
            elif part == "split":
                split = True
            elif part == "ao":
                ao = (dao.BLOCK, dao.TILE_ELEMS, dao.WARPS, dao.PRE_KV)
            elif part.startswith("ao:"):
                fields = part[3:].split("/")
                pre = fields[-1] == "p"
                try:
                    block, tile, warps = (int(x) for x in fields[:3])
                    if len(fields) != 3 + pre:
                        raise ValueError
                except ValueError:
                    raise SystemExit(f"--variants: {part!r} is not ao:BLOCK/TILE/WARPS[/p] (e.g. ao:64/8192/4/p)") \
                        from None
                ao = (block, tile, warps, pre)
                if block < 16 or block & (block - 1) or tile & (tile - 1) or warps not in (1, 2, 4, 8, 16):
                    raise SystemExit(f"--variants: {part!r}: BLOCK and TILE powers of two (BLOCK >= 16), WARPS 1..16")
            else:
                raise SystemExit(f"--variants: unknown part {part!r} in {v!r} "
                                 "(ao, ao:B/T/W[/p], split, ffn, torchio, noglu)")
        if ao and split:
            raise SystemExit(f"--variants: {v!r}: ao (fused) and split are two ways of one thing; pick one")
        name = "+".join(([f"ao_{ao[0]}_{ao[1]}_{ao[2]}" + ("_p" if ao[3] else "")] if ao else [])
                        + (["split"] if split else []) + (["ffn"] if ffn else []) + (["torchio"] if tio else [])
                        + ([] if glu else ["noglu"]))
        out.append((name, ao, ffn, split, tio, glu))
    return out


def logits_run(runner, tokens: list[int], dev) -> list[torch.Tensor]:
    runner.set_positions(0)
    return [runner.step(torch.tensor([t], device=dev)).float().clone() for t in tokens]


def greedy(runner, n: int, dev) -> list[int]:
    runner.set_positions(0)
    t, out = torch.zeros(1, dtype=torch.long, device=dev), []
    for _ in range(n):
        t = runner.step(t, greedy=True)
        out.append(int(t))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/attn-out.json")
    ap.add_argument("--caches", type=int, nargs="+", default=[80, 2048])
    ap.add_argument("--variants", default="ffn,split+ffn,ao:64/16384/4+ffn")
    ap.add_argument("--start", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--more-starts", type=int, nargs="*", default=[],
                    help="more positions to time --steps steps from (no timeline)")
    ap.add_argument("--check-steps", type=int, default=16)
    ap.add_argument("--greedy-steps", type=int, default=64)
    ap.add_argument("--replays", type=int, default=12)
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (interpreter, no graphs)")
    args = ap.parse_args()
    variants = parse_variants(args.variants)
    dev, dtype, shape, graphs = device_and_shape(args.smoke, "attn_out_check.py")
    if args.smoke:  # the interpreter: few, short steps
        args.caches, args.steps, args.check_steps, args.greedy_steps, args.replays = [24], 2, 3, 4, 2
        args.start = 4
        args.more_starts = args.more_starts and [8]
    if any(p + args.steps > min(args.caches) for p in [args.start, *args.more_starts]):
        sys.exit("every start + --steps must fit in the smallest --caches length")
    env = environment(dev)
    res: dict = {"date": env["date"], "device": env["device"], "versions": env["versions"],
                 "commit": os.environ.get("HYLO_COMMIT", "unknown"), "shape": shape,
                 "dtype": str(dtype).replace("torch.", ""), "batch": 1, "start": args.start, "steps": args.steps,
                 "errors": [], "results": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    hy = random_qwen3(shape, dtype, dev)
    g = torch.Generator().manual_seed(1)
    feed = torch.randint(0, shape["vocab_size"], (args.check_steps,), generator=g).tolist()
    saved = dao.BLOCK, dao.TILE_ELEMS, dao.WARPS, dao.PRE_KV
    for L in args.caches:
        base = None
        for name, var, ffn, split, tio, glu in [("chain", None, False, False, False, True)] + variants:
            key = f"{name}_cache{L}"
            try:
                if var:
                    dao.BLOCK, dao.TILE_ELEMS, dao.WARPS, dao.PRE_KV = var
                sw = {**ON, "HYLO_STEP_ATTN_OUT": "fused" if var else "split" if split else "off",
                      "HYLO_STEP_FFN_SPLIT": "on" if ffn else "off", "HYLO_STEP_IO": "torch" if tio else "kernels",
                      "HYLO_STEP_GLU": "up" if glu else "down"}
                with switched(sw), torch.no_grad():
                    runner = DecodeRunner(hy, 1, L, cuda_graph=graphs)
                    ws = runner.sums_ws
                    rec = {"cache_len": L, "attn_out": dict(zip(("block", "tile", "warps", "pre_kv"), var)) if var
                           else None,
                           "switches": sw, "kernel_step": runner.kernel_step,
                           "sums": {"attn": ws["attn"], "ffn": ws["ffn"]} if ws else None,
                           "pdl": runner.pdl, "graphed": runner.graphed, "glu_up": runner.glu_up}
                    lg = logits_run(runner, feed, dev)
                    gr = greedy(runner, args.greedy_steps, dev)
                    if base is None:
                        base = (lg, gr)
                    else:
                        rec["check"] = {
                            "max_abs_logit_diff": max(float((a - b).abs().max()) for a, b in zip(lg, base[0])),
                            "argmax_agrees": all(bool(a.argmax() == b.argmax()) for a, b in zip(lg, base[0])),
                            "greedy_same_steps": next((i for i, (a, b) in enumerate(zip(gr, base[1])) if a != b),
                                                      len(gr))}
                    rec["ms_per_token"], rec["timeline"] = time_and_trace(runner, args.start, args.steps,
                                                                          args.replays, dev)
                    if args.more_starts:
                        rec["ms_per_token_from"] = {str(p): hylo_ms_per_token(runner, p, args.steps, 3, dev)
                                                    for p in args.more_starts}
                    del runner
            except Exception as e:  # noqa: BLE001  (one entry's failure must not lose the others)
                res["errors"].append({"what": key, "error": f"{type(e).__name__}: {e}"[:500],
                                      "trace": traceback.format_exc()[-1500:]})
                print(f"{key}: {type(e).__name__}: {e}"[:300], flush=True)
                continue
            finally:
                dao.BLOCK, dao.TILE_ELEMS, dao.WARPS, dao.PRE_KV = saved
            res["results"][key] = rec
            tl = rec["timeline"]
            roles = {r: v["incr_ms"] for r, v in list(tl.get("by_role", {}).items())[:7]}
            more = {p: round(v, 3) for p, v in rec.get("ms_per_token_from", {}).items()}
            print(f"{key}: {rec['ms_per_token']:.3f} ms/token; check {rec.get('check')}; GPU period "
                  f"{tl.get('period_ms')}; {roles}", flush=True)
            if more:
                print(f"{key}: ms/token from positions {more}", flush=True)
            out.write_text(json.dumps(res, indent=1))
    out.write_text(json.dumps(res, indent=1))
    print(f"→ {out}")


if __name__ == "__main__":
    main()
