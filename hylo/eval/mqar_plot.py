"""Zoology-style MQAR figure: accuracy against the number of key-value pairs, one line per pattern, one panel
per (model width, sequence length)."""

from __future__ import annotations

from pathlib import Path


def plot_result(result: dict, path: str | Path) -> bool:
    """Write the figure of an MQAR result (``hylo.eval.mqar.run``) to ``path``. False when there is nothing to
    plot (every model failed) or matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in result.get("table", []) if r["accuracy"] is not None]
    if not rows:
        return False
    widths = sorted({r["hidden"] for r in rows})
    lens = sorted({r["seq_len"] for r in rows})
    names = list(dict.fromkeys(r["pattern"] for r in rows))
    fig, axes = plt.subplots(len(widths), len(lens), figsize=(3.6 * len(lens) + 1.6, 3.0 * len(widths)),
                             squeeze=False, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, h in enumerate(widths):
        for j, L in enumerate(lens):
            ax = axes[i][j]
            for k, name in enumerate(names):
                pts = sorted((r["num_pairs"], r["accuracy"]) for r in rows
                             if r["pattern"] == name and r["hidden"] == h and r["seq_len"] == L)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4,
                            color=colors[k % len(colors)], label=name)
            ax.set_xscale("log", base=2)
            xs = sorted({r["num_pairs"] for r in rows if r["hidden"] == h and r["seq_len"] == L})
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.minorticks_off()
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.set_title(f"seq len {L}, width {h}", fontsize=10)
            if i == len(widths) - 1:
                ax.set_xlabel("key-value pairs")
            if j == 0:
                ax.set_ylabel("MQAR accuracy")
    handles, labels = [], []
    for ax in axes.flat:
        for hd, lb in zip(*ax.get_legend_handles_labels()):
            if lb not in labels:
                handles.append(hd)
                labels.append(lb)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True
