"""One profile of one or more models: what ``hylo profile`` measures, in one JSON document.

Schema ``hylo.profile/1``::

    {"schema", "date", "environment": {"device": {"type", "name", "total_bytes"}, "versions": {..., "commit"}},
     "dtype", "options": {...}, "lut": path or null,
     "models": [{"name", "source", "config": {"pattern", "hidden_size", "vocab_size", "num_meta_tokens"},
                 "memory": {"weights_bytes", "parameters", "num_meta_tokens", "state_bytes_per_seq": {ctx: bytes},
                            "peak_bytes"},
                 "decode": [{"context", "batch", "ms_per_token", "tokens_per_s", ...}],
                 "generate": {"tokens", "batch", "seconds", "ms_per_token", "method", "points",
                              "seconds_if_cache_grew"} or null,
                 "prefill": [{"tokens", "batch", "chunk", "ms", "tokens_per_s"}],
                 "throughput": [{"context", "batch", "ms_per_step", "tokens_per_s", ...}],
                 "throughput_vs_batch": [{"context", "batch", "ms_per_step", "tokens_per_s"}],
                 "prediction": {...} (with a LUT: predicted values and relative errors),
                 "errors": [{"what", "error"}]}]}

A measurement that fails is recorded under ``errors`` (and left out of its list), not fatal.
"""

from __future__ import annotations

import datetime
import platform
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..runinfo import versions

PROFILE_SCHEMA = "hylo.profile/1"




def environment(device="cuda") -> dict:
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        d = {"type": "cuda", "name": props.name, "total_bytes": int(props.total_memory)}
    else:
        d = {"type": dev.type, "name": platform.processor() or platform.machine(), "total_bytes": None}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": d,
            "versions": versions()}


# ----------------------------------------------------------------------------- models
class ProfileError(RuntimeError):
    """A model spec that cannot be profiled (unknown preset, unreadable path, not a hylo model)."""


def model_config(spec: str):
    """The :class:`HyloConfig` of ``spec`` when it can be had without loading weights (a preset, a config.json, a
    hylo or Llama / Qwen model folder); None for checkpoints and run folders."""
    import json

    from ..config import HyloConfig
    from ..presets import PRESETS, preset

    if spec in PRESETS:
        return preset(spec)
    p = Path(spec)
    path = p / "config.json" if p.is_dir() else p
    if not (path.is_file() and path.suffix == ".json"):
        return None
    data = json.loads(path.read_text())
    mt = data.pop("model_type", "hylo")
    if mt == "hylo":
        return HyloConfig(**data)
    from ..convert import SUPPORTED, hylo_config

    if mt in SUPPORTED and p.is_dir():
        from transformers import AutoConfig

        return hylo_config(AutoConfig.from_pretrained(str(p)))
    return None


def open_model(spec: str, device, dtype: torch.dtype, seed: int = 0):
    """``(model, source)`` for a preset name, a config.json (random weights: latency does not depend on their
    values), a hylo model folder, run folder or checkpoint (``hylo.loading.load``), or a Llama / Qwen2 / Qwen3
    folder (imported with ``hylo.convert.from_transformers``)."""
    import json

    from ..config import HyloConfig
    from ..model import HybridLM
    from ..presets import PRESETS, preset

    cfg = None
    if spec in PRESETS:
        cfg, source = preset(spec), f"preset {spec} (random weights)"
    else:
        p = Path(spec)
        if p.is_file() and p.suffix == ".json":
            data = json.loads(p.read_text())
            data.pop("model_type", None)
            cfg, source = HyloConfig(**data), f"config {p} (random weights)"
        elif p.is_dir() and (p / "config.json").is_file() and not any(
                (p / f).exists() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")):
            data = json.loads((p / "config.json").read_text())
            if data.get("model_type", "hylo") == "hylo":
                data.pop("model_type", None)
                cfg, source = HyloConfig(**data), f"config {p / 'config.json'} (random weights)"
    if cfg is not None:
        torch.manual_seed(seed)
        try:
            with torch.device(device):
                model = HybridLM(cfg)
        except Exception:  # noqa: BLE001  (construction on the device failed: build on the CPU, then move)
            model = HybridLM(cfg)
        return model.to(device=device, dtype=dtype).eval(), source
    from ..loading import LoadError, load

    try:
        model, _ = load(spec, device=device, dtype=dtype)
    except LoadError as e:
        raise ProfileError(f"{spec!r} is not a preset ({', '.join(sorted(PRESETS))}), a config.json nor a model "
                           f"hylo can open: {e}") from None
    if not isinstance(model, HybridLM):
        from ..convert import SUPPORTED, from_transformers

        mt = getattr(model.config, "model_type", None)
        if mt not in SUPPORTED:
            raise ProfileError(f"{spec}: a {mt!r} model; hylo profile measures hylo models (Llama / Qwen2 / Qwen3 "
                               "are imported automatically)")
        model = from_transformers(model, dtype=dtype).to(device).eval()
        return model, f"{spec} ({mt}, imported)"
    return model, str(spec)


# ----------------------------------------------------------------------------- options and the run
@dataclass
class ProfileOptions:
    contexts: list = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384, 32768])
    generate_tokens: int = 8192  # 0: skip
    generate_direct: bool = False
    prefill: list = field(default_factory=lambda: [1024, 8192])
    prefill_chunk: int = 0
    throughput_contexts: list = field(default_factory=lambda: [8192, 32768])
    sweep_batches: list | None = None  # None: powers of 4 up to the max batch at the first throughput context
    max_batch: int = 1024
    margin: float = 0.9
    steps: int = 64
    throughput_steps: int = 16
    repeats: int = 3
    cuda_graph: bool | None = None


