"""Per-operator decode-latency lookup table (LUT): what one decode step of each piece of a model costs on one device.

An entry is one measurement: piece ``op`` with shape signature ``sig`` (the config fields its cost depends on),
at cache length ``context`` and batch ``batch``, took ``ms`` per step (median of CUDA-graph replays). Pieces are
the token mixers and ``ffn`` (one layer's ``step``) plus the parts of a decode step outside the layers:

- ``norm``: a block's pre-norm and residual add (once per layer),
- ``embed``: the token embedding of one token per row,
- ``head``: final norm + LM head (with the per-row normalisation of the head when ``weight_norm``),
- ``overhead``: per step, outside the layers: the token copy, the graph launch and the position update.

A model's decode step costs ``overhead + embed + sum over layers (norm + op) + head``.

**The kernel decode step.** A model of only attention and FFN blocks decodes on CUDA at up to
``gemv.MAX_ROWS`` rows through :mod:`hylo.engine.kernel_step`: fused kernels per block, the pre-norm and residual
inside them. Its pieces are ``kattn``, ``kswa``, ``kffn`` (a whole block: norm, operator, residual) and ``khead``,
with the same signatures as ``attn``, ``swa``, ``ffn``, ``head``; such a step costs ``overhead + embed + sum over
layers (k-block) + khead`` (:func:`model_pieces` with ``kernel_step=True``).

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
used; above the largest, the last segment is extended (never downwards).

**Signatures the table lacks** (a width, head count or state size that was not measured: what a search asks)
are estimated from the same operator's signatures with the same kernels (equal boolean fields: qk norm, biases,
weight norm), through the bytes one step reads (``work``: weights + batch x state at the context). A decode step
costs ``ms ~ a + b x bytes``: a fixed part ``a`` (kernel launches and latency-bound small kernels, the same at any
width; at batch 1 it is most of a mixer's time on a GPU) plus a part that grows with the bytes. So:

- between two measured signatures (one reading fewer bytes, one more, at the queried context and batch): linear
  interpolation in bytes, exact for any ``a``, ``b`` of the operator (``how="interpolated"``);
- beyond them, or from a single signature: that signature's time split into its fixed part and the rest, and only
  the rest scaled by the ratio of bytes (``how="scaled"``). The fixed part is the smallest ``ms - b x bytes`` over
  its entries, with ``b`` the device's marginal cost per byte fitted on the table (:meth:`LUT.ms_per_byte`: pairs
  of signatures of one operator at batch 1, e.g. LM heads and FFNs of several widths). Exact when the operator's
  slope is the device's; scaling the whole time by bytes instead would predict a mixer at 3/4 width ~2x too fast.

Every lookup says how it was obtained (``exact``, ``interpolated``, ``scaled``; ``extrapolated``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

LUT_SCHEMA = "hylo.lut/1"
MIXERS = ("attn", "swa", "mamba2", "deltanet", "gdn", "jet")
LAYER_OPS = MIXERS + ("ffn",)
PIECES = ("norm", "embed", "head", "overhead")
# op -> its piece in the kernel decode step (hylo.engine.kernel_step), and back
KERNEL_STEP_OPS = {"attn": "kattn", "swa": "kswa", "ffn": "kffn", "head": "khead"}
KERNEL_STEP_BASE = {v: k for k, v in KERNEL_STEP_OPS.items()}
ALL_OPS = LAYER_OPS + PIECES + tuple(KERNEL_STEP_BASE)

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
SIG_FIELDS.update({k: SIG_FIELDS[base] for k, base in KERNEL_STEP_BASE.items()})


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


def model_pieces(config, kernel_step: bool = False) -> list[tuple[str, dict, int]]:
    """``(op, sig, count)`` for every piece of one decode step of a model with ``config``; ``kernel_step``: the
    pieces of :mod:`hylo.engine.kernel_step`'s step (every layer attention or FFN: the caller checks)."""
    k_op = (lambda op: KERNEL_STEP_OPS[op]) if kernel_step else (lambda op: op)
    counts: dict[str, list] = {}
    for op in config.layers:
        sig = signature(config, op)
        k = sig_key(k_op(op), sig)
        counts.setdefault(k, [k_op(op), sig, 0])[2] += 1
    n = len(config.layers)
    out = [tuple(v) for v in counts.values()]
    if not kernel_step:  # the kernel step's blocks hold their norm and residual
        out.append(("norm", signature(config, "norm"), n))
    out += [("embed", signature(config, "embed"), 1), (k_op("head"), signature(config, "head"), 1),
            ("overhead", {}, 1)]
    return out  # type: ignore[return-value]


