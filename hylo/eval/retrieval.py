"""Passkey retrieval (needle in a haystack) from real text: can the model recall a number seen long ago?

Each prompt is ``length`` tokens of the model's tokenizer::

    [BOS] intro | haystack text ... needle ... haystack text | question

The haystack is a random stretch of real prose (default: the held-out Gutenberg shard); the needle ("The pass key is
NNNNN. Remember it. NNNNN is the pass key.") sits at a relative ``depth`` of the haystack part (0 = right after the
intro, 1 = right before the question). The pieces are tokenized separately and joined as token ids, so the length is
exact and the needle's tokens are the same at every depth. The model greedily decodes a few tokens after "The pass
key is"; a trial is correct when the first run of digits it writes equals the key. Accuracy is reported per
(length, depth) and drawn as a heat map.

Generation uses hylo's decode cache (``new_cache``, one batched prefill, ``decode_step``) for hylo models and
``generate`` (greedy) for other transformers models; every prompt of a batch has the same length, so nothing is
padded. Prompts of one length run in as few batches as ``batch_tokens`` allows (sizes differing by at most one, so
the kernels see few shapes); nothing is captured or compiled per prompt. The tokenizer's encoder is built once per
tokenizer: building it costs ~0.1 s (a JSON round trip of the whole vocabulary), which per encode call made prompt
building, not the model, the bulk of the run time before.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .common import EvalError, Precision, check_vocab, prefix_token_id

INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_BATCH_TOKENS = 32768  # prompt tokens per batch when no batch size is given

Generate = Callable[[torch.nn.Module, torch.Tensor, int], torch.Tensor]


def default_haystack() -> Path | None:
    """``$HYLO_HAYSTACK``, else the held-out Gutenberg shard in ``shared/data`` beside the repository, if present."""
    env = os.environ.get("HYLO_HAYSTACK")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]
    for p in (repo.parent / "shared" / "data" / "corpus" / "gutenberg_val.txt.gz",
              Path("/work/shared/data/corpus/gutenberg_val.txt.gz")):
        if p.is_file():
            return p
    return None


def _encoder(tok) -> Callable[[str], list[int]]:
    """``text -> ids`` without special tokens (special-token text stays text, as in :mod:`hylo.eval.ppl`), through
    the tokenizer's cached fast encoder."""
    from .ppl import _fast_encoder

    fast = _fast_encoder(tok)
    if fast is None:
        return lambda text: list(tok(text, add_special_tokens=False)["input_ids"])
    return lambda text: list(fast.encode(text, add_special_tokens=False).ids)


def _encode(tok, text: str) -> list[int]:
    return _encoder(tok)(text)


