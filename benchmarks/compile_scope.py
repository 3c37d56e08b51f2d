r"""How long ``DecodeRunner(compile=True)`` takes to compile, whole step against one block at a time
(``HYLO_COMPILE_SCOPE=step|block``), for a deep attention + FFN model; each scope in a fresh process (a cold
inductor cache of its own), with the first step's logits checked against an eager runner. One call:

    HYLO_COMMIT=$(git rev-parse HEAD) python benchmarks/compile_scope.py --layers 28 --out benchmarks/results/compile-scope-cpu.json

The model has Qwen3-0.6B's layer structure (28 x 'a f', qk-norm, GQA) at a tiny width: what compile time grows
with is the number of operations, not the width. On a CUDA machine add ``--device cuda`` (bf16, the GEMV on).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
from hylo import HybridLM
from hylo.presets import preset
from hylo.engine import DecodeRunner
from torch._dynamo.utils import counters
layers, dev = int(sys.argv[1]), sys.argv[2]
cfg = preset("qwen3-0.6b", vocab_size=512, hidden_size=64, attn_num_heads=4, attn_num_kv_heads=2, attn_head_dim=16,
             ffn_intermediate_size=128, layers=" ".join(["a f"] * layers))
torch.manual_seed(0)
m = HybridLM(cfg).to(dev).eval()
r = DecodeRunner(m, 1, 64, cuda_graph=False, compile=True)
e = DecodeRunner(m, 1, 64, cuda_graph=False)
tok = torch.tensor([1], device=dev)
with torch.no_grad():
    t = time.perf_counter()
    a = r.step(tok)
    if dev == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t
    b = e.step(tok)
print(json.dumps({"first_step_s": round(first, 2), "graphs": counters["stats"]["unique_graphs"],
                  "max_abs_diff_vs_eager": float((a.float() - b.float()).abs().max())}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=28, help="'a f' pairs")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from hylo.runinfo import versions

    res = {"kind": "compile-scope", "layers": args.layers, "device": args.device, "versions": versions(),
           "threads": os.cpu_count(), "scopes": {}}
    for scope in ("step", "block"):
        with tempfile.TemporaryDirectory() as cache:  # a cold inductor cache for each scope
            env = {**os.environ, "HYLO_COMPILE_SCOPE": scope, "TORCHINDUCTOR_CACHE_DIR": cache,
                   "PYTHONPATH": str(ROOT)}
            proc = subprocess.run([sys.executable, "-c", CHILD, str(args.layers), args.device], env=env,
                                  capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            res["scopes"][scope] = {"error": proc.stderr[-1500:]}
        else:
            res["scopes"][scope] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(scope, res["scopes"][scope], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
