"""Tokenizers: load any Hugging Face tokenizer, or train a byte-level BPE one on local text.

A hub name is tried from the local HF cache first and downloaded only when the Hub answers a quick probe,
so a machine without network gets one clear :class:`DataError` in seconds instead of minutes of retries.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

from .prepare import SEPARATOR, DataError, count_documents, iter_documents, resolve_inputs


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for cache-only access."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP probe of the Hub, so no network fails in seconds instead of minutes of HTTP retries."""
    import socket
    from urllib.parse import urlparse

    if hub_offline():
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct probe proves nothing; let the HF client try
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_tokenizer(name_or_path: str | os.PathLike):
    """A Hugging Face tokenizer from a local folder, the HF cache, or the Hub (when reachable)."""
    from transformers import AutoTokenizer

    spec = str(name_or_path)
    path = Path(spec).expanduser()
    if path.exists():
        try:
            return AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise DataError(f"{path}: cannot load a Hugging Face tokenizer from it ({e})") from None
    if spec.startswith(("/", ".", "~")):
        raise DataError(f"{path}: no such tokenizer folder")
    try:
        return AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except Exception:
        pass  # not cached: try the Hub below
    if not hub_reachable():
        raise DataError(f"tokenizer '{spec}' is not a local folder nor in the Hugging Face cache, and the Hub "
                        "cannot be reached (no network?). Pass a local tokenizer folder, or train one with "
                        "`hylo tokenizer train`.")
    try:
        return AutoTokenizer.from_pretrained(spec)
    except Exception as e:
        raise DataError(f"tokenizer '{spec}': cannot load from the Hugging Face Hub ({e})") from None


def eos_id(tok) -> int:
    """The id appended after every document: the tokenizer's EOS, else ``<|endoftext|>`` if in the vocab."""
    if tok.eos_token_id is not None:
        return int(tok.eos_token_id)
    ids = tok.get_vocab()
    if SEPARATOR in ids:
        return int(ids[SEPARATOR])
    raise DataError(f"tokenizer '{tok.name_or_path}' has no EOS token and no {SEPARATOR} token")


def describe_tokenizer(tok, name: str = "") -> dict:
    """Manifest entry: name/path, vocab size, EOS and a sha256 of the full tokenizer definition."""
    backend = getattr(tok, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    path = Path(name).expanduser()
    return {"name": name or tok.name_or_path, "path": str(path.resolve()) if path.exists() else None,
            "class": type(tok).__name__, "vocab_size": len(tok), "eos_id": eos_id(tok),
            "eos_token": tok.convert_ids_to_tokens(eos_id(tok)),
            "sha256": hashlib.sha256(definition.encode()).hexdigest()}


def encoder(tok) -> Callable[[list[str]], list[list[int]]]:
    """Batch text → ids with no special tokens added, no truncation, and special-token text kept as text.

    The last point matters: a document that literally contains ``<|endoftext|>`` must not produce an EOS id,
    or the EOS ids in the shards would no longer mark exactly the document boundaries.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:  # slow (Python) tokenizer
        return lambda texts: [list(ids) for ids in tok(texts, add_special_tokens=False, split_special_tokens=True,
                                                       verbose=False)["input_ids"]]
    from tokenizers import Tokenizer

    fast = Tokenizer.from_str(backend.to_str())
    fast.no_truncation()
    fast.no_padding()
    fast.encode_special_tokens = True
    if hasattr(fast, "encode_batch_fast"):
        return lambda texts: [list(ids) for ids in (e.ids for e in fast.encode_batch_fast(texts, add_special_tokens=False))]
    return lambda texts: [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]


def train_tokenizer(files: Sequence[str | os.PathLike] | str | os.PathLike, vocab_size: int,
                    out_dir: str | os.PathLike, *, min_frequency: int = 2, text_field: str = "text",
                    show_progress: bool = True):
    """Train a byte-level BPE tokenizer (GPT-2 style, ``<|endoftext|>`` as BOS/EOS) and save it in HF format.

    ``files`` takes the same inputs as :func:`hylo.data.prepare` (files, folders); they are read once up front
    so bad input fails before training. Returns the tokenizer reloaded with ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise DataError(f"vocab_size must be > 256 (the byte alphabet plus {SEPARATOR}), got {vocab_size}")
    sources = resolve_inputs(files)
    if any(s.dataset for s in sources):
        raise DataError(f"train_tokenizer takes local files only, not '{next(s for s in sources if s.dataset)}'")
    n_docs = sum(count_documents(sources, text_field))

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[SEPARATOR],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    docs = (doc for src in sources for doc in iter_documents(src, text_field))
    tok.train_from_iterator(docs, trainer=trainer, length=n_docs)

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SEPARATOR, eos_token=SEPARATOR,
                                 unk_token=SEPARATOR, model_max_length=1 << 30)
    hf.save_pretrained(str(out))
    return load_tokenizer(out)