class Haystack:
    """Token ids of real text to cut filler from, read lazily up to the number of tokens needed."""

    def __init__(self, path: str | os.PathLike, tok):
        from .ppl import read_text, split_documents

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise EvalError(f"haystack {self.path}: no such file (pass a text or .txt.gz file with --haystack)")
        text = read_text(self.path)
        self.text = "\n\n".join(split_documents(text)) if "<|endoftext|>" in text else text
        if not self.text.strip():
            raise EvalError(f"haystack {self.path}: holds no text")
        self.tok = tok
        self.ids = np.zeros(0, dtype=np.int64)
        self._chars = 0
        self.repeated = False

    def tokens(self, n: int) -> np.ndarray:
        """At least ``n`` token ids (the text is tokenized further as needed, and repeated if too short)."""
        while len(self.ids) < n and self._chars < len(self.text):
            self._chars = min(len(self.text), max(2 * self._chars, 8 * n + 4096))
            self.ids = np.asarray(_encode(self.tok, self.text[: self._chars]), dtype=np.int64)
        if len(self.ids) < n:
            self.repeated = True
            self.ids = np.tile(self.ids, -(-n // len(self.ids)))
        return self.ids


@dataclass
class Prompt:
    ids: list[int]
    key: str
    depth: float  # requested
    needle_at: int  # index of the needle's first token in ids
    needle_len: int
    filler_start: int  # index of the first filler token in ids
    filler_len: int
    offset: int  # where the filler was cut from the haystack

    @property
    def actual_depth(self) -> float:
        return (self.needle_at - self.filler_start) / self.filler_len if self.filler_len else 0.0


def build_prompt(tok, haystack_ids: np.ndarray, length: int, depth: float, key: str, offset: int = 0,
                 prefix: int | None = None) -> Prompt:
    """A prompt of exactly ``length`` tokens with the needle for ``key`` at relative ``depth`` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise EvalError(f"depth must be in [0, 1], got {depth}")
    head, needle, question = _parts(tok, key, prefix)
    n_fill = _filler_len(length, head, needle, question)
    if offset + n_fill > len(haystack_ids):
        raise EvalError(f"haystack holds {len(haystack_ids)} tokens; {offset + n_fill} needed")
    filler = haystack_ids[offset: offset + n_fill].tolist()
    at = int(round(depth * n_fill))
    ids = head + filler[:at] + needle + filler[at:] + question
    assert len(ids) == length
    return Prompt(ids, key, depth, len(head) + at, len(needle), len(head), n_fill, offset)


def _parts(tok, key: str, prefix: int | None) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the head (prefix + intro), the needle for ``key`` and the question."""
    enc = _encoder(tok)
    return ([prefix] if prefix is not None else []) + enc(INTRO), enc(NEEDLE.format(key=key)), enc(QUESTION)


def _filler_len(length: int, head: list[int], needle: list[int], question: list[int]) -> int:
    n_fill = length - len(head) - len(needle) - len(question)
    if n_fill < 0:
        raise EvalError(f"length {length} is too short: the intro, needle and question alone take "
                        f"{length - n_fill} tokens of this tokenizer")
    return n_fill


def even_batches(n: int, batch_size: int) -> list[range]:
    """``range(n)`` cut into ``ceil(n / batch_size)`` consecutive batches whose sizes differ by at most one (fewer
    distinct shapes than full batches and a short last one)."""
    k = max(1, math.ceil(n / batch_size)) if n else 0
    bounds = [round(i * n / k) for i in range(k + 1)] if k else [0]
    return [range(bounds[i], bounds[i + 1]) for i in range(k)]


def score_answer(text: str, key: str) -> bool:
    """True when the first run of digits in the generated ``text`` is exactly ``key``."""
    m = re.search(r"\d+", text)
    return m is not None and m.group() == key


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, precision: Precision | None = None):
    """Greedy continuation ``[B, max_new_tokens]`` of equal-length prompts ``[B, L]`` (no padding)."""
    device = input_ids.device
    ctx = precision.context(device) if precision is not None else contextlib.nullcontext()
    with ctx:
        if hasattr(model, "new_cache") and hasattr(model, "decode_step"):  # hylo: batched prefill + decode steps
            B, L = input_ids.shape
            cache = model.new_cache(B, L + max_new_tokens)
            h = model.hidden_states(input_ids, cache=cache)
            nxt = model.logits(h[:, -1]).argmax(-1)
            out = [nxt]
            for _ in range(max_new_tokens - 1):
                nxt = model.decode_step(nxt, cache).argmax(-1)
                out.append(nxt)
            return torch.stack(out, 1)
        pad = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        pad = pad[0] if isinstance(pad, (list, tuple)) else pad
        gen = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=1, num_beams=1,
                             pad_token_id=pad if pad is not None else 0)
        return gen[:, input_ids.shape[1]:]


def _parse_floats(values: Sequence[float]) -> list[float]:
    out = [float(v) for v in values]
    bad = [v for v in out if not 0.0 <= v <= 1.0]
    if bad or not out:
        raise EvalError(f"depths must be numbers in [0, 1], got {list(values)}")
    return out


