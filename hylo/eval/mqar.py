"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology (Arora et al. 2023,
"Zoology: measuring and improving recall in efficient language models"), and a harness that trains small
hylo models on it and reports accuracy by sequence length and number of key-value pairs.

A sequence of length ``L`` with ``n`` pairs (token 0 is the filler)::

    k1 v1 k2 v2 ... kn vn | 0 0 k2 0 0 0 k1 0 ... 0
                            query region: each key once, at an even offset 2*g

The first ``2n`` tokens hold ``n`` key-value pairs (keys from the lower half of the vocabulary, values from the
upper half, both unique within a sequence). Each key is queried once later on; the query offsets ``g`` are drawn
without replacement from a power law ``p(g) ~ g^(a-1)`` (``a = power_a``, Zoology's 0.01), so most queries come
soon after the pairs, as repeated bigrams do in text. The model must predict, at each query position, the
value paired with that key; everything else is unscored. Answers never appear in the input.

``targets[:, t]`` is the token expected *after* position ``t`` (Zoology's convention: ``targets[t] = value`` at
a query position ``t``, -100 elsewhere). ``HybridLM.forward(labels=...)`` shifts its labels inside (Hugging Face
convention); :meth:`MQARData.hf_labels` gives labels for that convention.

Accuracy is the fraction of queries whose argmax prediction is the right value. Attention solves MQAR at small
widths; recurrent models with a fixed-size state degrade as the number of pairs grows (Zoology, Figure 2).

Harness (:func:`run`, ``hylo eval mqar``): every pattern x width is trained from scratch on a mix of settings
(right-padded to one length: exact for causal models) with AdamW, warmup + cosine, bf16 autocast on CUDA, the
loss on the query positions only, and scored on each test setting.

Pure attention (RoPE, no short convolution) must first learn a previous-token head and then the induction head
that reads it; until both exist its loss sits on a plateau (it guesses among the values in context), and the
plateau grows with the sequence length, because gradients through near-uniform attention over long rows are
weak. Found on the CPU (``benchmarks/results/mqar-cpu-trials.json``: 'a a' width 64, batch 64, vocabulary 256): no
bug and no model change was needed; with a full-length schedule 'a a' leaves the plateau after ~750-1000 steps on
settings of length <= 32 and ~1250-1500 on a mix up to length 128; a *curriculum* (batches drawn from the short
settings first, the full mix phased in over 30% of the run: ``curriculum``, on by default) halved the latter
(solved, >= 99.5% on 128x32, at 1000 steps). Short, few-pair settings in the mix (:func:`default_train_mix`) give it
something to start on. Earlier failures came from runs too short for the plateau (1000-2000 steps whose cosine
schedule decayed the learning rate while still on it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

FILLER = 0


# ============================================================================ generator
class MQARError(ValueError):
    """An MQAR setting that cannot produce data or a model (names the value and what is allowed)."""


@dataclass
class MQARData:
    """One MQAR set: ``inputs, targets: [N, L]`` (int64); ``query_pos, answers: [N, n]`` hold each example's
    query positions (ascending) and the values expected there, so a harness can score exactly those positions
    with static shapes."""

    inputs: torch.Tensor
    targets: torch.Tensor
    query_pos: torch.Tensor
    answers: torch.Tensor
    vocab_size: int
    num_pairs: int
    seq_len: int

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def hf_labels(self) -> torch.Tensor:
        """Labels for ``HybridLM(input_ids, labels=...)``, which scores ``logits[:, t]`` against ``labels[:, t+1]``:
        the targets moved one position to the right (-100 at position 0)."""
        out = torch.full_like(self.targets, -100)
        out[:, 1:] = self.targets[:, :-1]
        return out

    def to(self, device) -> "MQARData":
        return dataclasses.replace(self, inputs=self.inputs.to(device), targets=self.targets.to(device),
                                   query_pos=self.query_pos.to(device), answers=self.answers.to(device))


def _check_int(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise MQARError(f"{name}={value!r} is invalid: an integer >= {lo}")


def check_setting(vocab_size: int, num_pairs: int, seq_len: int) -> None:
    """Raise :class:`MQARError` unless ``num_pairs`` unique keys and values fit in the vocabulary and the pairs
    plus one query slot per key fit in ``seq_len``."""
    _check_int("vocab_size", vocab_size, 4)
    _check_int("num_pairs", num_pairs, 1)
    _check_int("seq_len", seq_len, 4)
    n_keys, n_values = vocab_size // 2 - 1, vocab_size - vocab_size // 2
    if num_pairs > n_keys:
        raise MQARError(f"vocab_size={vocab_size} is too small for num_pairs={num_pairs}: keys are tokens "
                        f"1..{vocab_size // 2 - 1} ({n_keys} of them) and must be unique within a sequence; "
                        f"use vocab_size >= {2 * num_pairs + 2}")
    if seq_len < 4 * num_pairs:
        raise MQARError(f"seq_len={seq_len} is too short for num_pairs={num_pairs}: the pairs take {2 * num_pairs} "
                        f"tokens and each of the {num_pairs} queries needs an even slot after them "
                        f"(seq_len >= 4*num_pairs = {4 * num_pairs})")
    assert n_values >= num_pairs


def _unique_ints(n_rows: int, k: int, lo: int, hi: int, gen: torch.Generator) -> torch.Tensor:
    """``[n_rows, k]`` integers from ``[lo, hi)``, distinct within each row, every such set equally likely.

    Large pools: draw with replacement and redraw the duplicates until none are left (a few rounds). Small pools
    (``hi - lo < 8k``): the first ``k`` of a random permutation per row."""
    pool = hi - lo
    if pool < 8 * k:
        out = torch.empty(n_rows, k, dtype=torch.long)
        step = max(1, (1 << 24) // pool)
        for s in range(0, n_rows, step):
            r = torch.rand(min(step, n_rows - s), pool, generator=gen)
            out[s:s + step] = r.topk(k, dim=1).indices + lo
        return out
    x = torch.randint(lo, hi, (n_rows, k), generator=gen)
    rows = torch.arange(n_rows)
    while rows.numel():
        sub = x[rows]
        s, order = sub.sort(dim=1)
        dup_sorted = torch.zeros_like(sub, dtype=torch.bool)
        dup_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
        dup = torch.zeros_like(dup_sorted).scatter_(1, order, dup_sorted)
        has = dup.any(1)
        rows, dup, sub = rows[has], dup[has], sub[has]
        sub[dup] = torch.randint(lo, hi, (int(dup.sum()),), generator=gen)
        x[rows] = sub
    return x


def generate(vocab_size: int = 8192, num_pairs: int = 8, seq_len: int = 64, num_examples: int = 1000,
             seed: int = 0, power_a: float = 0.01, noise: bool = False) -> MQARData:
    """MQAR examples as in Zoology (vectorized; 100k examples of length 512 take a few seconds on a CPU).

    ``noise=True`` fills the unscored positions with random tokens of the whole vocabulary instead of the filler
    token 0 (Zoology's ``random_non_queries``). Deterministic for a seed (CPU generator)."""
    check_setting(vocab_size, num_pairs, seq_len)
    _check_int("num_examples", num_examples, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MQARError(f"seed={seed!r} is invalid: an integer")
    if not (isinstance(power_a, (int, float)) and 0 < power_a <= 1):
        raise MQARError(f"power_a={power_a!r} is invalid: a number in (0, 1] (1 = uniform query offsets)")
    gen = torch.Generator().manual_seed(seed)
    N, n, L = num_examples, num_pairs, seq_len
    keys = _unique_ints(N, n, 1, vocab_size // 2, gen)
    values = _unique_ints(N, n, vocab_size // 2, vocab_size, gen)
    # query offsets: n of `space` even slots, without replacement, p(g) ~ g^(a-1) (g = 1..space); Gumbel top-k
    # draws them exactly as sequential sampling without replacement does. Key i gets the i-th draw.
    space = (L - 2 * n) // 2
    logp = (power_a - 1) * torch.log(torch.arange(1, space + 1, dtype=torch.float32))
    u = torch.rand(N, space, generator=gen).clamp_(min=1e-30)
    slots = (logp - torch.log(-torch.log(u))).topk(n, dim=1).indices  # [N, n], slot index g-1
    qpos = 2 * n + 2 * slots
    inputs = torch.full((N, L), FILLER, dtype=torch.long)
    inputs[:, 0:2 * n:2] = keys
    inputs[:, 1:2 * n:2] = values
    inputs.scatter_(1, qpos, keys)
    if noise:
        fill = torch.randint(0, vocab_size, (N, L), generator=gen)
        free = torch.ones(N, L, dtype=torch.bool)
        free[:, :2 * n] = False
        free.scatter_(1, qpos, False)
        inputs = torch.where(free, fill, inputs)
    targets = torch.full((N, L), -100, dtype=torch.long)
    targets.scatter_(1, qpos, values)
    qpos, order = qpos.sort(dim=1)
    return MQARData(inputs, targets, qpos, values.gather(1, order), vocab_size, n, L)


def accuracy(logits_or_preds: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """``(correct, scored)`` over positions where ``targets != -100``; takes logits ``[..., V]`` (argmax) or
    predicted ids of ``targets``' shape."""
    preds = logits_or_preds.argmax(-1) if logits_or_preds.dim() == targets.dim() + 1 else logits_or_preds
    if preds.shape != targets.shape:
        raise MQARError(f"predictions of shape {tuple(preds.shape)} do not match targets {tuple(targets.shape)}")
    mask = targets != -100
    return int((preds.eq(targets) & mask).sum()), int(mask.sum())


def pad_to(data: MQARData, seq_len: int, num_pairs: int | None = None) -> MQARData:
    """Right-pad to ``seq_len`` (filler, unscored) and to ``num_pairs`` query columns (position 0, answer -100).
    Exact for causal models: padding after a position cannot change its prediction, so sets of different
    lengths can share a batch (static shapes, one kernel compilation). ``seq_len``/``num_pairs`` keep naming the
    setting; the tensors' shapes give the padded sizes."""
    L, n = data.seq_len, data.num_pairs
    num_pairs = n if num_pairs is None else num_pairs
    if seq_len < L or num_pairs < n:
        raise MQARError(f"cannot pad a {L}x{n} set to {seq_len}x{num_pairs}")
    inputs = F.pad(data.inputs, (0, seq_len - L), value=FILLER)
    targets = F.pad(data.targets, (0, seq_len - L), value=-100)
    qpos = F.pad(data.query_pos, (0, num_pairs - n), value=0)
    answers = F.pad(data.answers, (0, num_pairs - n), value=-100)
    return dataclasses.replace(data, inputs=inputs, targets=targets, query_pos=qpos, answers=answers)


def concat(sets: Sequence[MQARData]) -> MQARData:
    """One set from several (padded to the longest length and the most pairs); ``seq_len``/``num_pairs`` of the
    result are those maxima."""
    L = max(d.seq_len for d in sets)
    n = max(d.num_pairs for d in sets)
    padded = [pad_to(d, L, n) for d in sets]
    return MQARData(torch.cat([d.inputs for d in padded]), torch.cat([d.targets for d in padded]),
                    torch.cat([d.query_pos for d in padded]), torch.cat([d.answers for d in padded]),
                    sets[0].vocab_size, n, L)


# ============================================================================ harness
def parse_setting(text: str | Sequence) -> tuple[int, int]:
    """``"256x16"`` (or ``(256, 16)``) -> ``(seq_len, num_pairs)``."""
    L, n, _ = parse_train_setting(text)
    return L, n


def parse_train_setting(text: str | Sequence) -> tuple[int, int, float]:
    """``"64x4*3"`` / ``(64, 4, 3)`` -> ``(seq_len, num_pairs, weight)``; the weight (default 1) scales the number
    of training examples of that setting, so a mix can lean on easy settings as Zoology's does."""
    if isinstance(text, str):
        body, _, w = text.lower().partition("*")
        parts = body.split("x")
        try:
            L, n = (int(p) for p in parts)
            weight = float(w) if w else 1.0
        except ValueError:
            raise MQARError(f"setting {text!r} is invalid: write SEQ_LENxPAIRS or SEQ_LENxPAIRS*WEIGHT, "
                            f"e.g. 256x16 or 64x4*3") from None
    else:
        if len(text) not in (2, 3):
            raise MQARError(f"setting {text!r} is invalid: (seq_len, num_pairs) or (seq_len, num_pairs, weight)")
        L, n, weight = (*text, 1.0) if len(text) == 2 else text
    if not (isinstance(weight, (int, float)) and weight > 0):
        raise MQARError(f"setting {text!r} has weight {weight!r}: weights must be > 0")
    return int(L), int(n), float(weight)


def grid(seq_lens: Sequence[int], pairs: Sequence[int]) -> list[tuple[int, int]]:
    """Every ``(seq_len, num_pairs)`` of the cross product that fits (``seq_len >= 4 * num_pairs``)."""
    return [(L, n) for L in seq_lens for n in pairs if L >= 4 * n]


EASY_SETTINGS = ((32, 4, 3.0), (64, 4, 3.0), (64, 8, 2.0), (128, 16, 2.0))


def default_train_mix(test: Sequence[tuple[int, int]]) -> list[tuple[int, int, float]]:
    """The test grid plus short, few-pair settings (weighted up, no longer than the longest test sequence).
    Zoology's mixes lean on easy settings too: without them, attention (which has no short convolution to
    find the previous token) sits on a plateau for thousands of steps before the induction circuit forms."""
    longest = max(L for L, _ in test)
    easy = [(L, n, w) for L, n, w in EASY_SETTINGS if L <= longest and (L, n) not in set(test)]
    return easy + [(L, n, 1.0) for L, n in test]


def default_model_kwargs(hidden: int) -> dict:
    """HyloConfig fields for MQAR-sized models, after Zoology's: one attention head up to width 128 (Zoology's
    ``num_heads=1``; on the CPU, 4 heads of 16 channels left the loss plateau no sooner), two DeltaNet / Gated
    DeltaNet heads, Mamba2 heads of 32 channels with state 64, a 32-token window for `swa`, no meta tokens, tied
    embeddings."""
    attn_heads = 1 if hidden <= 128 or hidden % 64 else hidden // 64
    delta_heads = 2 if hidden % 2 == 0 else 1
    return dict(attn_num_heads=attn_heads, deltanet_num_heads=delta_heads, gdn_num_heads=delta_heads,
                jet_num_heads=delta_heads, swa_window=32, mamba2_head_dim=min(32, 2 * hidden),
                mamba2_state_size=64, mamba2_chunk_size=64, num_meta_tokens=0, tie_word_embeddings=True)


@dataclass
class HarnessConfig:
    """What to train and test. ``patterns`` holds layer patterns (``"gdn f a f"``) or dicts of HyloConfig fields
    with a ``layers`` key (and an optional ``name``); each is trained at every width in ``hidden`` on the mix of
    ``train`` settings and scored on each ``test`` setting. ``lr`` may map pattern names to learning rates
    (key ``"default"`` for the rest).

    Time: ``time_budget_s`` gives every model the same wall-clock training budget: after ``calib_steps`` steps
    the step time is measured and the run length (and its cosine schedule) set to ``min(steps, what fits)``.
    ``max_time_s`` is a hard cap that stops a model mid-schedule (the run is marked truncated). Every
    ``eval_interval`` steps one batch of the hardest test setting is scored (the probe); with ``stop_accuracy``
    a model whose probe reaches it stops there (``solved_at``), leaving time to the others.

    ``kernel_warmup`` runs one untimed forward+backward at the training batch's shape and the evaluation
    forwards at the test shapes before the clock starts, so Triton compilation and autotuning (up to minutes per
    new kernel shape on a GPU) is not charged to the model's budget; it leaves training exactly as it would be
    without it (see :func:`warm_up`).

    ``lr_sweep`` (a list of learning rates; Zoology's protocol): every (pattern, width) is trained once per rate,
    with the same seed, data and budget, and the run with the best mean test accuracy is kept; its record lists
    every rate's result under ``lr_sweep``. One rate does not fit every operator at a short budget: on the CPU
    (``benchmarks/results/mqar-mamba2-cpu-trials.json``) pure Mamba2 stays on the in-context guessing plateau for
    1000 steps at 1e-3 and solves the task at 1e-2, pure attention solves it at 1e-3 and stays on its plateau at
    1e-2, DeltaNet and Gated DeltaNet learn at both.

    ``curriculum`` > 0 (default 0.3, the same for every pattern): batches start with only the training settings
    of length <= ``curriculum_len``; the share of rows drawn from the whole mix grows linearly to 1 over that
    fraction of the (planned) steps. Pure attention needs it to leave its loss plateau on long mixes in a
    reasonable number of steps (see the module docstring); models with short convolutions learn either way. It
    does nothing when every training setting is short, or none is."""

    patterns: list = field(default_factory=lambda: ["a f a f"])
    hidden: list[int] = field(default_factory=lambda: [64])
    train: list[tuple] = field(default_factory=lambda: [(32, 4, 2), (64, 4), (64, 8), (64, 16)])  # (L, n[, weight])
    test: list[tuple[int, int]] = field(default_factory=lambda: [(64, 4), (64, 8), (64, 16)])
    vocab_size: int = 1024
    train_examples: int = 20_000  # per train setting
    test_examples: int = 1_000  # per test setting
    steps: int = 1_000
    batch_size: int = 64
    lr: float | dict = 1e-3
    lr_sweep: list[float] | None = None  # learning rates to try per model, the best kept (overrides lr)
    warmup: float = 0.1  # fraction of steps
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    power_a: float = 0.01
    noise: bool = False
    seed: int = 0
    model: dict = field(default_factory=dict)  # HyloConfig fields over default_model_kwargs(hidden)
    device: str = "auto"
    bf16: bool = True
    compile: bool = False
    eval_batch_size: int = 256
    eval_interval: int = 0  # steps between progress evaluations (0: only at the end)
    log_interval: int = 100
    max_time_s: float | None = None
    time_budget_s: float | None = None
    calib_steps: int = 30
    stop_accuracy: float | None = None  # stop a model once the probe (see eval_interval) reaches this
    kernel_warmup: bool = True  # untimed warm-up step before training (compile/autotune off the clock)
    curriculum: float = 0.3  # fraction of the run over which sampling moves from the short settings to the mix
    curriculum_len: int = 128  # "short": training settings of at most this length

    def validate(self) -> None:
        if not self.patterns:
            raise MQARError("patterns is empty: give at least one layer pattern, e.g. 'a f a f'")
        if not self.hidden:
            raise MQARError("hidden is empty: give at least one width, e.g. 64")
        for h in self.hidden:
            _check_int("hidden", h, 1)
        if not self.train or not self.test:
            raise MQARError("train and test need at least one (seq_len, num_pairs) setting each")
        for L, n in [*map(parse_setting, self.train), *map(parse_setting, self.test)]:
            check_setting(self.vocab_size, n, L)
        for name in ("train_examples", "test_examples", "steps", "batch_size", "eval_batch_size", "log_interval"):
            _check_int(name, getattr(self, name), 1)
        _check_int("eval_interval", self.eval_interval, 0)
        _check_int("calib_steps", self.calib_steps, 2)
        if not (isinstance(self.curriculum, (int, float)) and 0 <= self.curriculum <= 1):
            raise MQARError(f"curriculum={self.curriculum!r} is invalid: a fraction of the steps in [0, 1]")
        _check_int("curriculum_len", self.curriculum_len, 1)
        if self.stop_accuracy is not None and not (isinstance(self.stop_accuracy, (int, float))
                                                   and 0 < self.stop_accuracy <= 1):
            raise MQARError(f"stop_accuracy={self.stop_accuracy!r} is invalid: a fraction in (0, 1], or None")
        for name in ("max_time_s", "time_budget_s"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise MQARError(f"{name}={v!r} is invalid: seconds > 0, or None")
        lrs = self.lr.values() if isinstance(self.lr, dict) else [self.lr]
        for v in lrs:
            if not (isinstance(v, (int, float)) and v > 0):
                raise MQARError(f"lr={self.lr!r} is invalid: learning rates must be numbers > 0")
        if self.lr_sweep is not None:
            if isinstance(self.lr_sweep, (str, bytes)) or not isinstance(self.lr_sweep, (list, tuple)) \
                    or not self.lr_sweep or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    and v > 0 for v in self.lr_sweep):
                raise MQARError(f"lr_sweep={self.lr_sweep!r} is invalid: a non-empty list of learning rates > 0, "
                                "or None (use lr)")
        if not 0 <= self.warmup < 1:
            raise MQARError(f"warmup={self.warmup!r} is invalid: a fraction of the steps in [0, 1)")
        for name in self.patterns:
            model_config(name, self.hidden[0], self.vocab_size, self.model)  # raises HyloConfigError early

    def lr_for(self, name: str) -> float:
        if isinstance(self.lr, dict):
            return float(self.lr.get(name, self.lr.get("default", 1e-3)))
        return float(self.lr)

    def lrs_for(self, name: str) -> list[float]:
        """The learning rates a model of pattern ``name`` is trained at: ``lr_sweep``, else ``[lr_for(name)]``."""
        return [float(v) for v in self.lr_sweep] if self.lr_sweep else [self.lr_for(name)]


def mean_accuracy(rec: dict) -> float | None:
    """Mean test accuracy of a run record (None for a failed run)."""
    acc = rec.get("accuracy") or {}
    return None if rec.get("error") or not acc else sum(acc.values()) / len(acc)


def pick_best(records: Sequence[dict]) -> dict:
    """The run with the best mean test accuracy among one model's learning-rate runs (the first on ties; a failed
    run only when all failed), with ``lr_sweep``: each rate's mean accuracy, steps, final loss and error."""
    scored = [(mean_accuracy(r), i) for i, r in enumerate(records)]
    ok = [(a, i) for a, i in scored if a is not None]
    best = dict(records[max(ok, key=lambda t: (t[0], -t[1]))[1]] if ok else records[0])
    if len(records) > 1:
        best["lr_sweep"] = [{"lr": r.get("lr"), "mean_accuracy": a, "steps": r.get("steps"),
                             "final_loss": r.get("final_loss"), "error": r.get("error")}
                            for r, (a, _) in zip(records, scored)]
    return best


def pattern_name(pattern) -> str:
    from ..config import parse_pattern

    if isinstance(pattern, dict):
        if "name" in pattern:
            return str(pattern["name"])
        pattern = pattern.get("layers", "")
    short = {"attn": "a", "swa": "swa", "mamba2": "m2", "deltanet": "d", "gdn": "gdn", "jet": "jet", "ffn": "f"}
    try:
        return " ".join(short[op] for op in parse_pattern(pattern))
    except ValueError:
        return str(pattern)


def model_config(pattern, hidden: int, vocab_size: int, overrides: dict | None = None):
    """The HyloConfig of one MQAR model: defaults for the width, then ``overrides``, then the pattern's own
    fields (a dict pattern may set any HyloConfig field)."""
    from ..config import HyloConfig

    kw = {**default_model_kwargs(hidden), **(overrides or {})}
    if isinstance(pattern, dict):
        kw.update({k: v for k, v in pattern.items() if k != "name"})
    else:
        kw["layers"] = pattern
    kw.update(vocab_size=vocab_size, hidden_size=hidden)
    return HyloConfig(**kw)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def environment() -> dict:
    """Date, device name, library versions and commit, for result files (:func:`hylo.runinfo.metadata`)."""
    from ..runinfo import metadata

    return metadata()


def query_logits(model, x: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, n, V]`` at the query positions only (the LM head is the costly part at vocab 8192)."""
    h = model.hidden_states(x)
    hq = h.gather(1, qpos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    return model.logits(hq)


def mqar_loss(model, x: torch.Tensor, qpos: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the queries (padded query columns carry answer -100 and are ignored)."""
    logits = query_logits(model, x, qpos)
    return F.cross_entropy(logits.float().flatten(0, 1), answers.flatten(), ignore_index=-100)


def _autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, data: MQARData, batch_size: int = 256, bf16: bool = True) -> float:
    """Fraction of queries answered exactly (argmax) on ``data`` (on the model's device)."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    correct = total = 0
    for s in range(0, len(data), batch_size):
        sl = slice(s, s + batch_size)
        with _autocast(device, bf16):
            logits = query_logits(model, data.inputs[sl], data.query_pos[sl])
        c, t = accuracy(logits, data.answers[sl])
        correct, total = correct + c, total + t
    model.train(was)
    return correct / max(total, 1)


def _key(setting: tuple[int, int]) -> str:
    return f"{setting[0]}x{setting[1]}"


def build_data(cfg: HarnessConfig) -> tuple[MQARData, dict[str, MQARData]]:
    """The packed training mix (padded to its longest length) and the test sets (padded to the longest test
    length): two input shapes in all, so kernels compile and autotune twice at most."""
    train = concat([generate(cfg.vocab_size, n, L, max(1, round(cfg.train_examples * w)), seed=cfg.seed * 1000 + i,
                             power_a=cfg.power_a, noise=cfg.noise)
                    for i, (L, n, w) in enumerate(map(parse_train_setting, cfg.train))])
    test = [parse_setting(x) for x in cfg.test]
    L_test = max(L for L, _ in test)
    tests = {_key(s): pad_to(generate(cfg.vocab_size, s[1], s[0], cfg.test_examples,
                                      seed=cfg.seed * 1000 + 500 + j, power_a=cfg.power_a, noise=cfg.noise), L_test)
             for j, s in enumerate(test)}
    return train, tests


def warm_up(model, loss_fn, train: MQARData, tests: dict[str, MQARData], cfg: HarnessConfig,
            device: torch.device) -> float:
    """Run every kernel the training run will use once, off the clock: a forward+backward on the first
    ``batch_size`` training examples (fixed indices: the training sampler is not touched) and the no-grad
    evaluation forwards at the probe's and the final evaluation's batch shapes. The optimizer does not step,
    the gradients are dropped and the RNG states are restored, so training afterwards is the same as without
    the warm-up. Returns the seconds it took."""
    t = time.perf_counter()
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    was = model.training
    model.train()
    idx = torch.arange(cfg.batch_size, device=device) % len(train)
    with _autocast(device, cfg.bf16):
        loss = loss_fn(model, train.inputs[idx], train.query_pos[idx], train.answers[idx])
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    model.zero_grad(set_to_none=True)
    test = next(iter(tests.values()))  # every test set is padded to the same length
    n = len(test)
    rows = {min(n, cfg.eval_batch_size), n % cfg.eval_batch_size}  # full batches and the last partial one
    for r in sorted(r for r in rows if r):
        evaluate(model, dataclasses.replace(test, inputs=test.inputs[:r], query_pos=test.query_pos[:r],
                                            answers=test.answers[:r], targets=test.targets[:r]),
                 cfg.eval_batch_size, cfg.bf16)
    model.train(was)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_rng_state_all(cuda_rng)
    torch.set_rng_state(cpu_rng)
    return time.perf_counter() - t


def train_one(pattern, hidden: int, cfg: HarnessConfig, train: MQARData, tests: dict[str, MQARData],
              device: torch.device, log: Callable[[str], None] = print, deadline: float | None = None) -> dict:
    """Train one model on the mix and score it on every test set. Returns a result record (exceptions are not
    caught here: :func:`run` records them).

    ``deadline`` (a ``time.perf_counter()`` value) is a wall-clock end for the training: the budgeted schedule is
    fitted to it, and a run still going then stops and is scored (``truncated``). A ``KeyboardInterrupt`` (Ctrl-C,
    or ``timeout -s INT``) during training also stops it there and the model is still scored, so what it learned
    is kept; the record says ``interrupted`` and the caller should stop. A second interrupt aborts the scoring."""
    from ..model import HybridLM
    from ..train.schedule import Schedule

    name = pattern_name(pattern)
    torch.manual_seed(cfg.seed)
    mcfg = model_config(pattern, hidden, cfg.vocab_size, cfg.model)
    model = HybridLM(mcfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    longest = max(parse_setting(x)[0] for x in [*cfg.train, *cfg.test])
    state_bytes = sum(b.mixer.state_bytes(longest, torch.bfloat16) for b in model.layers)
    lr = cfg.lr_for(name)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98),
                            **({"fused": True} if device.type == "cuda" else {}))
    total = cfg.steps
    schedule = Schedule("cosine", total, int(round(cfg.warmup * total)), cfg.min_lr_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    calib_from = max(1, cfg.calib_steps // 3)  # the first steps compile and autotune kernels: not timed
    t_calib = 0.0
    loss_fn = torch.compile(mqar_loss) if cfg.compile else mqar_loss
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    N = len(train)
    short_rows = None
    if cfg.curriculum:  # rows of the short settings (build_data concatenates the settings in order)
        sizes = [(L, max(1, round(cfg.train_examples * w))) for L, _, w in map(parse_train_setting, cfg.train)]
        short = torch.cat([torch.full((c,), L <= cfg.curriculum_len) for L, c in sizes])
        assert short.numel() == N, "curriculum: the training set does not match cfg.train"
        if 0 < int(short.sum()) < N:  # all short or none short: the mix itself, no curriculum
            short_rows = short.nonzero().squeeze(1).to(device)
    history: list[dict] = []
    warmup_s = warm_up(model, loss_fn, train, tests, cfg, device) if cfg.kernel_warmup else 0.0
    if cfg.kernel_warmup:
        log(f"  {name} h={hidden}: kernel warm-up {warmup_s:.1f}s (not counted as training time)")
    t0 = time.perf_counter()
    truncated = False
    solved = 0
    loss_acc = torch.zeros((), device=device)
    n_acc = 0
    step = 0
    model.train()
    interrupted = False
    try:
        for step in range(1, cfg.steps + 1):
            if cfg.time_budget_s is not None and step in (calib_from, cfg.calib_steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                if step == calib_from:
                    t_calib = now
                else:  # fit the rest of the run into the budget; the schedule object is shared with LambdaLR
                    dt = (now - t_calib) / (cfg.calib_steps - calib_from)
                    avail = cfg.time_budget_s - (now - t0)
                    if deadline is not None:
                        avail = min(avail, deadline - now)
                    fits = step + int(avail / max(dt, 1e-6))
                    total = max(step + 1, min(cfg.steps, fits))
                    schedule.total_steps = total
                    schedule.warmup_steps = min(schedule.warmup_steps, max(step, int(round(cfg.warmup * total))))
                    log(f"  {name} h={hidden}: {dt * 1e3:.1f} ms/step -> {total} steps in the "
                        f"{cfg.time_budget_s:.0f}s budget")
            idx = torch.randint(0, N, (cfg.batch_size,), device=device, generator=gen)
            ramp = cfg.curriculum * total
            if short_rows is not None and step <= ramp:  # row i keeps its mix draw with probability step/ramp
                pick = short_rows[torch.randint(0, len(short_rows), (cfg.batch_size,), device=device, generator=gen)]
                keep = torch.rand(cfg.batch_size, device=device, generator=gen) < step / ramp
                idx = torch.where(keep, idx, pick)
            with _autocast(device, cfg.bf16):
                loss = loss_fn(model, train.inputs[idx], train.query_pos[idx], train.answers[idx])
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss_acc += loss.detach()
            n_acc += 1
            last = step == total
            now = time.perf_counter()
            over = ((cfg.max_time_s is not None and now - t0 > cfg.max_time_s)
                    or (deadline is not None and now > deadline))
            probe_now = bool(cfg.eval_interval) and step % cfg.eval_interval == 0
            if step % cfg.log_interval == 0 or probe_now or last or over:
                mean = float(loss_acc) / n_acc
                if not math.isfinite(mean):
                    raise FloatingPointError(f"loss is {mean} at step {step} (lr {lr:g}): lower the learning rate")
                rec = {"step": step, "loss": mean, "time_s": time.perf_counter() - t0}
                if probe_now and not last:
                    k = _key(max(map(parse_setting, cfg.test), key=lambda s: (s[1], s[0])))  # hardest, one batch
                    probe = dataclasses.replace(tests[k], **{f: getattr(tests[k], f)[:cfg.eval_batch_size] for f in
                                                             ("inputs", "targets", "query_pos", "answers")})
                    rec[f"acc_{k}"] = evaluate(model, probe, cfg.eval_batch_size, cfg.bf16)
                    if cfg.stop_accuracy is not None and rec[f"acc_{k}"] >= cfg.stop_accuracy:
                        solved = step
                history.append(rec)
                extra = "".join(f" {k} {v:.3f}" for k, v in rec.items() if k.startswith("acc_"))
                log(f"  {name} h={hidden} step {step}/{total} loss {mean:.4f}{extra} ({rec['time_s']:.1f}s)")
                loss_acc.zero_()
                n_acc = 0
            if over and not last:
                truncated = True
                log(f"  {name} h={hidden}: time cap reached at step {step}; evaluating")
            if solved and not last:
                log(f"  {name} h={hidden}: probe accuracy >= {cfg.stop_accuracy} at step {step}; stopping early")
            if last or over or solved:
                break
    except KeyboardInterrupt:  # keep what was learned: score the model as it is, then let the caller stop
        interrupted = truncated = True
        log(f"  {name} h={hidden}: interrupted at step {step}; evaluating (interrupt again to abort)")
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_time = time.perf_counter() - t0
    t1 = time.perf_counter()
    acc = {k: evaluate(model, d, cfg.eval_batch_size, cfg.bf16) for k, d in tests.items()}
    return {"name": name, "layers": mcfg.pattern_short, "hidden": hidden, "params": n_params,
            "state_bytes": state_bytes, "lr": lr, "steps": step, "planned_steps": total, "truncated": truncated,
            "interrupted": interrupted,
            "solved_at": solved or None,
            "warmup_s": round(warmup_s, 2), "train_time_s": round(train_time, 2),
            "eval_time_s": round(time.perf_counter() - t1, 2),
            "final_loss": history[-1]["loss"] if history else None, "accuracy": acc, "history": history,
            "error": None}


def run(cfg: HarnessConfig, log: Callable[[str], None] = print,
        on_result: Callable[[dict], None] | None = None) -> dict:
    """Train and score every (pattern, width); a model that fails is recorded with its error and the run goes on.
    ``on_result`` is called after each model (e.g. to save partial results)."""
    cfg.validate()
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    train, tests = build_data(cfg)
    log(f"MQAR data: {len(train):,} training examples ({', '.join(_key(parse_setting(x)) for x in cfg.train)}), "
        f"{cfg.test_examples:,} per test setting, vocab {cfg.vocab_size} ({time.perf_counter() - t0:.1f}s)")
    train = train.to(device)
    tests = {k: d.to(device) for k, d in tests.items()}
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "patterns"}
    settings["patterns"] = [p if isinstance(p, (str, dict)) else str(p) for p in cfg.patterns]
    result = {"kind": "mqar", "environment": environment(), "settings": settings, "runs": []}
    jobs = [(p, h) for h in cfg.hidden for p in cfg.patterns]
    for i, (pattern, hidden) in enumerate(jobs):
        name = pattern_name(pattern)
        log(f"[{i + 1}/{len(jobs)}] {name} hidden {hidden} ({time.perf_counter() - t0:.0f}s elapsed)")
        tried = []
        for lr in cfg.lrs_for(name):
            one = dataclasses.replace(cfg, lr=lr, lr_sweep=None)
            try:
                rec = train_one(pattern, hidden, one, train, tests, device, log)
                log(f"  {name} h={hidden} lr {lr:g}: " + ", ".join(f"{k} {v:.3f}" for k, v in rec["accuracy"].items())
                    + f" ({rec['steps']} steps, {rec['train_time_s']:.1f}s)")
            except Exception as e:  # noqa: BLE001 - one failing model must not end the study
                rec = {"name": name, "hidden": hidden, "lr": lr, "accuracy": {}, "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=8)}
                log(f"  {name} h={hidden} lr {lr:g} FAILED: {rec['error']}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            tried.append(rec)
            if rec.get("interrupted"):
                break
        rec = pick_best(tried)
        if len(tried) > 1:
            log(f"  {name} h={hidden}: best lr {rec.get('lr', float('nan')):g} of {cfg.lrs_for(name)}")
        result["runs"].append(rec)
        if on_result is not None:
            on_result(result)
        if any(r.get("interrupted") for r in tried):  # the user (or a time limit) asked to stop: keep what ran
            result["interrupted"] = True
            log("interrupted: the remaining models are not trained; the results so far are kept")
            break
    result["table"] = table_rows(result)
    result["total_time_s"] = round(time.perf_counter() - t0, 1)
    return result


def table_rows(result: dict) -> list[dict]:
    """Flat rows: pattern, hidden, seq_len, num_pairs, accuracy (None for failed models)."""
    rows = []
    tests = [parse_setting(s) for s in result["settings"]["test"]]
    for r in result["runs"]:
        for L, n in tests:
            rows.append({"pattern": r["name"], "hidden": r["hidden"], "seq_len": L, "num_pairs": n,
                         "accuracy": r["accuracy"].get(f"{L}x{n}")})
    return rows


def save(result: dict, out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    """``mqar.json`` (and ``mqar.png``) in ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "mqar.json"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(paths["json"])
    if plot:
        from .mqar_plot import plot_result

        png = out / "mqar.png"
        if plot_result(result, png):
            paths["png"] = png
    return paths


# ============================================================================ output and CLI
def print_summary(result: dict, console=None) -> None:
    """Rich table: one row per (pattern, width), one column per test setting."""
    from rich.console import Console
    from rich.table import Table

    import sys

    console = console or Console(width=None if sys.stdout.isatty() else 200)
    tests = [_key(parse_setting(s)) for s in result["settings"]["test"]]
    t = Table(title="MQAR accuracy")
    for col in ("pattern", "hidden", "state", "lr", "steps"):
        t.add_column(col, justify="left" if col == "pattern" else "right")
    for k in tests:
        t.add_column(k, justify="right")
    for r in result["runs"]:
        state = f"{r['state_bytes'] / 1024:.0f} KiB" if r.get("state_bytes") is not None else "-"
        lr = f"{r['lr']:g}" if isinstance(r.get("lr"), (int, float)) else "-"
        if r.get("error"):
            t.add_row(r["name"], str(r["hidden"]), state, lr, "-", *["[red]error[/]"] * len(tests))
            continue
        steps = f"{r['steps']}" + ("*" if r.get("truncated") else "")
        t.add_row(r["name"], str(r["hidden"]), state, lr, steps,
                  *[f"{r['accuracy'][k]:.3f}" if k in r["accuracy"] else "-" for k in tests])
    console.print(t)
    for r in result["runs"]:
        if r.get("error"):
            console.print(f"[red]{r['name']} (hidden {r['hidden']}) failed:[/] {r['error']}")
    if any(r.get("truncated") for r in result["runs"]):
        console.print("* training stopped early at the time cap")


def _greedy_command_class():
    """A typer command class whose list options take several values after one flag (``--pairs 16 32 64``),
    as well as the click way (``--pairs 16 --pairs 32``): following bare words are rewritten as repeats."""
    from typer.core import TyperCommand

    class GreedyListCommand(TyperCommand):
        greedy: tuple[str, ...] = ()

        def parse_args(self, ctx, args):
            out, current, took_first = [], None, False
            for a in args:
                if a == "--":
                    current = None
                    out.append(a)
                elif a.startswith("-") and not a[1:2].isdigit():
                    current = a if a in self.greedy else None
                    took_first = False
                    out.append(a)
                elif current is not None and took_first:
                    out.extend([current, a])
                else:
                    took_first = True
                    out.append(a)
            return super().parse_args(ctx, out)

    return GreedyListCommand


def _numbers(values: list[str], flag: str, kind: type) -> list:
    out = []
    for v in values:
        for part in v.replace(",", " ").split():
            try:
                out.append(kind(part))
            except ValueError:
                raise MQARError(f"{flag} takes {'integers' if kind is int else 'numbers'}, got {part!r}") from None
    return out


def _ints(values: list[str], flag: str) -> list[int]:
    return _numbers(values, flag, int)


def _floats(values: list[str], flag: str) -> list[float]:
    return _numbers(values, flag, float)


def register(app) -> None:
    """Add ``mqar`` to a typer app (``hylo eval``)."""
    import typer

    cls = _greedy_command_class()
    cls.greedy = ("--patterns", "-p", "--hidden", "--seq-lens", "--pairs", "--train", "--lrs")

    @app.command("mqar", cls=cls)
    def mqar_command(
        patterns: List[str] = typer.Option(["a f a f"], "--patterns", "-p",
                                           help="layer patterns, quoted, several after one flag: "
                                                "--patterns 'a f a f' 'gdn f a f'"),
        hidden: List[str] = typer.Option(["128"], "--hidden", help="model widths (several allowed)"),
        seq_lens: List[str] = typer.Option(["64", "128", "256"], "--seq-lens", help="test sequence lengths"),
        pairs: List[str] = typer.Option(["4", "8", "16", "32", "64"], "--pairs",
                                        help="test key-value pair counts (settings with seq_len < 4*pairs "
                                             "are skipped)"),
        train: Optional[List[str]] = typer.Option(None, "--train",
                                                  help="training mix as SEQxPAIRS[*WEIGHT] (e.g. 64x4*4 "
                                                       "256x16 512x64); default: the test grid plus short "
                                                       "easy settings (32x4*3 64x4*3 64x8*2 128x16*2)"),
        steps: int = typer.Option(2000, "--steps", help="optimizer steps per model"),
        batch_size: int = typer.Option(64, "--batch-size"),
        lr: float = typer.Option(1e-3, "--lr", help="peak learning rate (AdamW, warmup then cosine)"),
        lrs: Optional[List[str]] = typer.Option(None, "--lrs",
                                                help="several peak learning rates (Zoology's sweep, e.g. --lrs "
                                                     "1e-3 1e-2): each model is trained at each, the best kept; "
                                                     "overrides --lr"),
        vocab_size: int = typer.Option(1024, "--vocab-size",
                                       help="Zoology uses 8192; attention needs many more steps there"),
        train_examples: int = typer.Option(20_000, "--train-examples", help="per training setting"),
        test_examples: int = typer.Option(1_000, "--test-examples", help="per test setting"),
        swa_window: int = typer.Option(32, "--swa-window", help="window of 'swa' layers"),
        curriculum: float = typer.Option(0.3, "--curriculum",
                                         help="fraction of the steps over which batches move from the training "
                                              "settings of length <= 128 to the whole mix (0: the mix from the "
                                              "start); pure attention needs it on long mixes"),
        noise: bool = typer.Option(False, "--noise/--no-noise", help="random tokens instead of filler 0"),
        seed: int = typer.Option(0, "--seed"),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
        compile_: bool = typer.Option(False, "--compile", help="torch.compile the training step"),
        time_budget: Optional[float] = typer.Option(None, "--time-budget",
                                                    help="seconds of training per model: the run length is "
                                                         "fitted to it after a few timed steps (at most --steps)"),
        max_time: Optional[float] = typer.Option(None, "--max-time", help="hard cap in seconds per model: "
                                                                          "stopped mid-schedule and scored"),
        out: Path = typer.Option(Path("mqar"), "--out", help="folder for mqar.json and mqar.png"),
    ):
        """Multi-query associative recall (Zoology): train small models of each pattern on MQAR and report
        accuracy by sequence length and number of key-value pairs (JSON + plot)."""
        from rich.console import Console

        console = Console()
        try:
            lens, counts = _ints(seq_lens, "--seq-lens"), _ints(pairs, "--pairs")
            test = grid(lens, counts)
            if not test:
                raise MQARError(f"no test setting fits: every seq_len {lens} is < 4 x pairs {counts}")
            skipped = [(L, n) for L in lens for n in counts if L < 4 * n]
            if skipped:
                console.print(f"skipping settings with seq_len < 4*pairs: {', '.join(map(_key, skipped))}")
            sweep = _floats(lrs, "--lrs") if lrs else None
            cfg = HarnessConfig(patterns=list(patterns), hidden=_ints(hidden, "--hidden"),
                                train=[parse_train_setting(s) for s in train] if train else default_train_mix(test),
                                test=test,
                                vocab_size=vocab_size, train_examples=train_examples, test_examples=test_examples,
                                steps=steps, batch_size=batch_size, lr=lr, lr_sweep=sweep, noise=noise,
                                seed=seed, curriculum=curriculum,
                                model={"swa_window": swa_window}, device=device, compile=compile_,
                                max_time_s=max_time, time_budget_s=time_budget)
            cfg.validate()
        except ValueError as e:  # MQARError, HyloConfigError
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(1)
        result = run(cfg, log=console.print, on_result=lambda r: save(r, out, plot=False))
        paths = save(result, out)
        print_summary(result, console)
        console.print("wrote " + ", ".join(str(p) for p in paths.values()))
        if all(r.get("error") for r in result["runs"]):
            raise typer.Exit(2)
