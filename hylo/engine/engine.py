"""`Engine`: prompts in, tokens and text out, on one preallocated cache with CUDA-graphed decode steps.

How a call runs:

1. Prompts (text through the tokenizer, or token ids) are checked and sorted by length; prompts of equal length
   share rows of the cache. The batch is padded to a *bucket* size (1, 2, 4, ... up to ``max_batch_size``)
   with dummy rows, so one captured graph per bucket serves every batch size.
2. Prefill: the rows go back to the meta-token state, then each group of equal-length prompts is run through the
   parallel forward into its own rows of the cache (a view sharing storage), in chunks of ``prefill_chunk``
   tokens. Recurrent operators have no notion of padding, so ragged prompts are never padded; rows differ only
   in their positions (``cache.pos``), which the decode step takes per row.
3. Decode: each step is one graph replay (every layer, norm, LM head) plus sampling on the device. Finished rows
   keep stepping with their position held, so shapes stay static. Stop tokens and length limits are tracked on
   the device; the host reads each step's tokens one step behind (the next step is already queued) to detokenize,
   stream and check stop strings.

Text is decoded incrementally (a window of recent tokens, holding back an incomplete UTF-8 character), so
streamed deltas never split a multi-byte character and add up to the final text.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .runner import DecodeRunner, reset_cache, row_view
from .sampling import sample


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature=0`` is greedy.

    ``seed`` makes sampling reproducible for the same batch (one generator for the whole batch).
    ``stop_token_ids`` (plus the tokenizer's EOS unless ``ignore_eos``) end a row and are kept as its last token;
    ``stop_strings`` end a row when its text contains one, and the text is cut before it.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 64
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    ignore_eos: bool = False

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first bad value."""
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        p = self.top_p
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        m = self.max_new_tokens
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {m!r}")
        for i in self.stop_token_ids:
            if not isinstance(i, int) or isinstance(i, bool) or i < 0 or (vocab_size is not None and i >= vocab_size):
                raise ValueError(f"stop_token_ids must be token ids in [0, {vocab_size}), got {i!r}")
        if isinstance(self.stop_strings, str):
            raise ValueError(f"stop_strings must be a list of strings, got the string {self.stop_strings!r}")
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop_strings must be non-empty strings, got {s!r}")