def effective_context(op: str, sig: dict, cache_len: int) -> int:
    """The context an entry of ``op`` is keyed by, for a cache of ``cache_len`` positions (meta tokens included):
    the cache length for attention, the ring-buffer size for sliding-window attention, 0 otherwise."""
    if op in ("attn", "kattn"):
        return int(cache_len)
    if op in ("swa", "kswa"):
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


def kind_mismatch(sig: dict, other: dict) -> int:
    """How many boolean fields of ``sig`` (kernels present or not: qk norm, biases, weight norm) ``other`` lacks
    or sets differently."""
    return sum(1 for f, v in sig.items() if isinstance(v, bool) and other.get(f) != v)


def _field_mismatch(sig: dict, other: dict) -> int:
    return sum(1 for f, v in sig.items() if other.get(f) != v)


@dataclass
class Lookup:
    """One answer of :meth:`LUT.lookup`: ``ms`` per step and how it was obtained."""

    ms: float
    how: str  # "exact" (measured), "interpolated" (between two signatures, in bytes), "scaled" (from one)
    extrapolated: bool = False
    sources: list = field(default_factory=list)  # the signatures used


def switch_key(switches: dict) -> str:
    """A short name for a set of hylo's switches (``HYLO_*`` -> value): each entry :func:`hylo.profile.measure.
    build_lut` measures records the set it ran under (the sets themselves are in ``meta["switch_sets"]``), since a
    switch such as ``HYLO_GEMV_PRELOAD`` changes what a piece costs."""
    return hashlib.sha1(json.dumps(sorted(switches.items())).encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- the table
class LUT:
    """Entries ``{"op", "sig", "context", "batch", "ms", ...}`` plus ``meta`` (device, versions, dtype, memory).

    Extra entry fields (``temp_bytes``: temporary memory of one step, ``copies``, ``error``) are kept as they are;
    entries with an ``error`` are ignored by lookups."""

    def __init__(self, entries: Iterable[dict] = (), meta: dict | None = None):
        self.meta: dict = dict(meta or {})
        self.entries: list[dict] = []
        self._groups: dict[str, dict] | None = None
        self._cache: dict = {}  # fitted byte model (ms_per_byte, fixed_ms), cleared when entries change
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
        self._cache = {}

    def remove(self, drop: Callable[[dict], bool]) -> int:
        """Remove the entries for which ``drop(entry)`` is true; returns how many went."""
        kept = [e for e in self.entries if not drop(e)]
        n, self.entries = len(self.entries) - len(kept), kept
        self._groups, self._cache = None, {}
        return n

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
        when ``sig`` is not in the table (see the module docstring: interpolation in bytes between the nearest
        signatures of the operator, or one signature's time split into a fixed and a per-byte part); without it
        such a lookup raises :class:`LUTError`."""
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
            raise LUTError(f"the LUT has no entry for {op} with {sig}; pass work= to estimate it from the "
                           "operator's other signatures")
        # only signatures with the same kernels: the boolean fields (qk norm, biases, weight norm) add or remove
        # whole kernels, a fixed cost that no byte count explains
        fewest = min(kind_mismatch(sig, g["sig"]) for g in same)
        cands = [g for g in same if kind_mismatch(sig, g["sig"]) == fewest]
        w = float(work(op, sig, effective_context(op, sig, cache_len), batch))
        ests = []
        for g in cands:
            ctx_g = effective_context(op, g["sig"], cache_len)
            ms, e = self._interp_group(g["points"], ctx_g, batch, space)
            ests.append((g, ms, float(work(op, g["sig"], ctx_g, batch)), e))
        below = [x for x in ests if x[2] <= w]
        above = [x for x in ests if x[2] > w]

        def nearest(xs):  # nearest in bytes; among equals the signature whose fields differ least
            return min(xs, key=lambda x: (abs(math.log(max(x[2], 1.0) / max(w, 1.0))),
                                          _field_mismatch(sig, x[0]["sig"])))

        if below and above:  # between two signatures: linear in bytes (exact when ms = a + b x bytes)
            lo, hi = nearest(below), nearest(above)
            f = (w - lo[2]) / (hi[2] - lo[2])
            return Lookup(lo[1] + f * (hi[1] - lo[1]), "interpolated", lo[3] or hi[3], [lo[0]["sig"], hi[0]["sig"]])
        g, ms, w_g, extra = nearest(below or above)
        a = self.fixed_ms(g["op"], g["sig"], work)
        ms = a + (ms - a) * w / max(w_g, 1.0)
        return Lookup(ms, "scaled", extra, [g["sig"]])

    # ---- the byte model behind lookups of missing signatures
    def ms_per_byte(self, work: Callable[[str, dict, int, int], float]) -> float:
        """The device's marginal cost of reading one more byte (ms per byte), fitted on the table itself.

        Over every pair of signatures of one operator with the same kernels (same boolean fields), at their
        common contexts at the smallest common batch: the least-squares slope through the origin of the time
        difference on the ``work`` difference (dominated by the pairs far apart in bytes: LM heads, FFNs).
        Without such pairs (or a slope <= 0): the smallest ms per byte of any entry (the best rate seen), an
        upper bound of the marginal cost."""
        ck = ("beta", work)
        if ck in self._cache:
            return self._cache[ck]
        by_op: dict[str, list] = {}
        for g in self.groups().values():
            by_op.setdefault(g["op"], []).append(g)
        num = den = 0.0
        for op, gs in by_op.items():
            for i, g in enumerate(gs):
                for h in gs[i + 1:]:
                    if kind_mismatch(g["sig"], h["sig"]) or kind_mismatch(h["sig"], g["sig"]):
                        continue
                    common = set(g["points"]) & set(h["points"])
                    if not common:
                        continue
                    b0 = min(b for _, b in common)
                    for c, b in common:
                        if b != b0:
                            continue
                        dt = h["points"][(c, b)] - g["points"][(c, b)]
                        dw = float(work(op, h["sig"], c, b)) - float(work(op, g["sig"], c, b))
                        num += dt * dw
                        den += dw * dw
        beta = num / den if den > 0 else 0.0
        if beta <= 0:
            rates = [ms / w for g in self.groups().values() for (c, b), ms in g["points"].items()
                     if (w := float(work(g["op"], g["sig"], c, b))) > 0]
            beta = min(rates) if rates else 0.0
        self._cache[ck] = beta
        return beta

    def fixed_ms(self, op: str, sig: dict, work: Callable[[str, dict, int, int], float]) -> float:
        """The part of a measured signature's step time that does not grow with the bytes it reads (kernel
        launches, latency-bound small kernels): the smallest ``ms - ms_per_byte x work`` over its entries, at
        least 0. Scaling only the rest by bytes carries the signature's time to another width."""
        ck = ("fixed", sig_key(op, sig), work)
        if ck in self._cache:
            return self._cache[ck]
        g = self.groups().get(sig_key(op, sig))
        if g is None:
            raise LUTError(f"the LUT has no entry for {op} with {sig}")
        beta = self.ms_per_byte(work)
        a = min(ms - beta * float(work(op, sig, c, b)) for (c, b), ms in g["points"].items())
        self._cache[ck] = a = max(a, 0.0)
        return a

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