def _guard(errors: list, what: str, fn: Callable, log: Callable[[str], None] | None):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (one failing measurement is recorded, not fatal)
        msg = f"{type(e).__name__}: {e}"
        errors.append({"what": what, "error": msg[:500], "trace": traceback.format_exc()[-1500:]})
        if log:
            log(f"[red]failed[/]: {what}: {msg[:200]}")
    from .measure import cleanup  # after the except clause: the traceback no longer holds the failed tensors

    cleanup("cuda" if torch.cuda.is_available() else "cpu")
    return None


def profile_model(model, name: str, opts: ProfileOptions, source: str = "", lut=None,
                  log: Callable[[str], None] | None = None) -> dict:
    """Every measurement of ``opts`` on ``model`` (on its device), as one ``models[]`` record of the schema."""
    from . import measure as M

    dev = next(model.parameters()).device
    cfg = model.config
    errors: list = []
    rec: dict = {"name": name, "source": source,
                 "config": {"pattern": cfg.pattern_short, "hidden_size": cfg.hidden_size,
                            "vocab_size": cfg.vocab_size, "num_meta_tokens": cfg.num_meta_tokens,
                            "layers": len(cfg.layers)},
                 "decode": [], "generate": None, "prefill": [], "throughput": [], "throughput_vs_batch": [],
                 "errors": errors}
    say = log or (lambda s: None)
    all_ctx = sorted(set(opts.contexts) | set(opts.throughput_contexts)
                     | ({opts.generate_tokens} if opts.generate_tokens else set()))
    rec["memory"] = M.memory_summary(model, all_ctx)
    if M.is_cuda(dev):
        torch.cuda.reset_peak_memory_stats(dev)
    for c in opts.contexts:
        r = _guard(errors, f"decode at context {c}", lambda c=c: M.decode_latency(
            model, c, 1, opts.steps, opts.repeats, opts.cuda_graph), log)
        if r:
            rec["decode"].append(r)
            say(f"{name}: decode @ {c}: {r['ms_per_token']:.3f} ms/token")
    if opts.generate_tokens:
        r = _guard(errors, f"generate {opts.generate_tokens} tokens", lambda: M.generate_time(
            model, opts.generate_tokens, 1, opts.steps, opts.repeats, 3, opts.generate_direct, opts.cuda_graph), log)
        if r:
            curve = [(d["context"], d["ms_per_token"]) for d in rec["decode"] if d["context"] <= opts.generate_tokens]
            if curve:  # an engine whose cache length followed the context (Nemotron-Flash's dynamic cache)
                from .predict import integrate_steps

                r["seconds_if_cache_grew"] = integrate_steps(curve, opts.generate_tokens) / 1e3
            rec["generate"] = r
            say(f"{name}: {opts.generate_tokens} tokens in {r['seconds']:.2f} s")
    for n in opts.prefill:
        r = _guard(errors, f"prefill {n} tokens", lambda n=n: M.prefill_latency(
            model, n, 1, opts.prefill_chunk, opts.repeats), log)
        if r:
            rec["prefill"].append(r)
            say(f"{name}: prefill {n}: {r['ms']:.1f} ms")
    for c in opts.throughput_contexts:
        r = _guard(errors, f"throughput at context {c}", lambda c=c: M.throughput(
            model, c, None, opts.throughput_steps, opts.repeats, opts.margin, opts.max_batch, opts.cuda_graph), log)
        if r and "error" in r:
            errors.append({"what": f"throughput at context {c}", "error": r["error"]})
        elif r:
            rec["throughput"].append(r)
            say(f"{name}: throughput @ {c}: batch {r['batch']}, {r['tokens_per_s']:,.0f} tok/s")
    if rec["throughput"] and (opts.sweep_batches is None or opts.sweep_batches):
        top = rec["throughput"][0]
        if opts.sweep_batches is None:
            bs, b = [], 1
            while b < top["batch"]:
                bs.append(b)
                b *= 4
        else:
            bs = [b for b in opts.sweep_batches if b < top["batch"]]
        for b in bs:
            r = _guard(errors, f"throughput at context {top['context']}, batch {b}", lambda b=b: M.throughput(
                model, top["context"], b, opts.throughput_steps, opts.repeats, opts.margin, opts.max_batch,
                opts.cuda_graph), log)
            if r and "error" not in r:
                rec["throughput_vs_batch"].append(r)
        rec["throughput_vs_batch"].append(top)
    if M.is_cuda(dev):  # each measurement resets the peak counter: keep the largest of their peaks
        peaks = [r.get("peak_bytes") or 0 for k in ("decode", "throughput", "throughput_vs_batch") for r in rec[k]]
        rec["memory"]["peak_bytes"] = int(max(peaks + [torch.cuda.max_memory_allocated(dev)]))
    else:
        rec["memory"]["peak_bytes"] = None
    if lut is not None:
        rec["prediction"] = _guard(errors, "prediction", lambda: compare(cfg, lut, rec), log)
    return rec


