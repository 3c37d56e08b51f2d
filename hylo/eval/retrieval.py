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

Greedy accuracy is all-or-nothing: a small model that has started to use the needle still continues the prose, and
its heat map is all zeros. So every prompt is also scored by teacher forcing: the log-probability of the key's
tokens (``" " + key`` after "The pass key is") fed as the answer, against the same for a *control* prompt, and
``key_logprob_gain`` = logp(key | prompt) - logp(key | control), in nats per key token. The control is the same
prompt (same filler, depth and length) whose needle holds a different random key, with a different digit at every
position and, where one is found, as many needle tokens. This control rather than "no needle": the two prompts
then differ only in the key's digits, so the gain measures the use of *these* digits, not the generic effect of
having seen a number after "The pass key is" (which a no-needle control would count as retrieval); and it costs the
same (one prefill of the same shape). A model that ignores the context scores ~0; one that copies, > 0, before greedy
decoding gets the key right. ``key_logprob_gain_first`` is the gain of the key's first token that holds a digit
(a small BPE may split off the space) alone: read from the question, not continued from a started key by matching
its first digits, as an induction head would.

For hylo models the prompt's teacher-forced score comes from the greedy run's own prefill: its cache is copied and
the key's tokens are fed by decode steps (no new shapes, one extra prefill per batch: the control's).
"""

from __future__ import annotations

import contextlib
import copy
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


def _is_hylo(model) -> bool:
    return hasattr(model, "new_cache") and hasattr(model, "decode_step")


def _fork_cache(cache):
    """An independent copy of a decode cache (every state tensor cloned), to continue it two ways."""
    new = copy.copy(cache)
    new.states = [{k: (t.clone() if torch.is_tensor(t) else copy.deepcopy(t)) for k, t in st.items()}
                  for st in cache.states]
    new.pos = cache.pos.clone()
    return new


def _teacher_force(model, cache, last_logits: torch.Tensor, key_ids: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` log-probs of ``key_ids`` fed one by one after a prefilled ``cache`` whose last logits are
    ``last_logits`` (log-softmax in float32)."""
    def lp(logits, col):
        return torch.log_softmax(logits.float(), -1).gather(1, key_ids[:, col:col + 1])

    out = [lp(last_logits, 0)]
    for i in range(1, key_ids.shape[1]):
        out.append(lp(model.decode_step(key_ids[:, i - 1].contiguous(), cache), i))
    return torch.cat(out, 1)


@torch.no_grad()
def key_logprobs(model, input_ids: torch.Tensor, key_ids: torch.Tensor, precision: Precision | None = None):
    """Teacher-forced log-probs ``[B, K]`` (float32) of ``key_ids[B, K]`` as the continuation of equal-length
    prompts ``input_ids[B, L]``: entry ``[b, i]`` is log p(key_ids[b, i] | prompt b, key_ids[b, :i]).

    hylo: one prefill with a cache and ``K - 1`` decode steps (the shapes greedy decoding uses); other models: one
    forward over ``[B, L + K - 1]`` keeping the last ``K`` logits. Rows with shorter keys pad theirs at the end; the
    padded columns depend only on earlier columns of the same row, so the caller masks them."""
    from .common import logits_last

    ctx = precision.context(input_ids.device) if precision is not None else contextlib.nullcontext()
    B, L = input_ids.shape
    K = key_ids.shape[1]
    with ctx:
        if _is_hylo(model):
            cache = model.new_cache(B, L + K)
            h = model.hidden_states(input_ids, cache=cache)
            return _teacher_force(model, cache, model.logits(h[:, -1]), key_ids)
        logits = logits_last(model, torch.cat([input_ids, key_ids[:, :-1]], 1), K)
        return torch.log_softmax(logits.float(), -1).gather(2, key_ids[:, :, None])[:, :, 0]


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, precision: Precision | None = None,
                    key_ids: torch.Tensor | None = None):
    """Greedy continuation ``[B, max_new_tokens]`` of equal-length prompts ``[B, L]`` (no padding).

    With ``key_ids[B, K]``, returns ``(tokens, key_logprobs)`` (see :func:`key_logprobs`): for hylo models from the
    same prefill (its cache is copied and the key fed by decode steps), for others by a separate forward."""
    device = input_ids.device
    ctx = precision.context(device) if precision is not None else contextlib.nullcontext()
    with ctx:
        if _is_hylo(model):  # hylo: batched prefill + decode steps
            B, L = input_ids.shape
            K = 0 if key_ids is None else key_ids.shape[1]
            cache = model.new_cache(B, L + max(max_new_tokens, K))
            h = model.hidden_states(input_ids, cache=cache)
            last = model.logits(h[:, -1])
            scores = None if key_ids is None else _teacher_force(model, _fork_cache(cache), last, key_ids)
            nxt = last.argmax(-1)
            out = [nxt]
            for _ in range(max_new_tokens - 1):
                nxt = model.decode_step(nxt, cache).argmax(-1)
                out.append(nxt)
            tokens = torch.stack(out, 1)
            return tokens if key_ids is None else (tokens, scores)
        pad = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        pad = pad[0] if isinstance(pad, (list, tuple)) else pad
        gen = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=1, num_beams=1,
                             pad_token_id=pad if pad is not None else 0)
    tokens = gen[:, input_ids.shape[1]:]
    return tokens if key_ids is None else (tokens, key_logprobs(model, input_ids, key_ids, precision))


