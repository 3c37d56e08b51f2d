"""PNG plots of a profile (matplotlib, no display needed): ms/token against context, throughput against batch,
and predicted against measured values."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(doc: dict, what: str) -> str:
    dev = doc.get("environment", {}).get("device", {}).get("name", "")
    return f"{what} ({dev}, {doc.get('dtype', '')})" if dev else what


def _save(fig, ax, path: str | Path) -> Path:
    """Grid, legend, tight layout; write the PNG and free the figure."""
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def plot_context(doc: dict, path: str | Path) -> Path | None:
    """ms/token (batch 1, CUDA graphs) against context, one line per model; dashed: the predictor's values."""
    models = [m for m in doc["models"] if m.get("decode")]
    if not models:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in models:
        pts = sorted((d["context"], d["ms_per_token"]) for d in m["decode"])
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m["name"])
        pred = sorted((d["context"], d["ms_per_token"]) for d in (m.get("prediction") or {}).get("decode", []))
        if pred:
            ax.plot([p[0] for p in pred], [p[1] for p in pred], "x--", color=line.get_color(), alpha=0.7,
                    label=f"{m['name']} (predicted)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (cache length, tokens)")
    ax.set_ylabel("ms / token (batch 1)")
    ax.set_title(_title(doc, "decode latency"))
    return _save(fig, ax, path)


def plot_throughput(doc: dict, path: str | Path) -> Path | None:
    """Generated tokens/s against batch at a fixed context, one line per model (the last point: max batch)."""
    models = [m for m in doc["models"] if m.get("throughput_vs_batch")]
    if not models:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in models:
        pts = sorted((d["batch"], d["tokens_per_s"]) for d in m["throughput_vs_batch"])
        ctx = m["throughput_vs_batch"][0]["context"]
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{m['name']} @ {ctx}")
        pred = sorted((d["batch"], d["tokens_per_s"])
                      for d in (m.get("prediction") or {}).get("throughput_vs_batch", []))
        if pred:
            ax.plot([p[0] for p in pred], [p[1] for p in pred], "x--", color=line.get_color(), alpha=0.7)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (rows decoded together)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(_title(doc, "decode throughput (dashed: predicted)"))
    return _save(fig, ax, path)


def plot_prediction(pairs: list[tuple[str, float, float]], path: str | Path, what: str = "",
                    band: float = 0.10) -> Path | None:
    """Predicted against measured values (``(label, measured, predicted)``), with the y = x line and a
    +-``band`` relative band."""
    pairs = [p for p in pairs if p[1] and p[2]]
    if not pairs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    lo = min(min(p[1], p[2]) for p in pairs) * 0.8
    hi = max(max(p[1], p[2]) for p in pairs) * 1.25
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.fill_between([lo, hi], [lo * (1 - band), hi * (1 - band)], [lo * (1 + band), hi * (1 + band)],
                    color="0.85", label=f"±{band:.0%}")
    for label, meas, pred in pairs:
        ax.plot(meas, pred, "o")
        ax.annotate(label, (meas, pred), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("measured")
    ax.set_ylabel("predicted from the LUT")
    ax.set_title(what or "predictor against measurement")
    return _save(fig, ax, path)


def write_plots(doc: dict, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = [plot_context(doc, out_dir / "ms_per_token_vs_context.png"),
            plot_throughput(doc, out_dir / "throughput_vs_batch.png")]
    pairs = []
    for m in doc["models"]:
        pr = m.get("prediction") or {}
        for d in pr.get("decode", []):
            pairs.append((f"{m['name']} @{d['context']}", d["measured"], d["ms_per_token"]))
    made.append(plot_prediction(pairs, out_dir / "predicted_vs_measured.png", "ms/token: predicted vs measured"))
    return [p for p in made if p is not None]