def passkey_retrieval(model, tokenizer=None, *, lengths: Sequence[int] = DEFAULT_LENGTHS,
                      depths: Sequence[float] = DEFAULT_DEPTHS, trials: int = 5,
                      haystack: str | os.PathLike | None = None, seed: int = 0, batch_size: int | None = None,
                      batch_tokens: int = DEFAULT_BATCH_TOKENS, device=None, dtype: str | None = None,
                      max_new_tokens: int | None = None, prefix: bool = True, generate: Generate | None = None,
                      progress: bool = False, on_length: Callable[[dict], None] | None = None) -> dict:
    """Passkey accuracy per (length, depth) over ``trials`` prompts each (see the module doc).

    ``model`` is a loaded model or a path :func:`hylo.loading.load` opens. The prompts of one length run in
    batches of ``batch_size`` rows (default: as many as fit in ``batch_tokens`` prompt tokens), each one prefill and
    a few greedy decode steps. ``generate(model, ids[B, L], n) -> ids[B, n]`` replaces greedy decoding (tests, other
    engines). ``on_length(result)`` is called after each length with the result so far (``complete`` false until
    the last), so a caller can save partial results. Returns a dict with ``accuracy`` (a lengths x depths matrix),
    ``overall`` and every trial.
    """
    from .common import load_for_eval, prepare_loaded, resolve_device

    lengths = [int(x) for x in lengths]
    if not lengths or any(x < 1 for x in lengths):
        raise EvalError(f"lengths must be positive token counts, got {lengths}")
    depths = _parse_floats(depths)
    if trials < 1:
        raise EvalError(f"trials must be >= 1, got {trials}")
    if batch_size is not None and batch_size < 1:
        raise EvalError(f"batch_size must be >= 1 (or None: from batch_tokens), got {batch_size}")
    if batch_tokens < 1:
        raise EvalError(f"batch_tokens must be >= 1, got {batch_tokens}")
    hay_path = haystack if haystack is not None else default_haystack()
    if hay_path is None:
        raise EvalError("no haystack text: pass one (--haystack PATH, a text or .txt.gz file); the default "
                        "shared/data/corpus/gutenberg_val.txt.gz was not found")
    t_load = time.perf_counter()
    if isinstance(model, (str, os.PathLike)):
        model_name = str(model)
        if dtype in (None, "auto") and resolve_device(device).type == "cuda":
            dtype = "bf16"  # decoding: bf16 weights and caches
        model, tokenizer, dev, prec = load_for_eval(str(model), tokenizer, device, dtype)
    else:
        model_name = str(getattr(model, "name_or_path", "") or type(model).__name__)
        model, tokenizer, dev, prec = prepare_loaded(model, tokenizer, device, dtype)
    hay = Haystack(hay_path, tokenizer)
    bos = prefix_token_id(tokenizer) if prefix else None
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and max(lengths) > max_pos:
        warnings.warn(f"length {max(lengths)} exceeds the model's max_position_embeddings {max_pos}")

    # every prompt first (cheap: a few encoder calls each), so a bad length fails before any model time
    rng = np.random.default_rng(seed)
    ids = hay.tokens(4 * max(lengths) + 1024)  # room for different stretches of text per trial
    enc = _encoder(tokenizer)
    prompts: dict[int, list[Prompt]] = {}
    key_tokens = 0
    for length in lengths:
        prompts[length] = []
        for depth in depths:
            for _ in range(trials):
                key = str(int(rng.integers(10_000, 100_000)))
                n_fill = _filler_len(length, *_parts(tokenizer, key, bos))
                if n_fill > len(ids):
                    raise EvalError(f"haystack holds {len(ids)} tokens; {n_fill} needed")
                offset = int(rng.integers(0, len(ids) - n_fill + 1))
                prompts[length].append(build_prompt(tokenizer, ids, length, depth, key, offset, bos))
                key_tokens = max(key_tokens, len(enc(" " + key)))
        check_vocab(model, max(max(p.ids) for p in prompts[length]), f"prompts of length {length}")
    t_prompts = time.perf_counter()
    if max_new_tokens is None:
        max_new_tokens = key_tokens + 2
    gen = generate or (lambda m, x, n: greedy_generate(m, x, n, prec))

    from .ppl import _progress

    def result(done: list[int], seconds: float, by_len: dict) -> dict:
        acc = np.zeros((len(done), len(depths)))
        trials_out = []
        for li, length in enumerate(done):
            for k, (p, a) in enumerate(zip(prompts[length], answers[length])):
                ok = score_answer(a, p.key)
                acc[li, k // trials] += ok / trials
                trials_out.append({"length": length, "depth": p.depth, "actual_depth": round(p.actual_depth, 4),
                                   "key": p.key, "answer": a, "correct": ok, "needle_at": p.needle_at,
                                   "haystack_offset": p.offset})
        return {
            "model": model_name,
            "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
            "haystack": str(hay.path),
            "haystack_repeated": hay.repeated,
            "complete": len(done) == len(lengths),
            "lengths": list(done),
            "lengths_requested": lengths,
            "depths": depths,
            "trials": trials,
            "seed": seed,
            "max_new_tokens": max_new_tokens,
            "accuracy": acc.tolist(),
            "overall": float(acc.mean()) if len(done) else float("nan"),
            "by_length": {str(length): float(acc[i].mean()) for i, length in enumerate(done)},
            "device": str(dev),
            "precision": prec.name,
            "seconds": seconds,
            "seconds_by_length": by_len,
            "setup_seconds": round(t_prompts - t_load, 3),  # loading, haystack and prompts
            "batches": n_batches,
            "results": trials_out,
        }

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    answers: dict[int, list[str]] = {}
    by_len: dict[str, float] = {}
    n_batches: dict[str, list[int]] = {}
    out: dict = {}
    try:
        with _progress(progress, "prompts") as bar:
            task = bar.add_task("passkey prompts", total=sum(len(v) for v in prompts.values()))
            for li, (length, ps) in enumerate(prompts.items()):
                t_len = time.perf_counter()
                rows = batch_size or max(1, batch_tokens // length)
                bar.update(task, description=f"passkey, {length:,} tokens")
                answers[length] = []
                n_batches[str(length)] = []
                for chunk in even_batches(len(ps), rows):
                    x = torch.tensor([ps[i].ids for i in chunk], dtype=torch.long, device=dev)
                    res = gen(model, x, max_new_tokens)
                    answers[length] += [tokenizer.decode(row, skip_special_tokens=True) for row in res.tolist()]
                    n_batches[str(length)].append(len(chunk))
                    bar.advance(task, len(chunk))
                by_len[str(length)] = round(time.perf_counter() - t_len, 3)
                out = result(lengths[:li + 1], time.perf_counter() - t0, by_len)
                if progress:
                    bar.console.print(f"length {length:,}: accuracy {out['by_length'][str(length)]:.3f} "
                                      f"({len(ps)} prompts in {len(n_batches[str(length)])} batches, "
                                      f"{by_len[str(length)]:.1f} s)", highlight=False)
                if on_length is not None:
                    on_length(out)
    finally:
        model.train(was_training)
    return out


def plot_heatmap(result: dict, path: str | os.PathLike, title: str | None = None) -> Path:
    """Accuracy heat map (lengths as rows, depths as columns, every cell annotated) saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = np.asarray(result["accuracy"], dtype=float)
    lengths, depths = result["lengths"], result["depths"]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(depths), 1.2 + 0.6 * len(lengths)))
    im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_yticks(range(len(lengths)), [f"{n:,}" for n in lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (tokens)")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=9,
                    color="black" if 0.25 < acc[i, j] < 0.85 else "white")
    ax.set_title(title or f"passkey retrieval: {Path(str(result.get('model', ''))).name} "
                 f"({result.get('trials')} trials/cell, overall {result.get('overall', 0):.2f})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="accuracy")
    fig.tight_layout()
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p