def control_key(key: str, rng: np.random.Generator, needle_tokens: Callable[[str], int] | None = None,
                tries: int = 100) -> str:
    """A random key as long as ``key`` with a different digit at every position (no leading zero), so copying any
    part of it never helps the true key; among ``tries`` draws, the first whose needle has as many tokens as
    ``key``'s (``needle_tokens(key)``), so the control prompt keeps the same filler; else the last draw."""
    want = needle_tokens(key) if needle_tokens is not None else None
    cand = key
    for _ in range(tries):
        digits = [(int(d) + int(rng.integers(1, 10))) % 10 if d.isdigit() else d for d in key]
        if digits and digits[0] == 0 and len(digits) > 1:
            continue
        cand = "".join(str(d) for d in digits)
        if want is None or needle_tokens(cand) == want:
            return cand
    return cand


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
                      key_logprob: bool = True, progress: bool = False,
                      on_length: Callable[[dict], None] | None = None) -> dict:
    """Passkey accuracy per (length, depth) over ``trials`` prompts each, and the teacher-forced key log-prob gain
    (see the module doc).

    ``model`` is a loaded model or a path :func:`hylo.loading.load` opens. The prompts of one length run in
    batches of ``batch_size`` rows (default: as many as fit in ``batch_tokens`` prompt tokens), each one prefill and
    a few greedy decode steps, plus (``key_logprob``) one prefill of the control prompts. ``generate(model,
    ids[B, L], n) -> ids[B, n]`` replaces greedy decoding (tests, other engines; the key is then scored by its own
    prefill). ``on_length(result)`` is called after each length with the result so far (``complete`` false until
    the last), so a caller can save partial results. Returns a dict with ``accuracy`` (a lengths x depths matrix),
    ``overall``, ``key_logprob_gain`` (same shape, nats per key token) and its summaries, and every trial.
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
    ctrl_rng = np.random.default_rng([seed, 1])  # its own stream: the keys and fillers do not change with it
    ids = hay.tokens(4 * max(lengths) + 1024)  # room for different stretches of text per trial
    enc = _encoder(tokenizer)
    needle_tokens = lambda k: len(enc(NEEDLE.format(key=k)))  # noqa: E731
    prompts: dict[int, list[Prompt]] = {}
    controls: dict[int, list[Prompt]] = {}
    key_ids: dict[int, list[list[int]]] = {}
    first_digit: dict[int, list[int]] = {}  # per prompt: index of the key's first token with a digit
    key_tokens = 0
    for length in lengths:
        prompts[length], controls[length], key_ids[length], first_digit[length] = [], [], [], []
        for depth in depths:
            for _ in range(trials):
                key = str(int(rng.integers(10_000, 100_000)))
                n_fill = _filler_len(length, *_parts(tokenizer, key, bos))
                if n_fill > len(ids):
                    raise EvalError(f"haystack holds {len(ids)} tokens; {n_fill} needed")
                offset = int(rng.integers(0, len(ids) - n_fill + 1))
                prompts[length].append(build_prompt(tokenizer, ids, length, depth, key, offset, bos))
                key_ids[length].append(enc(" " + key))
                first_digit[length].append(next((i for i, t in enumerate(key_ids[length][-1])
                                                 if re.search(r"\d", tokenizer.decode([t]))), 0))
                key_tokens = max(key_tokens, len(key_ids[length][-1]))
                if key_logprob:
                    other = control_key(key, ctrl_rng, needle_tokens)
                    n_other = _filler_len(length, *_parts(tokenizer, other, bos))  # n_fill unless no equal draw
                    controls[length].append(build_prompt(tokenizer, ids, length, depth, other,
                                                         min(offset, len(ids) - n_other), bos))
        top = max(max(p.ids) for p in prompts[length] + controls[length])
        check_vocab(model, top, f"prompts of length {length}")
    if key_logprob:
        needle_key = [_find_sub(p.ids[p.needle_at:p.needle_at + p.needle_len], k) for length in lengths
                      for p, k in zip(prompts[length], key_ids[length])]
        if not all(needle_key):
            warnings.warn(f"{needle_key.count(False)} of {len(needle_key)} needles do not hold the key's tokens as "
                          "the answer tokenizes them (' ' + key); the key log-prob scores another tokenization")
    t_prompts = time.perf_counter()
    if max_new_tokens is None:
        max_new_tokens = key_tokens + 2

    from .ppl import _progress

    def result(done: list[int], seconds: float, by_len: dict) -> dict:
        acc = np.zeros((len(done), len(depths)))
        trials_out = []
        for li, length in enumerate(done):
            for k, (p, a) in enumerate(zip(prompts[length], answers[length])):
                ok = score_answer(a, p.key)
                acc[li, k // trials] += ok / trials
                row = {"length": length, "depth": p.depth, "actual_depth": round(p.actual_depth, 4), "key": p.key,
                       "answer": a, "correct": ok, "needle_at": p.needle_at, "haystack_offset": p.offset}
                if key_logprob:
                    sc = scores[length][k]
                    row.update(control_key=controls[length][k].key, key_tokens=len(key_ids[length][k]),
                               key_logprob=round(sc[0], 4), key_logprob_control=round(sc[1], 4),
                               key_logprob_gain=round(sc[0] - sc[1], 4), key_logprob_gain_first=round(sc[2], 4))
                trials_out.append(row)
        out = {
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
        }
        if key_logprob:
            out.update(_gain_summary(done, depths, trials, scores))
        out["results"] = trials_out
        return out

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    answers: dict[int, list[str]] = {}
    scores: dict[int, list[tuple[float, float, float]]] = {}  # per prompt: true, control (nats/token), first gain
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
                answers[length], scores[length] = [], []
                n_batches[str(length)] = []
                for chunk in even_batches(len(ps), rows):
                    x = torch.tensor([ps[i].ids for i in chunk], dtype=torch.long, device=dev)
                    if not key_logprob:
                        res = (generate(model, x, max_new_tokens) if generate is not None
                               else greedy_generate(model, x, max_new_tokens, prec))
                    else:
                        keys = [key_ids[length][i] for i in chunk]
                        kx = torch.tensor([k + k[-1:] * (max(map(len, keys)) - len(k)) for k in keys],
                                          dtype=torch.long, device=dev)  # padded with the last key token
                        if generate is not None:
                            res, lp = generate(model, x, max_new_tokens), key_logprobs(model, x, kx, prec)
                        else:
                            res, lp = greedy_generate(model, x, max_new_tokens, prec, key_ids=kx)
                        xc = torch.tensor([controls[length][i].ids for i in chunk], dtype=torch.long, device=dev)
                        lpc = key_logprobs(model, xc, kx, prec)
                        scores[length] += _per_prompt(lp, lpc, [len(k) for k in keys],
                                                      [first_digit[length][i] for i in chunk])
                    answers[length] += [tokenizer.decode(row, skip_special_tokens=True) for row in res.tolist()]
                    n_batches[str(length)].append(len(chunk))
                    bar.advance(task, len(chunk))
                by_len[str(length)] = round(time.perf_counter() - t_len, 3)
                out = result(lengths[:li + 1], time.perf_counter() - t0, by_len)
                if progress:
                    gain = (f", key log-prob gain {out['key_logprob_gain_by_length'][str(length)]:+.3f} nats/token"
                            if key_logprob else "")
                    bar.console.print(f"length {length:,}: accuracy {out['by_length'][str(length)]:.3f}{gain} "
                                      f"({len(ps)} prompts in {len(n_batches[str(length)])} batches, "
                                      f"{by_len[str(length)]:.1f} s)", highlight=False)
                if on_length is not None:
                    on_length(out)
    finally:
        model.train(was_training)
    return out


def _find_sub(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def _per_prompt(lp: torch.Tensor, lpc: torch.Tensor, n: list[int],
                first: list[int]) -> list[tuple[float, float, float]]:
    """Per row: mean log-prob per key token (the first ``n[row]``) with the needle and with the control, and the gain
    of token ``first[row]``."""
    lp, lpc = lp.float().cpu(), lpc.float().cpu()
    mask = torch.arange(lp.shape[1])[None] < torch.tensor(n)[:, None]
    t = (lp * mask).sum(1) / mask.sum(1)
    c = (lpc * mask).sum(1) / mask.sum(1)
    rows = torch.arange(lp.shape[0])
    idx = torch.tensor(first)
    g1 = lp[rows, idx] - lpc[rows, idx]
    return [(float(a), float(b), float(f)) for a, b, f in zip(t, c, g1)]


def _gain_summary(done: list[int], depths: list[float], trials: int, scores: dict) -> dict:
    """The key log-prob fields of the result: lengths x depths matrices, per length, overall."""
    t, c, f = np.moveaxis(np.array([scores[n] for n in done], dtype=float).reshape(len(done), len(depths), trials, 3),
                          -1, 0)  # per prompt: true key, control key, first-token gain
    g = t - c
    se = (g.std(-1, ddof=1) / math.sqrt(trials)).round(4).tolist() if trials > 1 else None
    r = lambda a: np.round(a, 4).tolist()  # noqa: E731
    return {
        "key_logprob_unit": "nats per key token",
        "key_logprob_control_prompt": ("the same prompt with a different random key in the needle (a different "
                                       "digit at every position)"),
        "key_logprob": r(t.mean(-1)),
        "key_logprob_control": r(c.mean(-1)),
        "key_logprob_gain": r(g.mean(-1)),
        "key_logprob_gain_se": se,
        "key_logprob_gain_by_length": {str(n): round(float(g[i].mean()), 4) for i, n in enumerate(done)},
        "key_logprob_gain_first_by_length": {str(n): round(float(f[i].mean()), 4) for i, n in enumerate(done)},
        "key_logprob_gain_overall": round(float(g.mean()), 4) if len(done) else float("nan"),
    }


def plot_heatmap(result: dict, path: str | os.PathLike, title: str | None = None) -> Path:
    """Accuracy heat map (lengths as rows, depths as columns, every cell annotated) saved as a PNG; with a second
    panel of the key log-prob gain (diverging colours centred on 0) when the result has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = np.asarray(result["accuracy"], dtype=float)
    lengths, depths = result["lengths"], result["depths"]
    gain = result.get("key_logprob_gain")
    gain = None if gain is None else np.asarray(gain, dtype=float).reshape(acc.shape)
    panels = 1 if gain is None else 2
    w, h = 1.2 + 1.1 * len(depths), 1.2 + 0.6 * len(lengths)
    fig, axes = plt.subplots(1, panels, figsize=(w * panels, h + (0.3 if gain is not None else 0)), squeeze=False)

    def draw(ax, m, norm, cmap, fmt, dark, label):
        im = ax.imshow(m, cmap=cmap, aspect="auto", **norm)
        ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_yticks(range(len(lengths)), [f"{n:,}" for n in lengths])
        ax.set_xlabel("needle depth")
        ax.set_ylabel("context length (tokens)")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, fmt(m[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if dark(m[i, j]) else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)

    name = Path(str(result.get("model", ""))).name
    draw(axes[0, 0], acc, dict(vmin=0.0, vmax=1.0), "RdYlGn", lambda v: f"{v:.2f}", lambda v: not 0.25 < v < 0.85,
         "accuracy")
    acc_title = (f"greedy accuracy (overall {result.get('overall', 0):.2f})" if gain is not None else
                 title or f"passkey retrieval: {name} ({result.get('trials')} trials/cell, overall "
                 f"{result.get('overall', 0):.2f})")
    axes[0, 0].set_title(acc_title, fontsize=9)
    if gain is not None:
        v = max(0.05, float(np.nanmax(np.abs(gain))) if np.isfinite(gain).any() else 0.05)
        draw(axes[0, 1], gain, dict(vmin=-v, vmax=v), "RdBu", lambda x: f"{x:+.2f}", lambda x: abs(x) > 0.6 * v,
             "nats / key token")
        axes[0, 1].set_title(f"key log-prob gain over a control key (overall "
                             f"{result.get('key_logprob_gain_overall', float('nan')):+.3f})", fontsize=9)
        fig.suptitle(title or f"passkey retrieval: {name} ({result.get('trials')} trials/cell)", fontsize=10)
    fig.tight_layout()
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p