@dataclass
class GenerationOutput:
    """One prompt's result. ``token_ids`` are the new tokens only (a stop token included); ``text`` is their
    decoded text (None without a tokenizer), cut before a stop string; ``finish_reason`` is ``"stop"`` (stop token
    or string) or ``"length"`` (max_new_tokens, or the engine's max_seq_len)."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str


class IncrementalDetokenizer:
    """Text deltas from a growing list of token ids that never split a multi-byte character.

    Decodes a short window: the tokens since the last emitted delta, after those of the delta before (a few
    prompt tokens at the start), and emits the text beyond that prefix once it does not end in an incomplete
    character (U+FFFD). Tokenizers that drop a leading space at the start of a decode see the same context.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), context: int = 5):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-context:]) if context else []
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _delta(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._delta(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end comes out as U+FFFD)."""
        return self._delta(final=True)


@dataclass
class _Row:
    index: int  # position in the caller's list
    prompt_ids: list[int]
    limit: int  # max new tokens for this row
    tokens: list[int] = field(default_factory=list)
    detok: IncrementalDetokenizer | None = None
    text: str = ""
    checked: int = 0  # text[:checked] has been searched for stop strings
    emitted: int = 0  # text[:emitted] has been streamed
    finish_reason: str | None = None


def _buckets(max_batch_size: int) -> list[int]:
    b, out = 1, []
    while b < max_batch_size:
        out.append(b)
        b *= 2
    return out + [max_batch_size]


class Engine:
    """Batched generation for a hylo :class:`~hylo.HybridLM` on one preallocated cache.

    ``max_seq_len`` bounds prompt + generated tokens per row (the cache holds that many, plus the meta tokens);
    ``max_batch_size`` bounds the prompts per call. ``cuda_graphs=None`` captures the decode step on CUDA
    (lazily, once per batch bucket) and runs eagerly elsewhere. ``add_bos`` starts each *text* prompt with the
    tokenizer's BOS token when it has one and its encoder does not add it (hylo's data pipeline separates
    documents with EOS = BOS, so a prompt then reads as the start of a document). ``compile`` (``True`` or a
    ``torch.compile`` mode) compiles each bucket's decode step before its capture (see :class:`DecodeRunner`).
    Not thread-safe.
    """

    def __init__(self, model, tokenizer=None, max_batch_size: int = 8, max_seq_len: int = 2048,
                 cuda_graphs: bool | None = None, prefill_chunk: int = 2048, add_bos: bool = True,
                 compile: bool | str = False):
        for name in ("new_cache", "decode_step", "hidden_states"):
            if not hasattr(model, name):
                raise TypeError(f"the engine runs hylo models (HybridLM); got {type(model).__name__}. "
                                "Use the model's own generate() for other transformers models.")
        for name, v, lo in (("max_batch_size", max_batch_size, 1), ("max_seq_len", max_seq_len, 2),
                            ("prefill_chunk", prefill_chunk, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.prefill_chunk = prefill_chunk
        self.add_bos = add_bos
        self.device = next(model.parameters()).device
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device; it is on {self.device}")
        self.cuda_graphs = cuda_graphs
        self.compile = compile
        self.vocab_size = model.config.vocab_size
        self.buckets = _buckets(max_batch_size)
        with torch.no_grad():
            self.cache = model.new_cache(max_batch_size, max_seq_len)
        self._runners: dict[int, DecodeRunner] = {}
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.last_stats: dict = {}
        self.last_outputs: list[GenerationOutput] = []

    @classmethod
    def from_pretrained(cls, path, device=None, dtype: torch.dtype | None = None, tokenizer=None, **kwargs) -> Engine:
        """An engine for a model folder, run folder or checkpoint (:func:`hylo.loading.load`), with its tokenizer."""
        from ..loading import load

        model, tok = load(path, device=device, dtype=dtype, tokenizer=tokenizer, need_tokenizer=True)
        return cls(model, tok, **kwargs)

    # ------------------------------------------------------------------ public API
    def runner(self, batch_size: int) -> DecodeRunner:
        """The decode runner of the bucket holding ``batch_size`` rows (captured on first use)."""
        if not 1 <= batch_size <= self.max_batch_size:
            raise ValueError(f"batch_size must lie in [1, {self.max_batch_size}] (max_batch_size), got {batch_size}")
        bucket = next(b for b in self.buckets if b >= batch_size)
        if bucket not in self._runners:
            self._runners[bucket] = DecodeRunner(self.model, bucket, self.max_seq_len, self.cuda_graphs,
                                                 cache=row_view(self.cache, 0, bucket), pool=self._pool,
                                                 compile=self.compile)
        return self._runners[bucket]

    def warmup(self) -> None:
        """Capture every bucket's graph now instead of on first use."""
        for b in self.buckets:
            self.runner(b)

    def generate(self, prompts, sampling: SamplingParams | None = None,
                 on_delta: Callable[[int, str | int], None] | None = None) -> list[GenerationOutput]:
        """Generate for each prompt (a list of strings, or of token-id lists). ``on_delta(row, delta)`` is called as
        output arrives: text deltas with a tokenizer, else each new token id."""
        run = self._run(prompts, sampling)
        while True:
            try:
                event = next(run)
            except StopIteration as stop:
                return stop.value
            if on_delta is not None:
                on_delta(*event)

    def stream(self, prompts, sampling: SamplingParams | None = None) -> Iterator[tuple[int, str | int]]:
        """Yield ``(row, text_delta)`` (or ``(row, token_id)`` without a tokenizer) as output arrives; the
        :class:`GenerationOutput` list is in ``self.last_outputs`` once the iterator is exhausted."""
        self.last_outputs = yield from self._run(prompts, sampling)

    # ------------------------------------------------------------------ checks
    def _encode(self, prompts) -> list[list[int]]:
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2:
                raise ValueError(f"a tensor of prompts must be [batch, length], got shape {tuple(prompts.shape)}")
            prompts = prompts.tolist()
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
            raise ValueError("prompts must be a list of prompts; for one prompt of token ids pass [[id, id, ...]]")
        if len(prompts) > self.max_batch_size:
            raise ValueError(f"{len(prompts)} prompts exceed max_batch_size={self.max_batch_size}; "
                             "split them or build the Engine with a larger max_batch_size")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer: Engine(model, tokenizer) or pass token ids")
                if not p:
                    raise ValueError(f"prompt {i} is empty")
                ids = list(self.tokenizer.encode(p))
                bos = getattr(self.tokenizer, "bos_token_id", None)
                if self.add_bos and bos is not None and (not ids or ids[0] != bos):
                    ids = [bos] + ids
            else:
                if isinstance(p, torch.Tensor):
                    p = p.tolist()
                try:
                    ids = [int(t) for t in p]
                except (TypeError, ValueError):
                    raise ValueError(f"prompt {i} must be a string or a list of token ids, got {p!r:.80}") from None
                if any(t < 0 or t >= self.vocab_size for t in ids):
                    raise ValueError(f"prompt {i} holds token ids outside [0, {self.vocab_size})")
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            if len(ids) >= self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; max_seq_len={self.max_seq_len} leaves room for "
                                 f"prompts of at most {self.max_seq_len - 1} tokens (prompt + new tokens must fit)")
            out.append(ids)
        return out

    def _stop_ids(self, sp: SamplingParams) -> list[int]:
        ids = list(dict.fromkeys(int(i) for i in sp.stop_token_ids))
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        if eos is not None and not sp.ignore_eos and eos not in ids:
            ids.append(int(eos))
        return ids

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def _run(self, prompts, sampling: SamplingParams | None):
        sp = sampling if sampling is not None else SamplingParams()
        sp.validate(self.vocab_size)
        if sp.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer (the engine has none); use stop_token_ids")
        prompt_ids = self._encode(prompts)
        stop_ids = self._stop_ids(sp)
        stop_set = set(stop_ids)
        hold = max((len(s) for s in sp.stop_strings), default=1) - 1  # chars kept back while streaming
        n = len(prompt_ids)
        dev = self.device
        t0 = time.perf_counter()

        # rows sorted by length so equal lengths are adjacent (one prefill call per group)
        order = sorted(range(n), key=lambda i: len(prompt_ids[i]))
        rows = [_Row(i, prompt_ids[i], min(sp.max_new_tokens, self.max_seq_len - len(prompt_ids[i])))
                for i in order]
        if self.tokenizer is not None:
            for r in rows:
                r.detok = IncrementalDetokenizer(self.tokenizer, r.prompt_ids)
        runner = self.runner(n)
        B = runner.batch_size
        cache = runner.cache
        reset_cache(self.model, cache)

        # ---- prefill, group by group, chunk by chunk
        first_logits = torch.zeros(B, self.vocab_size, device=dev, dtype=torch.float32)
        s = 0
        while s < n:
            e = s
            while e < n and len(rows[e].prompt_ids) == len(rows[s].prompt_ids):
                e += 1
            ids = torch.tensor([r.prompt_ids for r in rows[s:e]], dtype=torch.long, device=dev)
            view = row_view(cache, s, e)
            for c in range(0, ids.shape[1], self.prefill_chunk):
                h = self.model.hidden_states(ids[:, c:c + self.prefill_chunk], cache=view)
            first_logits[s:e] = self.model.logits(h[:, -1]).float()
            s = e

        gen = None
        if sp.temperature > 0:
            gen = torch.Generator(device=dev)
            if sp.seed is not None:
                gen.manual_seed(sp.seed)
            else:
                gen.seed()

        def pick(logits):
            return sample(logits, sp.temperature, sp.top_k, sp.top_p, gen)

        stop_t = torch.tensor(stop_ids, dtype=torch.long, device=dev)
        limit = torch.tensor([r.limit for r in rows] + [1] * (B - n), dtype=torch.long, device=dev)
        real = torch.arange(B, device=dev) < n
        tokens = pick(first_logits)
        count = real.long()
        done = ~real | (count >= limit) | torch.isin(tokens, stop_t)

        # ---- host side: one row's new token (detokenize, stop checks, stream)
        def accept(slot: int, tok: int) -> list[tuple[int, str | int]]:
            r = rows[slot]
            if r.finish_reason is not None:
                return []
            r.tokens.append(tok)
            events: list = []
            if tok in stop_set:
                r.finish_reason = "stop"
            elif r.detok is not None:
                r.text += r.detok.add(tok)
            if r.finish_reason is None and len(r.tokens) >= r.limit:
                r.finish_reason = "length"
            if r.detok is None:
                return [(r.index, tok)]
            if r.finish_reason is not None:
                r.text += r.detok.flush()
            if sp.stop_strings:
                start = max(0, r.checked - hold)
                hits = [j for j in (r.text.find(x, start) for x in sp.stop_strings) if j >= 0]
                if hits:
                    r.text = r.text[:min(hits)]
                    if r.finish_reason is None:
                        done[slot] = True  # the device learns one or two steps later; those tokens are dropped
                    r.finish_reason = "stop"
                r.checked = len(r.text)
            end = len(r.text) if r.finish_reason is not None else max(r.emitted, len(r.text) - hold)
            if end > r.emitted:
                events.append((r.index, r.text[r.emitted:end]))
                r.emitted = end
            return events

        first_host = tokens.tolist()
        t_prefill = time.perf_counter() - t0
        for slot in range(n):
            yield from accept(slot, first_host[slot])

        # ---- decode: device steps run ahead of the host by `depth`
        max_steps = max(r.limit for r in rows) - 1
        top = runner.num_meta_tokens + max(len(r.prompt_ids) for r in rows)  # the rows' largest position at step 0
        cuda = dev.type == "cuda"
        depth = 2  # steps queued ahead of the host (on the CPU too, so tests run the same logic)
        pinned = [torch.empty(B, dtype=torch.long, pin_memory=True) for _ in range(depth + 1)] if cuda else None
        inflight: deque = deque()
        launched = 0
        steps_done = 0
        t1 = time.perf_counter()
        while True:
            while len(inflight) < depth and launched < max_steps and not all(r.finish_reason for r in rows):
                logits = runner._step(tokens, max_pos=top + launched)
                cache.pos.sub_(done.long())  # rows finished before this step stay where they are
                # greedy: the step's own argmax where it has one (hylo.ops.decode_io), fed back as the next tokens
                nxt = runner.greedy_tokens(logits) if sp.temperature == 0 else pick(logits)
                active = ~done
                count.add_(active.long())
                done |= active & ((count >= limit) | torch.isin(nxt, stop_t))
                tokens = nxt
                if cuda:
                    buf = pinned[launched % (depth + 1)]
                    buf.copy_(nxt, non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record()
                    inflight.append((buf, ev))
                else:
                    inflight.append((nxt.clone(), None))  # nxt may be the runner's buffer: the next step overwrites it
                launched += 1
            if not inflight:
                break
            buf, ev = inflight.popleft()
            if ev is not None:
                ev.synchronize()
            host = buf.tolist()
            steps_done += 1
            for slot in range(n):
                yield from accept(slot, host[slot])
        if cuda:
            torch.cuda.synchronize(dev)
        t_decode = time.perf_counter() - t1

        outputs: list[GenerationOutput | None] = [None] * n
        for r in rows:
            outputs[r.index] = GenerationOutput(r.prompt_ids, r.tokens, r.text if r.detok is not None else None,
                                                r.finish_reason or "length")
        new_tokens = sum(len(r.tokens) for r in rows)
        self.last_stats = {"batch": n, "bucket": B, "graphed": runner.graphed, "prompt_tokens":
                           sum(len(p) for p in prompt_ids), "new_tokens": new_tokens, "decode_steps": steps_done,
                           "prefill_s": t_prefill, "decode_s": t_decode,
                           "tokens_per_s": new_tokens / max(t_prefill + t_decode, 1e-9)}
        return outputs
