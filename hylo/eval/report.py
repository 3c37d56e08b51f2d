"""Shared output of `hylo eval` commands: a result JSON with run metadata, and a rich table on the console.

Every evaluation writes ``{"kind": ..., "meta": {...}, "result": {...}}`` so results from different machines and
commits can be compared: ``meta`` records the date, device, library versions and the commit (env ``HYLO_COMMIT``,
else ``git rev-parse`` of the source tree when available).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


def metadata() -> dict[str, Any]:
    """Date, device, library versions and commit (:mod:`hylo.runinfo`), plus the command line."""
    from ..runinfo import metadata as run_metadata

    return {**run_metadata(), "argv": sys.argv}


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # JSON has no inf/nan
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        try:
            return _jsonable(x.item())
        except Exception:
            pass
    return x


def write_result(path: str | os.PathLike, kind: str, result: dict) -> Path:
    """Write ``{"kind", "meta", "result"}`` to ``path`` (parent folders created) through a temporary file, so a run
    killed while writing leaves the previous file whole; returns the path."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {"kind": kind, "meta": metadata(), "result": _jsonable(result)}
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:.4f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def print_table(title: str, rows: list[dict], out: Console | None = None) -> Table:
    """Print rows (dicts; columns are the union of keys in first-seen order) as a rich table; returns it."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    t = Table(title=title)
    for c in cols:
        numeric = all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows if c in r)
        t.add_column(str(c), justify="right" if numeric else "left")
    for r in rows:
        t.add_row(*(_fmt(r[c]) if c in r else "" for c in cols))
    (out or console).print(t)
    return t
