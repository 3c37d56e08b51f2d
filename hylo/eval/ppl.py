"""Perplexity and bits per byte with a sliding window (the "perplexity of fixed-length models" recipe).

The token stream is cut into windows of ``context`` tokens starting every ``stride`` tokens; each window scores
only the tokens no earlier window scored, and uses the tokens before them as context. With ``stride == context``
the windows are disjoint chunks scored independently (the first token of each chunk is then context only, as in
the HF recipe; its bytes are not counted); a smaller stride scores every token after the first, each with at least
``context - stride`` tokens of context, at ``context / stride`` times the compute. Windows of equal shape are
batched; the last, shorter window runs on its own, never padded (recurrent operators have no notion of padding).

**What is scored.** By default a prefix token (the tokenizer's BOS, else EOS) is put before the text, so *every*
token of the text is scored and bits per byte cover every byte of it. Without it (``prefix=False``, the HF recipe)
the first token is only context; its bytes are then left out of the byte count too.

**Bits per byte** = total NLL in bits / UTF-8 bytes of the scored text, which compares models with different
tokenizers. Bytes per token come from the tokenizer's character offsets into the original text (exact: the bytes of
a token are those of the characters from its start to the next token's start; a character split over two
byte-level tokens counts once). A ``hylo data prepare`` folder stores tokens, not text: its documents are decoded,
re-encoded with offsets and checked to give the same tokens (exact when they do; otherwise bytes come from decoding
tokens one at a time, and ``bytes_exact`` is false). Document separators (EOS between documents) are scored like
any token but hold no bytes of text.

**Text sources.** A plain or gzip text file is read verbatim as one document, unless it holds lines consisting
of ``<|endoftext|>`` (hylo's corpus format): those separate documents, which are then joined with the EOS token as in
training. WikiText-103's ``wiki.test.tokens`` is thus scored exactly as stored (no "\\n\\n" joins of lines,
which would add characters the file does not have). A Hugging Face dataset ``name[:config[:split]]`` whose rows are
lines (WikiText) is joined with no separator, reproducing the raw file; rows that are documents are joined with EOS.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .common import EvalError, Precision, check_vocab, logits_last, prefix_token_id

SEPARATOR = "<|endoftext|>"
_SEP_LINE = re.compile(r"(?:^|\r?\n)<\|endoftext\|>(?:\r?\n|$)")


# ------------------------------------------------------------------------------------------------ data
@dataclass
class EvalTokens:
    """A token stream to score and the UTF-8 bytes of text each token stands for."""

    ids: np.ndarray  # int64 [n]
    token_bytes: np.ndarray  # int64 [n]; 0 for document separators
    source: str
    documents: int
    bytes_exact: bool = True
    bytes_method: str = "offsets"
    notes: list[str] = field(default_factory=list)

    def truncate(self, max_tokens: int | None) -> "EvalTokens":
        if max_tokens is None or max_tokens >= len(self.ids):
            return self
        return EvalTokens(self.ids[:max_tokens], self.token_bytes[:max_tokens], self.source, self.documents,
                          self.bytes_exact, self.bytes_method, self.notes + [f"truncated to {max_tokens} tokens"])


_FAST_ENCODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _fast_encoder(tok):
    """A `tokenizers.Tokenizer` that keeps special-token text as text and does not truncate, or None (slow tok).

    Built once per tokenizer object and cached: building it is a JSON round trip of the whole vocabulary (~0.1 s
    at 16k), which callers encoding many short texts (retrieval prompts) must not pay per call."""
    try:
        return _FAST_ENCODERS[tok]
    except (KeyError, TypeError):
        pass
    backend = getattr(tok, "backend_tokenizer", None)
    fast = None
    if backend is not None:
        from tokenizers import Tokenizer

        fast = Tokenizer.from_str(backend.to_str())
        fast.no_truncation()
        fast.no_padding()
        fast.encode_special_tokens = True
    try:
        _FAST_ENCODERS[tok] = fast
    except TypeError:  # not weakly referenceable: no cache
        pass
    return fast


def _bytes_from_offsets(doc: str, starts: Sequence[int]) -> np.ndarray:
    """Bytes of ``doc`` between consecutive token starts (the last token runs to the end); sums to the doc's bytes."""
    cp = np.frombuffer(doc.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    cum = np.concatenate([[0], np.cumsum(width)])
    s = np.maximum.accumulate(np.clip(np.asarray(starts, dtype=np.int64), 0, len(doc)))
    if len(s):
        s[0] = 0  # text a normalizer dropped before the first token still belongs to the first token
    ends = np.append(s[1:], len(doc))
    return cum[ends] - cum[s]


def _bytes_by_decoding(tok, ids: Sequence[int], doc_bytes: int | None) -> np.ndarray:
    """Approximate bytes per token from decoding tokens one at a time; the total is corrected to ``doc_bytes``."""
    b = np.array([len(tok.decode([int(i)]).encode("utf-8")) for i in ids], dtype=np.int64)
    if doc_bytes is not None and len(b):
        b[-1] = max(0, b[-1] + doc_bytes - int(b.sum()))
    return b


def byte_lengths(tok) -> np.ndarray | None:
    """Bytes each token id stands for when the tokenizer is byte-level BPE (GPT-2 style: a token's string has one
    character per byte), special tokens 0; ``None`` for other tokenizers."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    dec = spec.get("decoder") or {}
    if "ByteLevel" not in [dec.get("type")] + [d.get("type") for d in dec.get("decoders") or []]:
        return None
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    special = set(getattr(tok, "all_special_ids", [])) | {i for i, t in added.items() if t.get("special")}
    vocab = tok.get_vocab()
    table = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    for s, i in vocab.items():
        table[i] = 0 if i in special else len(added[i]["content"].encode("utf-8")) if i in added else len(s)
    return table


def tokenize_documents(tok, docs: Sequence[str]) -> tuple[list[list[int]], list[np.ndarray], bool]:
    """Token ids and bytes per token of each document; the flag says whether the bytes are exact.

    Byte-level BPE: each token's own bytes. Other fast tokenizers: the bytes between consecutive tokens' character
    offsets (a character split over several tokens counts on the last). Slow tokenizers: approximate."""
    fast = _fast_encoder(tok)
    if fast is None:
        ids = [list(tok(d, add_special_tokens=False)["input_ids"]) for d in docs]
        return ids, [_bytes_by_decoding(tok, i, len(d.encode("utf-8"))) for i, d in zip(ids, docs)], False
    table = byte_lengths(tok)
    ids, nbytes = [], []
    for doc in docs:
        enc = fast.encode(doc, add_special_tokens=False)
        ids.append(list(enc.ids))
        b = table[np.asarray(enc.ids, dtype=np.int64)] if table is not None and len(enc.ids) else None
        if b is None or int(b.sum()) != len(doc.encode("utf-8")):  # e.g. a normalizer changed the text
            b = _bytes_from_offsets(doc, [o[0] for o in enc.offsets])
        nbytes.append(b)
    return ids, nbytes, True


def _join(ids: list[list[int]], nbytes: list[np.ndarray], eos: int | None):
    """One stream: the documents with ``eos`` between them (0 bytes each)."""
    parts, bparts = [], []
    for k, (i, b) in enumerate(zip(ids, nbytes)):
        parts.append(np.asarray(i, dtype=np.int64))
        bparts.append(np.asarray(b, dtype=np.int64))
        if eos is not None and k < len(ids) - 1:
            parts.append(np.array([eos], dtype=np.int64))
            bparts.append(np.zeros(1, dtype=np.int64))
    return np.concatenate(parts), np.concatenate(bparts)


def split_documents(text: str) -> list[str]:
    """Documents of hylo's corpus format (separated by lines holding only ``<|endoftext|>``); blank ones dropped."""
    return [d for d in _SEP_LINE.split(text) if d.strip()]


def read_text(path: Path) -> str:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise EvalError(f"{path}: cannot read ({e})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not valid UTF-8 at byte {e.start}") from None


def _eos(tok) -> int | None:
    from ..data.tokenizer import eos_id
    from ..data.prepare import DataError

    try:
        return eos_id(tok)
    except DataError:
        return None


def tokens_from_texts(tok, docs: Sequence[str], source: str) -> EvalTokens:
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise EvalError(f"{source}: holds no text")
    eos = _eos(tok)
    if len(docs) > 1 and eos is None:
        raise EvalError(f"{source}: holds {len(docs)} documents, but the tokenizer has no EOS token to separate them")
    ids, nbytes, exact = tokenize_documents(tok, docs)
    a, b = _join(ids, nbytes, eos)
    return EvalTokens(a, b, source, len(docs), exact, "offsets" if exact else "decoded tokens (approximate)")


def _load_prepared(folder: Path, tok, split: str) -> EvalTokens:
    from ..data.tokenizer import describe_tokenizer

    manifest = json.loads((folder / "manifest.json").read_text())
    splits = manifest.get("splits", {})
    if split not in splits or not splits[split].get("shards"):
        have = [s for s, v in splits.items() if v.get("tokens")]
        raise EvalError(f"{folder}: prepared dataset has no '{split}' split (splits with tokens: {have or 'none'})")
    want = manifest.get("tokenizer", {}).get("sha256")
    if want and describe_tokenizer(tok).get("sha256") != want:
        raise EvalError(f"{folder}: was tokenized with '{manifest['tokenizer'].get('name')}', which is not the "
                        f"tokenizer given ('{getattr(tok, 'name_or_path', tok)}'); its token ids would be meaningless")
    dtype = np.dtype(manifest.get("dtype", "uint16"))
    shards = [np.fromfile(folder / s["file"], dtype=dtype) for s in splits[split]["shards"]]
    ids = np.concatenate(shards).astype(np.int64)
    eos = int(manifest["tokenizer"]["eos_id"])
    source = f"{folder} ({split} split)"
    table = byte_lengths(tok)
    fast = _fast_encoder(tok)
    if table is not None and fast is not None and ids.max() < len(table):
        nbytes = table[ids]  # byte-level BPE: every token's bytes are known; check them against the decoded text
        if int(nbytes.sum()) == len(fast.decode(ids[ids != eos].tolist(), skip_special_tokens=True).encode("utf-8")):
            docs = int((ids == eos).sum()) + int(ids[-1] != eos)
            return EvalTokens(ids, nbytes, source, docs, True, "byte-level tokens",
                              [f"bytes counted from the byte-level tokens ({folder.name} stores no text)"])
    # otherwise recover the text by decoding each document, and check re-encoding gives the same tokens
    cuts = np.flatnonzero(ids == eos)
    starts = np.concatenate([[0], cuts + 1])[: len(cuts) + (1 if len(ids) and ids[-1] != eos else 0)]
    ends = np.append(cuts, len(ids))[: len(starts)]
    nbytes = np.zeros(len(ids), dtype=np.int64)
    mismatched = 0
    for s, e in zip(starts, ends):
        doc_ids = ids[s:e].tolist()
        if not doc_ids:
            continue
        text = fast.decode(doc_ids, skip_special_tokens=False) if fast is not None else tok.decode(
            doc_ids, clean_up_tokenization_spaces=False)
        enc = fast.encode(text, add_special_tokens=False) if fast is not None else None
        if enc is not None and list(enc.ids) == doc_ids:
            nbytes[s:e] = _bytes_from_offsets(text, [o[0] for o in enc.offsets])
        else:
            mismatched += 1
            nbytes[s:e] = _bytes_by_decoding(tok, doc_ids, len(text.encode("utf-8")))
    docs = len(starts)
    note = (f"bytes counted by decoding the tokens ({folder.name} stores no text); "
            f"{docs - mismatched}/{docs} documents re-encode to the stored tokens")
    return EvalTokens(ids, nbytes, source, docs, mismatched == 0,
                      "decoded" if mismatched == 0 else "decoded (approximate)", [note])


def _load_hf(spec: str, tok, text_field: str) -> EvalTokens:
    from ..data.prepare import DataError, Source, _load_dataset

    name, _, rest = spec.removeprefix("hf:").partition(":")
    config, _, split = rest.partition(":")
    src = Source(dataset=name, config=config or None, split=split or "test")
    from ..data.tokenizer import hub_offline, hub_reachable

    if not hub_offline() and not hub_reachable():  # fail in milliseconds, before importing `datasets`
        raise EvalError(f"data '{spec}' is not a local file or folder, and the Hugging Face Hub cannot be reached "
                        "to load it as a dataset (no network?); pass a local text file or prepared folder, or set "
                        "HF_HUB_OFFLINE=1 to use a cached copy")
    try:
        ds = _load_dataset(src)
    except DataError as e:
        raise EvalError(str(e)) from None
    if text_field not in ds.column_names:
        raise EvalError(f"dataset '{name}': no column '{text_field}' (columns: {ds.column_names})")
    rows = [r for r in ds[text_field] if isinstance(r, str)]
    nonempty = [r for r in rows if r]
    label = f"hf:{name}" + (f":{config}" if config else "") + f":{src.split}"
    if nonempty and sum(r.endswith("\n") for r in nonempty) >= 0.9 * len(nonempty):
        return tokens_from_texts(tok, ["".join(rows)], label)  # rows are lines of one text (WikiText)
    return tokens_from_texts(tok, nonempty, label)


def load_tokens(data: str | os.PathLike, tok, *, split: str = "val", text_field: str = "text") -> EvalTokens:
    """Tokens and bytes of ``data``: a text/.gz file, a ``hylo data prepare`` folder (its ``split``), or a Hugging
    Face dataset ``name[:config[:split]]`` (network or HF cache)."""
    p = Path(data).expanduser()
    if p.is_dir():
        if (p / "manifest.json").is_file():
            return _load_prepared(p, tok, split)
        raise EvalError(f"{p}: a folder, but not one made by `hylo data prepare` (no manifest.json)")
    if p.is_file():
        text = read_text(p)
        docs = split_documents(text) if SEPARATOR in text else [text]
        return tokens_from_texts(tok, docs, str(p))
    check_data_spec(data)
    return _load_hf(str(data), tok, text_field)


def check_data_spec(data: str | os.PathLike) -> None:
    """Raise :class:`EvalError` at once for a path that does not exist (anything path-like: not a dataset name)."""
    p, s = Path(data).expanduser(), str(data)
    if p.exists():
        return
    if s.startswith(("/", ".", "~")) or s.count("/") > 1 or Path(s.split(":")[0]).suffix in (
            ".txt", ".gz", ".tokens", ".raw", ".json", ".jsonl", ".parquet"):
        raise EvalError(f"{p}: no such file or folder (expected a text file, a .txt.gz, a `hylo data prepare` "
                        "folder or a Hugging Face dataset name such as wikitext:wikitext-103-raw-v1:test)")


# ------------------------------------------------------------------------------------------------ scoring
def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first)`` per window: it reads tokens ``[begin, end)`` and scores ``[first, end)``."""
    out, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + context, n)
        first = max(prev_end, begin + 1)
        if end > first:
            out.append((begin, end, first))
        prev_end = end
        if end >= n:
            return out
        begin += stride


def check_window(context: int, stride: int) -> None:
    if not isinstance(context, int) or context < 2:
        raise EvalError(f"context must be an integer >= 2 tokens, got {context!r}")
    if not isinstance(stride, int) or not 1 <= stride <= context:
        raise EvalError(f"stride must be an integer in [1, context={context}], got {stride!r}")


def _progress(enabled: bool, unit: str = "tokens"):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)


@torch.no_grad()
def sliding_window_nll(model, ids, context: int, stride: int, *, batch_size: int = 8,
                       precision: Precision | None = None, progress: bool = False) -> np.ndarray:
    """Per-token NLL in nats (float64 ``[n]``; NaN where a token is not scored: the first one) of ``ids`` under
    ``model`` with the sliding window. Windows of the same shape run ``batch_size`` at a time."""
    check_window(context, stride)
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    p = next(model.parameters())
    device = p.device
    ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long).to(device)
    n = ids_t.numel()
    if n < 2:
        raise EvalError(f"need at least 2 tokens to score one, got {n}")
    precision = precision or Precision(str(p.dtype), p.dtype, False)
    groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for b, e, f in windows(n, context, stride):
        groups.setdefault((e - b, e - f), []).append((b, e, f))
    nll = np.full(n, np.nan, dtype=np.float64)
    with _progress(progress) as bar:
        task = bar.add_task("scoring", total=n - 1)
        for (length, n_scored), ws in groups.items():
            for i in range(0, len(ws), batch_size):
                chunk = ws[i:i + batch_size]
                x = torch.stack([ids_t[b:e] for b, e, _ in chunk])
                with precision.context(device):
                    logits = logits_last(model, x, n_scored + 1)
                targets = torch.stack([ids_t[f:e] for _, e, f in chunk])
                for r, (_, e, f) in enumerate(chunk):  # one row at a time: [n_scored, V] in fp32 at most
                    loss = F.cross_entropy(logits[r, :n_scored].float(), targets[r], reduction="none")
                    nll[f:e] = loss.double().cpu().numpy()
                bar.advance(task, n_scored * len(chunk))
    return nll


def _model_name(model) -> str:
    return str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
               or type(model).__name__)


def _manifest_tokenizer(data) -> str | None:
    """The tokenizer a prepared data folder was made with, if it is still on disk."""
    if isinstance(data, EvalTokens) or data is None:
        return None
    m = Path(data).expanduser() / "manifest.json"
    if not m.is_file():
        return None
    tok = json.loads(m.read_text()).get("tokenizer", {})
    return next((s for s in (tok.get("path"), tok.get("name")) if s and Path(s).expanduser().exists()), None)


def perplexity(model, tokenizer=None, data: str | os.PathLike | EvalTokens | None = None, context: int = 1024,
               stride: int = 512, *, batch_size: int = 8, max_tokens: int | None = None, device=None,
               dtype: str | None = None, prefix: bool = True, split: str = "val", text_field: str = "text",
               text: str | None = None, progress: bool = False) -> dict:
    """Sliding-window perplexity and bits per byte of a model on a text (see the module doc for the method).

    ``model`` is a loaded model (hylo or transformers causal LM) or any path :func:`hylo.loading.load` opens
    (then ``device``/``dtype`` apply: dtype ``auto``, ``fp32``, ``bf16``, ``fp16`` or ``amp-bf16``). ``data`` is a
    text/.gz file, a ``hylo data prepare`` folder, a Hugging Face dataset ``name[:config[:split]]`` or an
    :class:`EvalTokens`; or the text itself: ``text=``, or a ``data`` string holding a line break. ``max_tokens`` keeps the first tokens of the data.
    Returns a dict: ``tokens_scored``, ``bytes_scored``, ``nll`` (mean nats/token), ``ppl``, ``bits_per_token``,
    ``bits_per_byte`` and the settings.
    """
    from .common import load_for_eval, prepare_loaded

    check_window(context, stride)
    if max_tokens is not None and max_tokens < 1:
        raise EvalError(f"max_tokens must be >= 1, got {max_tokens}")
    if isinstance(data, str) and "\n" in data and text is None and not Path(data).exists():
        data, text = None, data  # a string with a line break is the text itself
    if (data is None) == (text is None):
        raise EvalError("pass exactly one of data (a path, prepared folder or dataset name) and text")
    if data is not None and not isinstance(data, EvalTokens):
        check_data_spec(data)  # before loading the model
    if isinstance(model, (str, os.PathLike)):
        model_name = str(model)
        model, tokenizer, dev, prec = load_for_eval(str(model), tokenizer, device, dtype,
                                                    _manifest_tokenizer(data) if tokenizer is None else None)
    else:
        model_name = _model_name(model)
        model, tokenizer, dev, prec = prepare_loaded(model, tokenizer, device, dtype)
    was_training = model.training
    model.eval()
    try:
        if isinstance(data, EvalTokens):
            toks = data
        elif text is not None:
            toks = tokens_from_texts(tokenizer, [text], "text")
        else:
            toks = load_tokens(data, tokenizer, split=split, text_field=text_field)
        toks = toks.truncate(max_tokens)
        ids, nbytes = toks.ids, toks.token_bytes
        bos = prefix_token_id(tokenizer) if prefix else None
        if prefix and bos is None:
            raise EvalError("the tokenizer has no BOS or EOS token to put before the text; use prefix=False "
                            "(--no-prefix): the first token is then context only")
        if bos is not None:
            ids = np.concatenate([[bos], ids])
            nbytes = np.concatenate([[0], nbytes])
        check_vocab(model, int(ids.max()), toks.source)
        max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(max_pos, int) and context > max_pos:
            warnings.warn(f"context {context} exceeds the model's max_position_embeddings {max_pos}")
        t0 = time.perf_counter()
        nll = sliding_window_nll(model, ids, context, stride, batch_size=batch_size, precision=prec,
                                 progress=progress)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)
    scored = ~np.isnan(nll)
    total = float(nll[scored].sum())
    n_scored = int(scored.sum())
    n_bytes = int(nbytes[scored].sum())
    mean = total / n_scored
    result = {
        "model": model_name,
        "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
        "data": toks.source,
        "documents": toks.documents,
        "context": context,
        "stride": stride,
        "prefix_token": None if bos is None else tokenizer.convert_ids_to_tokens(int(bos)),
        "tokens_scored": n_scored,
        "bytes_scored": n_bytes,
        "nll": mean,
        "ppl": math.exp(min(mean, 700.0)),
        "bits_per_token": mean / math.log(2),
        "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else float("nan"),
        "bytes_per_token": n_bytes / n_scored,
        "bytes_exact": toks.bytes_exact,
        "bytes_method": toks.bytes_method,
        "windows": len(windows(len(ids), context, stride)),
        "batch_size": batch_size,
        "device": str(dev),
        "precision": prec.name,
        "seconds": seconds,
        "tokens_per_second": n_scored / seconds if seconds > 0 else float("nan"),
        "notes": toks.notes,
    }
    return result
