"""Per-operator decode-latency lookup table (LUT): what one decode step of each piece of a model costs on one device.

An entry is one measurement: piece ``op`` with shape signature ``sig`` (the config fields its cost depends on),
at cache length ``context`` and batch ``batch``, took ``ms`` per step (median of CUDA-graph replays). Pieces are
the token mixers and ``ffn`` (one layer's ``step``) plus the parts of a decode step outside the layers:

- ``norm``: a block's pre-norm and residual add (once per layer),
- ``embed``: the token embedding of one token per row,
- ``head``: final norm + LM head (with the per-row normalisation of the head when ``weight_norm``),
- ``overhead``: per step, outside the layers: the token copy, the graph launch and the position update.

A model's decode step costs ``overhead + embed + sum over layers (norm + op) + head``.

**Context.** Attention's step reads its whole preallocated cache (masked), so its cost depends on the cache
length, not on the position; an entry's ``context`` is that cache length. Sliding-window attention keeps a ring
buffer of ``min(window, cache length)`` slots; the linear operators and the other pieces keep fixed-size state.
:func:`effective_context` maps a cache length to the context an entry is keyed by (0 for context-free pieces),
so the table holds one context for those.

**Lookup.** Within one signature, :meth:`LUT.lookup` interpolates piecewise-linearly in context, then in batch.
The default is linear in the values: a decode step is memory-bound, so its time is close to affine in batch and
in context (bytes read = weights + batch x (fixed state + context x KV bytes per token)), and piecewise-linear
interpolation between geometrically spaced grid points is exact for that model; ``space="log"`` interpolates
log(ms) over log(context), log(batch) instead. Below the smallest measured context or batch the nearest value is
used; above the largest, the last segment is extended (never downwards). A signature absent from the table is
estimated from the entries of the same operator at the nearest widths (below and above): each one's time is
scaled by the ratio of bytes its step reads (``work``) and the two are interpolated in log(width). Every lookup
says how it was obtained (``exact``, ``scaled``; ``extrapolated``).
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

LUT_SCHEMA = "hylo.lut/1"
MIXERS = ("attn", "swa", "mamba2", "deltanet", "gdn", "jet")
LAYER_OPS = MIXERS + ("ffn",)
PIECES = ("norm", "embed", "head", "overhead")
ALL_OPS = LAYER_OPS + PIECES

# The HyloConfig fields each piece's decode cost depends on (names as in HyloConfig, so a signature can rebuild
# a config). rope_theta, chunk sizes, norm eps and initialisation do not change the cost and are left out.
SIG_FIELDS: dict[str, tuple[str, ...]] = {
    "attn": ("hidden_size", "attn_num_heads", "attn_num_kv_heads", "attn_head_dim", "attn_qk_norm",
             "attn_qkv_bias", "attn_o_bias"),
    "swa": ("hidden_size", "attn_num_heads", "attn_num_kv_heads", "attn_head_dim", "attn_qk_norm",
            "attn_qkv_bias", "attn_o_bias", "swa_window"),
    "mamba2": ("hidden_size", "mamba2_expand", "mamba2_head_dim", "mamba2_state_size", "mamba2_n_groups",
               "mamba2_conv_size"),
    "deltanet": ("hidden_size", "deltanet_num_heads", "deltanet_head_dim", "deltanet_conv_size"),
    "gdn": ("hidden_size", "gdn_num_heads", "gdn_head_k_dim", "gdn_head_v_dim", "gdn_conv_size"),
    "jet": ("hidden_size", "jet_num_heads", "jet_head_k_dim", "jet_head_v_dim", "jet_conv_size",
            "jet_kernel_reduction"),
    "ffn": ("hidden_size", "ffn_intermediate_size", "ffn_bias"),
    "norm": ("hidden_size",),
    "embed": ("hidden_size", "vocab_size"),
    "head": ("hidden_size", "vocab_size", "weight_norm"),
    "overhead": (),
}


class LUTError(ValueError):
    """The table cannot answer a lookup (no entry for the operator), or a file is not a hylo LUT."""


def _check_op(op: str) -> None:
    if op not in SIG_FIELDS:
        raise LUTError(f"unknown LUT piece {op!r}; known: {list(SIG_FIELDS)}")


def signature(config, op: str) -> dict:
    """The fields of ``config`` that the decode cost of piece ``op`` depends on."""
    _check_op(op)
    return {f: getattr(config, f) for f in SIG_FIELDS[op]}


def sig_key(op: str, sig: dict) -> str:
    return op + ":" + json.dumps(sig, sort_keys=True, separators=(",", ":"))


def model_pieces(config) -> list[tuple[str, dict, int]]:
    """``(op, sig, count)`` for every piece of one decode step of a model with ``config``."""
    counts: dict[str, list] = {}
    for op in config.layers:
        sig = signature(config, op)
        k = sig_key(op, sig)
        counts.setdefault(k, [op, sig, 0])[2] += 1
    n = len(config.layers)
    out = [tuple(v) for v in counts.values()]
    out += [("norm", signature(config, "norm"), n), ("embed", signature(config, "embed"), 1),
            ("head", signature(config, "head"), 1), ("overhead", {}, 1)]
    return out  # type: ignore[return-value]


def effective_context(op: str, sig: dict, cache_len: int) -> int:
    """The context an entry of ``op`` is keyed by, for a cache of ``cache_len`` positions (meta tokens included):
    the cache length for attention, the ring-buffer size for sliding-window attention, 0 otherwise."""
    if op == "attn":
        return int(cache_len)
    if op == "swa":
        return int(min(cache_len, sig["swa_window"]))
    return 0


# ----------------------------------------------------------------------------- interpolation
def interp1(xs: list[float], ys: list[float], x: float, space: str = "linear") -> tuple[float, bool]:
    """Piecewise-linear interpolation of ``y(x)`` through sorted ``xs``; returns ``(y, extrapolated)``.

    Below ``xs[0]``: ``ys[0]``. Above ``xs[-1]``: the last segment extended with a slope of at least 0.
    ``space="log"`` interpolates log(y) over log(x) (all values must be > 0)."""
    if not xs:
        raise LUTError("interpolation over no points")
    if len(xs) != len(ys):
        raise LUTError(f"{len(xs)} x values but {len(ys)} y values")
    if x < xs[0] or (len(xs) == 1 and x != xs[0]):
        return (ys[0] if x < xs[0] else ys[-1]), x != xs[0]
    if x == xs[-1]:
        return ys[-1], False
    log = space == "log"
    if space not in ("linear", "log"):
        raise LUTError(f"space must be 'linear' or 'log', got {space!r}")
    f = (lambda v: math.log(v)) if log else (lambda v: v)
    g = math.exp if log else (lambda v: v)
    i = bisect.bisect_right(xs, x) - 1
    extrapolated = i >= len(xs) - 1
    i = min(i, len(xs) - 2)
    x0, x1, y0, y1 = f(xs[i]), f(xs[i + 1]), f(ys[i]), f(ys[i + 1])
    slope = (y1 - y0) / (x1 - x0)
    if extrapolated:  # from the last point, never downwards
        return g(y1 + max(slope, 0.0) * (f(x) - x1)), True
    return g(y0 + slope * (f(x) - x0)), False


@dataclass
class Lookup:
    """One answer of :meth:`LUT.lookup`: ``ms`` per step and how it was obtained."""

    ms: float
    how: str  # "exact" (this signature was measured) or "scaled" (from other widths, by bytes read)
    extrapolated: bool = False
    sources: list = field(default_factory=list)  # the signatures used


# ----------------------------------------------------------------------------- the table
class LUT:
    """Entries ``{"op", "sig", "context", "batch", "ms", ...}`` plus ``meta`` (device, versions, dtype, memory).

    Extra entry fields (``temp_bytes``: temporary memory of one step, ``copies``, ``error``) are kept as they are;
    entries with an ``error`` are ignored by lookups."""

    def __init__(self, entries: Iterable[dict] = (), meta: dict | None = None):
        self.meta: dict = dict(meta or {})
        self.entries: list[dict] = []
        self._groups: dict[str, dict] | None = None
        for e in entries:
            self.add(e)

    # ---- building
    def add(self, entry: dict) -> None:
        for k in ("op", "sig", "context", "batch"):
            if k not in entry:
                raise LUTError(f"LUT entry {entry!r} lacks {k!r}")
        _check_op(entry["op"])
        if "error" not in entry and not (isinstance(entry.get("ms"), (int, float)) and entry["ms"] > 0):
            raise LUTError(f"LUT entry {entry!r} needs ms > 0 (or an 'error')")
        key = (sig_key(entry["op"], entry["sig"]), int(entry["context"]), int(entry["batch"]))
        self.entries = [e for e in self.entries
                        if (sig_key(e["op"], e["sig"]), int(e["context"]), int(e["batch"])) != key]
        self.entries.append(dict(entry))
        self._groups = None

    def has(self, op: str, sig: dict, context: int, batch: int) -> bool:
        g = self.groups().get(sig_key(op, sig))
        return g is not None and (int(context), int(batch)) in g["points"]

    def groups(self) -> dict[str, dict]:
        """``{sig_key: {"op", "sig", "points": {(context, batch): ms}}}`` over the valid entries."""
        if self._groups is None:
            gs: dict[str, dict] = {}
            for e in self.entries:
                if "error" in e:
                    continue
                k = sig_key(e["op"], e["sig"])
                g = gs.setdefault(k, {"op": e["op"], "sig": e["sig"], "points": {}})
                g["points"][(int(e["context"]), int(e["batch"]))] = float(e["ms"])
            self._groups = gs
        return self._groups

    # ---- lookups
    @staticmethod
    def _interp_group(points: dict, context: int, batch: int, space: str) -> tuple[float, bool]:
        by_batch: dict[int, list] = {}
        for (c, b), ms in points.items():
            by_batch.setdefault(b, []).append((c, ms))
        bs, vs, extra = [], [], False
        for b in sorted(by_batch):
            pts = sorted(by_batch[b])
            v, e = interp1([p[0] for p in pts], [p[1] for p in pts], context, space)
            bs.append(b)
            vs.append(v)
            extra |= e
        v, e = interp1(bs, vs, batch, space)
        return v, extra or e

    def lookup(self, op: str, sig: dict, cache_len: int, batch: int, space: str = "linear",
               work: Callable[[str, dict, int, int], float] | None = None) -> Lookup:
        """ms per step of piece ``op`` with signature ``sig`` for a cache of ``cache_len`` positions (meta tokens
        included; mapped by :func:`effective_context`) and ``batch`` rows.

        ``work(op, sig, context, batch)`` (bytes one step reads at effective context ``context``) is needed only
        when ``sig`` is not in the table; without it such a lookup raises :class:`LUTError`."""
        _check_op(op)
        groups = self.groups()
        k = sig_key(op, sig)
        if k in groups:
            ms, extra = self._interp_group(groups[k]["points"], effective_context(op, sig, cache_len), batch,
                                           space)
            return Lookup(ms, "exact", extra, [sig])
        same = [g for g in groups.values() if g["op"] == op]
        if not same:
            have = sorted({g["op"] for g in groups.values()})
            raise LUTError(f"the LUT has no entry for operator {op!r} (it holds {have}); build it for this "
                           "operator (hylo profile ... --lut-out)")
        if work is None:
            raise LUTError(f"the LUT has no entry for {op} with {sig}; pass work= to scale from other widths")
        width = sig.get("hidden_size", 1)
        below = [g for g in same if g["sig"].get("hidden_size", 1) <= width]
        above = [g for g in same if g["sig"].get("hidden_size", 1) > width]

        def nearest(gs):  # nearest width; among equal widths the one whose fields differ least
            return min(gs, key=lambda g: (abs(math.log(g["sig"].get("hidden_size", 1) / width)),
                                          sum(g["sig"].get(f) != v for f, v in sig.items())))

        picks = [nearest(gs) for gs in (below, above) if gs]
        target = work(op, sig, effective_context(op, sig, cache_len), batch)
        ests, extra = [], False
        for g in picks:
            ctx_g = effective_context(op, g["sig"], cache_len)
            ms, e = self._interp_group(g["points"], ctx_g, batch, space)
            extra |= e
            ests.append((g["sig"].get("hidden_size", 1), ms * target / max(work(op, g["sig"], ctx_g, batch), 1.0)))
        if len(ests) == 1:
            ms = ests[0][1]
        else:
            (w0, m0), (w1, m1) = ests
            t = math.log(width / w0) / math.log(w1 / w0) if w1 != w0 else 0.0
            ms = math.exp(math.log(m0) + t * (math.log(m1) - math.log(m0)))
        return Lookup(ms, "scaled", extra, [g["sig"] for g in picks])

    # ---- files
    def to_dict(self) -> dict:
        return {"schema": LUT_SCHEMA, "meta": self.meta, "entries": self.entries}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, d: dict) -> "LUT":
        if not isinstance(d, dict) or d.get("schema") != LUT_SCHEMA:
            raise LUTError(f"not a hylo LUT (schema {d.get('schema') if isinstance(d, dict) else None!r}, "
                           f"expected {LUT_SCHEMA!r})")
        return cls(d.get("entries", []), d.get("meta", {}))

    @classmethod
    def load(cls, path: str | Path) -> "LUT":
        path = Path(path)
        if not path.is_file():
            raise LUTError(f"{path}: no such LUT file")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise LUTError(f"{path}: not JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except LUTError as e:
            raise LUTError(f"{path}: {e}") from None

    def __len__(self) -> int:
        return len(self.entries)