def _err(pred: float, meas: float) -> float:
    return (pred - meas) / meas


def compare(cfg, lut, rec: dict) -> dict:
    """The predictor's values for what ``rec`` measured, with relative errors ``(predicted - measured) /
    measured``."""
    from .predict import predict_decode, predict_generate, predict_max_batch, predict_throughput

    out: dict = {"decode": [], "throughput": [], "throughput_vs_batch": []}
    for d in rec["decode"]:
        p = predict_decode(cfg, lut, d["context"], d["batch"])
        out["decode"].append({"context": d["context"], "batch": d["batch"], "ms_per_token": p.ms_per_token,
                              "measured": d["ms_per_token"], "rel_error": _err(p.ms_per_token, d["ms_per_token"]),
                              "by_op": p.by_op, "scaled": p.scaled, "extrapolated": p.extrapolated})
    g = rec.get("generate")
    if g:
        p = predict_generate(cfg, lut, g["tokens"], g["batch"], cache="static")
        out["generate"] = {**p, "measured": g["seconds"], "rel_error": _err(p["seconds"], g["seconds"])}
    for key in ("throughput", "throughput_vs_batch"):
        for t in rec[key]:
            p = predict_throughput(cfg, lut, t["context"], batch=t["batch"])
            item = {"context": t["context"], "batch": t["batch"], "tokens_per_s": p["tokens_per_s"],
                    "measured": t["tokens_per_s"], "rel_error": _err(p["tokens_per_s"], t["tokens_per_s"])}
            if key == "throughput" and lut.meta.get("free_bytes"):
                mb = predict_max_batch(cfg, lut, t["context"], margin=t.get("margin", 0.9), cap=t.get("cap"))
                item["max_batch"] = {"predicted": mb["batch"], "measured": t.get("max_batch_estimate"),
                                     "predicted_per_seq_bytes": mb["per_seq_bytes"],
                                     "measured_per_row_bytes": t.get("per_row_bytes")}
            out[key].append(item)
    return out


def profile_document(models: list, opts: ProfileOptions, device, dtype: torch.dtype, lut_path=None) -> dict:
    env = environment(device)
    return {"schema": PROFILE_SCHEMA, "date": env["date"],
            "environment": {"device": env["device"], "versions": env["versions"]},
            "dtype": str(dtype).replace("torch.", ""), "options": asdict(opts),
            "lut": str(lut_path) if lut_path else None, "models": models}


def check_profile(doc: dict) -> None:
    """Raise ValueError when ``doc`` does not follow the ``hylo.profile/1`` schema (keys and types)."""
    def need(d, keys, where):
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"{where}: missing {missing}")

    need(doc, ["schema", "date", "environment", "dtype", "options", "models"], "profile")
    if doc["schema"] != PROFILE_SCHEMA:
        raise ValueError(f"profile: schema {doc['schema']!r}, expected {PROFILE_SCHEMA!r}")
    need(doc["environment"], ["device", "versions"], "environment")
    need(doc["environment"]["versions"], ["torch", "commit"], "environment.versions")
    if not isinstance(doc["models"], list):
        raise ValueError("profile: models must be a list")
    for i, m in enumerate(doc["models"]):
        w = f"models[{i}]"
        need(m, ["name", "config", "memory", "decode", "generate", "prefill", "throughput", "throughput_vs_batch",
                 "errors"], w)
        need(m["memory"], ["weights_bytes", "state_bytes_per_seq", "peak_bytes"], f"{w}.memory")
        for d in m["decode"]:
            need(d, ["context", "batch", "ms_per_token", "tokens_per_s"], f"{w}.decode[]")
        if m["generate"] is not None:
            need(m["generate"], ["tokens", "batch", "seconds", "method"], f"{w}.generate")
        for d in m["prefill"]:
            need(d, ["tokens", "ms"], f"{w}.prefill[]")
        for d in m["throughput"] + m["throughput_vs_batch"]:
            need(d, ["context", "batch", "ms_per_step", "tokens_per_s"], f"{w}.throughput[]")
        for key in ("decode", "prefill", "throughput"):
            for d in m[key]:
                for k, v in d.items():
                    if k in ("ms_per_token", "ms", "ms_per_step", "tokens_per_s") and not (
                            isinstance(v, (int, float)) and v > 0):
                        raise ValueError(f"{w}.{key}[].{k} = {v!r}: expected a number > 0")
