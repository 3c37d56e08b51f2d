"""`hylo profile MODEL [MODEL ...]`: decode / prefill latency, throughput at the largest batch, memory; optionally
a per-operator LUT (``--lut-out``) and the predictor's error against the measurements (``--lut``).

Register with ``app.command("profile")(profile_command)`` in hylo.cli. Writes ``OUT/profile.json`` (schema in
:mod:`hylo.profile.report`) and PNG plots next to it; prints rich tables. Needs a CUDA device unless
``--device cpu`` is given explicitly (CPU latencies say nothing about a GPU: that mode exists to test the flow)
or ``--predict-only`` (the predictor alone, from a LUT, on any machine).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

DEFAULT_CONTEXTS = "1024,2048,4096,8192,16384,32768"
DEFAULT_LUT_BATCHES = "1,2,4,8,16,32,64,128,256,512,1024"


def _ints(text: str, name: str, allow_empty: bool = True) -> list[int]:
    items = [t for t in text.replace(" ", "").split(",") if t]
    try:
        vals = [int(t) for t in items]
    except ValueError:
        raise typer.BadParameter(f"{name} takes comma-separated integers (e.g. 1024,8192), got {text!r}") from None
    if any(v < 1 for v in vals) or (not vals and not allow_empty):
        raise typer.BadParameter(f"{name} takes integers >= 1, got {text!r}")
    return vals


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _tables(doc: dict, console: Console) -> None:
    models = doc["models"]
    ctxs = sorted({d["context"] for m in models for d in m["decode"]})
    if ctxs:
        t = Table(title="decode latency, batch 1, ms/token (predictor error)")
        t.add_column("model")
        for c in ctxs:
            t.add_column(f"{c}", justify="right")
        for m in models:
            meas = {d["context"]: d["ms_per_token"] for d in m["decode"]}
            pred = {d["context"]: d["rel_error"] for d in (m.get("prediction") or {}).get("decode", [])}
            t.add_row(m["name"], *[("-" if c not in meas else f"{meas[c]:.3f}" +
                                    (f" ({_pct(pred[c])})" if c in pred else "")) for c in ctxs])
        console.print(t)
    t = Table(title="summary")
    for col in ("model", "params", "weights", "state/seq", "generate", "prefill", "throughput", "peak mem"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for m in models:
        mem = m["memory"]
        st = mem["state_bytes_per_seq"]
        top = max(st, key=int) if st else None
        g = m.get("generate")
        gen = "-" if not g else f"{g['tokens']} tok: {g['seconds']:.2f} s"
        pre = ", ".join(f"{p['tokens']}: {p['ms']:.0f} ms" for p in m["prefill"]) or "-"
        thr = ", ".join(f"@{r['context']}: B={r['batch']} {r['tokens_per_s']:,.0f} tok/s" for r in m["throughput"])
        n = mem["parameters"]
        t.add_row(m["name"], f"{n / 1e6:,.0f}M" if n >= 10**7 else f"{n:,}", _gib(mem["weights_bytes"]),
                  f"{_gib(st[top])} @ {top}" if top else "-", gen, pre, thr or "-", _gib(mem.get("peak_bytes")))
    console.print(t)
    rows = []
    for m in models:
        pr = m.get("prediction") or {}
        if pr.get("generate"):
            g = pr["generate"]
            rows.append((m["name"], f"{g['tokens']} tokens, s", g["measured"], g["seconds"], g["rel_error"]))
        for r in pr.get("throughput", []):
            rows.append((m["name"], f"tok/s @ {r['context']}, B={r['batch']}", r["measured"], r["tokens_per_s"],
                         r["rel_error"]))
            mb = r.get("max_batch")
            if mb and mb.get("measured"):
                rows.append((m["name"], f"max batch @ {r['context']}", mb["measured"], mb["predicted"],
                             (mb["predicted"] - mb["measured"]) / mb["measured"]))
    if rows:
        t = Table(title="predictor (LUT) against measurement")
        for col in ("model", "quantity", "measured", "predicted", "error"):
            t.add_column(col, justify="left" if col in ("model", "quantity") else "right")
        for name, q, meas, pred, err in rows:
            t.add_row(name, q, f"{meas:,.3f}", f"{pred:,.3f}", _pct(err))
        console.print(t)
    for m in models:
        for e in m["errors"]:
            console.print(f"[red]{m['name']}: {e['what']} failed:[/] {e['error'][:300]}")


def _predict_only(specs, lut, contexts, gen, thr_ctx, max_batch, margin, out: Path, console: Console):
    from .profile import predict_decode, predict_generate, predict_throughput
    from .profile.report import model_config

    res = []
    t = Table(title=f"predicted from the LUT ({lut.meta.get('device', {}).get('name', '?')})")
    for col in ("model", *[f"ms/tok @ {c}" for c in contexts], "generate", "throughput"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for spec in specs:
        cfg = model_config(spec)
        if cfg is None:
            raise typer.BadParameter(f"{spec!r}: --predict-only needs a config (preset, config.json or model "
                                     "folder), not a checkpoint")
        dec = [predict_decode(cfg, lut, c).to_dict() for c in contexts]
        g = predict_generate(cfg, lut, gen) if gen else None
        # the max batch needs the device memory the LUT recorded (none for a LUT measured on the CPU)
        thr = [predict_throughput(cfg, lut, c, margin=margin, cap=max_batch) if lut.meta.get("free_bytes") else None
               for c in thr_ctx]
        res.append({"name": spec, "decode": dec, "generate": g, "throughput": [x for x in thr if x]})
        t.add_row(spec, *[f"{d['ms_per_token']:.3f}" for d in dec], f"{g['seconds']:.2f} s" if g else "-",
                  ", ".join(f"@{x['context']}: B={x['batch']} {x['tokens_per_s']:,.0f}" for x in thr if x) or "-")
    console.print(t)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prediction.json").write_text(json.dumps({"lut_meta": lut.meta, "models": res}, indent=1))
    console.print(f"wrote {out / 'prediction.json'}")


def profile_command(
    models: List[str] = typer.Argument(..., help="presets, config.json files, model folders, run folders or "
                                                 "checkpoints (configs get random weights)"),
    out: Path = typer.Option(Path("profile"), "--out", "-o", help="folder for profile.json and the plots"),
    device: str = typer.Option("cuda", help="cuda, cuda:1, ...; 'cpu' only to test the flow"),
    dtype: str = typer.Option("auto", help="bf16, fp16, fp32 or auto (bf16 on CUDA, fp32 on CPU)"),
    contexts: str = typer.Option(DEFAULT_CONTEXTS, help="context lengths (cache lengths) for ms/token at batch 1"),
    generate: int = typer.Option(8192, "--generate", help="time to generate this many tokens at batch 1 (0: skip)"),
    direct: bool = typer.Option(False, "--direct", help="time every step of --generate instead of integrating "
                                                         "the step time sampled at 3 positions"),
    prefill: str = typer.Option("1024,8192", help="prompt lengths for prefill latency ('' to skip)"),
    prefill_chunk: int = typer.Option(0, "--prefill-chunk", help="prefill in chunks of this many tokens (0: one)"),
    throughput_contexts: str = typer.Option("8192,32768", "--throughput-contexts",
                                            help="contexts for throughput at the largest batch ('' to skip)"),
    sweep: str = typer.Option("auto", help="batches for throughput vs batch at the first throughput context: "
                                           "'auto' (powers of 4 below the max batch), 'none', or a list"),
    max_batch: int = typer.Option(1024, "--max-batch", help="cap on the batch of the throughput runs"),
    margin: float = typer.Option(0.9, help="fraction of free memory the max batch may fill"),
    steps: int = typer.Option(64, help="decode steps per timing"),
    repeats: int = typer.Option(3, help="repeats per timing (the median is kept)"),
    lut: Optional[Path] = typer.Option(None, "--lut", help="LUT JSON: predict every measured value and report "
                                                           "the error"),
    lut_out: Optional[Path] = typer.Option(None, "--lut-out", help="build (or extend) a LUT for these models' "
                                                                   "operators, save it, and predict with it"),
    lut_contexts: str = typer.Option("", "--lut-contexts", help="LUT contexts (default: --contexts and the "
                                                                "throughput contexts)"),
    lut_batches: str = typer.Option(DEFAULT_LUT_BATCHES, "--lut-batches", help="LUT batch sizes"),
    lut_only: bool = typer.Option(False, "--lut-only", help="only build the LUT (with --lut-out)"),
    predict_only: bool = typer.Option(False, "--predict-only", help="only predict from --lut (no device needed)"),
    cuda_graphs: bool = typer.Option(True, "--cuda-graphs/--no-cuda-graphs", help="capture decode steps (CUDA)"),
    seed: int = typer.Option(0, help="seed of the random weights"),
):
    """Measure decode latency (batch 1, CUDA graphs) against context, the time to generate N tokens, prefill
    latency, throughput at the largest batch that fits, and memory; optionally build a per-operator latency
    table and report the predictor's error."""
    import torch

    from .profile import LUT, LUTError
    from .profile.report import ProfileOptions, model_config, open_model, profile_document

    console = Console()
    ctx = _ints(contexts, "--contexts")
    thr = _ints(throughput_contexts, "--throughput-contexts")
    pre = _ints(prefill, "--prefill")
    if generate < 0:
        raise typer.BadParameter(f"--generate must be >= 0, got {generate}")
    for name, v in (("--max-batch", max_batch), ("--steps", steps), ("--repeats", repeats)):
        if v < 1:
            raise typer.BadParameter(f"{name} must be >= 1, got {v}")
    if not 0 < margin <= 1:
        raise typer.BadParameter(f"--margin must be in (0, 1], got {margin}")
    if lut_only and lut_out is None:
        raise typer.BadParameter("--lut-only needs --lut-out PATH")
    try:
        table = LUT.load(lut) if lut is not None else None
    except LUTError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(1)
    if predict_only:
        if table is None:
            raise typer.BadParameter("--predict-only needs --lut PATH")
        _predict_only(models, table, ctx, generate, thr, max_batch, margin, out, console)
        return

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        console.print("[bold red]error:[/] hylo profile measures latency on a CUDA device and none is available "
                      "(torch.cuda.is_available() is False). Run it on a GPU machine; '--device cpu' runs the same "
                      "flow on the CPU, whose numbers say nothing about a GPU; '--predict-only --lut FILE' "
                      "predicts from a LUT measured elsewhere.")
        raise typer.Exit(2)
    if dev.type not in ("cuda", "cpu"):
        raise typer.BadParameter(f"--device must be cuda[:N] or cpu, got {device!r}")
    if dev.type == "cpu":
        console.print("[yellow]warning:[/] profiling on the CPU (eager, no CUDA graphs): the numbers test the flow, "
                      "they do not predict GPU latency")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in dtypes:
        dt = dtypes[dtype]
    else:
        raise typer.BadParameter(f"--dtype must be one of auto, {', '.join(dtypes)}; got {dtype!r}")
    if sweep == "auto":
        sweep_b = None
    elif sweep == "none":
        sweep_b = []
    else:
        sweep_b = _ints(sweep, "--sweep")
    opts = ProfileOptions(contexts=ctx, generate_tokens=generate, generate_direct=direct, prefill=pre,
                          prefill_chunk=prefill_chunk, throughput_contexts=thr, sweep_batches=sweep_b,
                          max_batch=max_batch, margin=margin, steps=steps, repeats=repeats,
                          cuda_graph=None if cuda_graphs else False)
    log = console.print

    # --- the LUT first, before any model takes memory (its free_bytes feeds the predicted max batch)
    built = None
    if lut_out is not None:
        from .profile.measure import build_lut

        try:
            built = LUT.load(lut_out) if lut_out.exists() else (table or LUT())
        except LUTError as e:
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(1)
        lctx = _ints(lut_contexts, "--lut-contexts") or sorted(set(ctx) | set(thr) | ({generate} if generate else
                                                                                    set()))
        lb = _ints(lut_batches, "--lut-batches", allow_empty=False)
        cfgs = []
        for spec in models:
            try:
                cfg = model_config(spec)
            except Exception as e:  # noqa: BLE001
                console.print(f"[bold red]error:[/] {spec}: {e}")
                raise typer.Exit(1)
            if cfg is None:
                if lut_only:
                    raise typer.BadParameter(f"{spec!r}: --lut-only needs configs (preset, config.json, model folder)")
                continue  # a checkpoint: its entries are measured after loading it
            cfgs.append(cfg)
        if cfgs:
            with console.status("building the LUT"):
                built = build_lut(cfgs, lctx, lb, device=dev, dtype=dt, lut=built, repeats=repeats, log=None)
            built.save(lut_out)
            n_err = sum("error" in e for e in built.entries)
            console.print(f"LUT: {len(built)} entries ({n_err} skipped or failed) → {lut_out}")
        table = built
        if lut_only:
            return

    results = []
    for spec in models:
        try:
            with console.status(f"loading {spec}"):
                model, source = open_model(spec, dev, dt, seed)
        except Exception as e:  # noqa: BLE001  (ProfileError, LoadError, a bad config)
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(1)
        if built is not None and model_config(spec) is None:
            from .profile.measure import build_lut

            built = build_lut([model.config], lctx, lb, device=dev, dtype=dt, lut=built, repeats=repeats)
            built.save(lut_out)
            table = built
        with console.status(f"profiling {spec}"):
            rec = profile_model(model, spec, opts, source, lut=table, log=log)
        results.append(rec)
        del model
        from .profile.measure import cleanup

        cleanup(dev)
    doc = profile_document(results, opts, dev, dt, lut_out or lut)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(doc, indent=1))
    from .profile.plots import write_plots

    plots = write_plots(doc, out)
    _tables(doc, console)
    console.print(f"wrote {out / 'profile.json'}" + (f" and {', '.join(p.name for p in plots)}" if plots else ""))
    if any(m["errors"] for m in results):
        raise typer.Exit(1)


def profile_model(*args, **kwargs):  # imported lazily so `hylo --help` stays fast
    from .profile.report import profile_model as pm

    return pm(*args, **kwargs)


profile_app = typer.Typer(pretty_exceptions_show_locals=False)
profile_app.command()(profile_command)

if __name__ == "__main__":
    profile_app()
