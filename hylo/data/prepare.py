"""Turn raw text into memory-mappable token shards plus a ``manifest.json``.

Inputs are local ``.txt``/``.txt.gz`` (documents split on a line holding only ``<|endoftext|>``),
``.jsonl``/``.jsonl.gz`` (a ``text`` field per line), ``.parquet`` (a ``text`` column; needs pyarrow),
folders of those, or a Hugging Face dataset name (needs ``datasets``). Every document is followed by the
tokenizer's EOS id, documents are held out for validation by a seeded permutation, and the whole output is
written to a temp dir that is renamed into place at the end, so a failure never leaves a half-written dataset.
Re-running with the same inputs (sha256), tokenizer and settings does nothing. The folder holds a copy of the
tokenizer (``tokenizer/``), so it can be moved to another machine whole.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

SEPARATOR = "<|endoftext|>"
FORMAT = "hylo-tokens/1"
SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
TOKENIZER_DIR = "tokenizer"  # the tokenizer's copy inside a prepared folder (manifest: tokenizer.dir)


class DataError(ValueError):
    """Bad data input or settings; the message names the path, field or setting at fault."""


# ---------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    """One input: a local file (``path``) or a Hugging Face dataset (``dataset``, ``config``, ``split``)."""

    path: Path | None = None
    dataset: str | None = None
    config: str | None = None
    split: str = "train"

    def __str__(self) -> str:
        return str(self.path) if self.path else f"hf:{self.dataset}" + (f":{self.config}" if self.config else "")


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or Path(spec).suffix != ""


def resolve_inputs(inputs: Sequence[str | os.PathLike], hf_split: str = "train") -> list[Source]:
    """Expand files, folders (recursively, sorted, unsupported files ignored) and dataset names to sources."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise DataError("no inputs given")
    sources: list[Source] = []
    for spec in inputs:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise DataError(f"{path}: folder holds no {'/'.join(SUFFIXES)} files")
            sources += [Source(path=p.resolve()) for p in files]
        elif path.is_file():
            if _suffix(path) is None:
                raise DataError(f"{path}: unknown file type (supported: {', '.join(SUFFIXES)})")
            sources.append(Source(path=path.resolve()))
        elif _looks_like_path(str(spec)):
            raise DataError(f"{path}: no such file or folder")
        else:
            name, _, config = str(spec).removeprefix("hf:").partition(":")
            sources.append(Source(dataset=name, config=config or None, split=hf_split))
    return sources


def _utf8(raw: bytes, path: Path, offset: int, where: str = "") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte offset {offset + e.start}{where} "
                        f"(bytes {raw[e.start:e.start + 4]!r})") from None


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) pairs of a plain or gzip file; offsets are in the decompressed text."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    offset = 0
    try:
        with opener(path, "rb") as f:
            for line in f:
                yield offset, line
                offset += len(line)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if offset == 0:
        raise DataError(f"{path}: empty file")


def _txt_documents(path: Path) -> Iterator[str]:
    where = " of the decompressed text" if path.name.lower().endswith(".gz") else ""
    lines: list[str] = []
    for offset, raw in _lines(path):
        line = _utf8(raw, path, offset, where)
        if line.rstrip("\r\n") == SEPARATOR:
            yield _chomp("".join(lines))
            lines = []
        else:
            lines.append(line)
    yield _chomp("".join(lines))


def _chomp(doc: str) -> str:
    """Drop the line break that ends a document's last line (it belongs to the separator line)."""
    return doc[:-2] if doc.endswith("\r\n") else doc[:-1] if doc.endswith("\n") else doc


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    for lineno, (offset, raw) in enumerate(_lines(path), 1):
        line = _utf8(raw, path, offset)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise DataError(f"{path}:{lineno}: no string field '{field}'")
        yield row[field]


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for bad files
        raise DataError(f"{path}: cannot read parquet ({e})") from None
    if pf.metadata.num_rows == 0:
        raise DataError(f"{path}: empty file")
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column '{field}' (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(columns=[field]):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _load_dataset(src: Source):
    try:
        import datasets
    except ImportError:
        raise DataError(f"input '{src.dataset}' is not a local path, and loading it as a Hugging Face dataset "
                        "needs the `datasets` package (pip install datasets)") from None
    from .tokenizer import hub_offline, hub_reachable

    if not hub_offline() and not hub_reachable():
        raise DataError(f"input '{src.dataset}' is not a local path, and the Hugging Face Hub cannot be reached "
                        "(no network?); set HF_HUB_OFFLINE=1 to use a cached copy")
    try:
        return datasets.load_dataset(src.dataset, src.config, split=src.split)
    except Exception as e:
        raise DataError(f"Hugging Face dataset '{src.dataset}' (split {src.split}): cannot load ({e})") from None


def iter_documents(src: Source, text_field: str = "text") -> Iterator[str]:
    """Yield the non-empty documents of one source, raising :class:`DataError` on bad input."""
    if src.dataset:
        ds = _load_dataset(src)
        if text_field not in ds.column_names:
            raise DataError(f"dataset '{src.dataset}': no column '{text_field}' (columns: {ds.column_names})")
        docs = (row[text_field] for row in ds.select_columns([text_field]))
    else:
        kind = _suffix(src.path)
        if kind is None:
            raise DataError(f"{src.path}: unknown file type (supported: {', '.join(SUFFIXES)})")
        docs = (_txt_documents(src.path) if kind.startswith(".txt") else
                _parquet_documents(src.path, text_field) if kind == ".parquet" else
                _jsonl_documents(src.path, text_field))
    yield from (doc for doc in docs if isinstance(doc, str) and doc.strip())


def fingerprint(src: Source) -> str:
    """sha256 of a file's bytes as stored, or the dataset's cache fingerprint."""
    if src.dataset:
        return "hf:" + str(getattr(_load_dataset(src), "_fingerprint", "unknown"))
    h = hashlib.sha256()
    with open(src.path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def count_documents(sources: Sequence[Source], text_field: str = "text") -> list[int]:
    """Documents per source; reading everything once also validates it before any output is written."""
    counts = []
    for src in sources:
        counts.append(sum(1 for _ in iter_documents(src, text_field)))
        if counts[-1] == 0:
            raise DataError(f"{src}: holds no text (empty file or only empty documents)")
    return counts


# ---------------------------------------------------------------------------------------------- writing
def split_documents(n_docs: int, val_fraction: float, val_docs: int | None, seed: int) -> list[int]:
    """Sorted indices of the held-out documents: a seeded random subset of size val_docs or ~fraction*n."""
    if val_docs is None:
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        val_docs = max(1, round(val_fraction * n_docs)) if val_fraction > 0 else 0
    if not 0 <= val_docs < n_docs:
        raise DataError(f"holding out {val_docs} of {n_docs} documents leaves none for training; "
                        "lower val_fraction/val_docs (0 for no validation split) or add documents")
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(n_docs)[:val_docs])


class _ShardWriter:
    """Appends documents (+EOS) to ``{split}_{i:05d}.bin`` files, starting a new one past ``shard_tokens``."""

    def __init__(self, root: Path, split: str, dtype, shard_tokens: int):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
        self._file = self._hash = None

    def write(self, ids: Sequence[int]) -> None:
        if self._file is None:
            name = f"{self.split}_{len(self.shards):05d}.bin"
            self._file, self._hash = open(self.root / name, "wb"), hashlib.sha256()
            self.shards.append({"file": name, "documents": 0, "tokens": 0})
        data = np.asarray(ids, dtype=self.dtype).tobytes()
        self._file.write(data)
        self._hash.update(data)
        shard = self.shards[-1]
        shard["documents"] += 1
        shard["tokens"] += len(ids)
        if shard["tokens"] >= self.shard_tokens:
            self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1]["sha256"] = self._hash.hexdigest()
            self._file = None

    def summary(self) -> dict:
        self.close()
        return {"documents": sum(s["documents"] for s in self.shards),
                "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("docs"),
                    TimeRemainingColumn(), disable=not enabled, transient=False)


def _batches(docs: Iterator[str], max_chars: int = 1 << 21, max_docs: int = 64) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------- prepare
@dataclass
class Prepared:
    """Result of :func:`prepare`: the output folder, its manifest, and whether an existing one was reused."""

    path: Path
    manifest: dict
    reused: bool


def _same_job(old: dict, new: dict) -> list[str]:
    """Names of the manifest parts that differ between a previous run and this one."""
    def key(m: dict, part: str):
        if part == "inputs":  # counts are added later; the checksums decide
            return [(i["path"], i["sha256"]) for i in m.get("inputs", [])]
        if part == "tokenizer":  # the definition decides, not the path it was loaded from
            return {k: m.get("tokenizer", {}).get(k) for k in ("sha256", "vocab_size", "eos_id")}
        return m.get(part)

    return [p for p in ("format", "settings", "inputs", "tokenizer") if key(old, p) != key(new, p)]


def prepare(inputs: Sequence[str | os.PathLike] | str | os.PathLike, tokenizer, out_dir: str | os.PathLike, *,
            val_fraction: float = 0.01, val_docs: int | None = None, seed: int = 0,
            shard_tokens: int = 100_000_000, dtype: str = "auto", text_field: str = "text",
            hf_split: str = "train", overwrite: bool = False, progress: bool = True) -> Prepared:
    """Tokenize ``inputs`` into ``out_dir/{train,val}_*.bin`` + ``manifest.json`` (see module doc).

    ``tokenizer`` is a name/path (loaded with :func:`hylo.data.load_tokenizer`) or a loaded HF tokenizer.
    ``dtype`` is ``auto`` (uint16 when the vocabulary fits, else uint32), ``uint16`` or ``uint32``.
    An existing ``out_dir`` made from other inputs/settings is replaced only with ``overwrite=True``.
    """
    from .tokenizer import describe_tokenizer, encoder, load_tokenizer

    out = Path(out_dir).expanduser().resolve()
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if dtype not in ("auto", *DTYPES):
        raise DataError(f"dtype must be auto, uint16 or uint32, got {dtype!r}")
    sources = resolve_inputs(inputs, hf_split)
    name = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else getattr(tokenizer, "name_or_path", "")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    tok_info = describe_tokenizer(tok, str(name))
    chosen = dtype if dtype != "auto" else ("uint16" if tok_info["vocab_size"] <= 1 << 16 else "uint32")
    if tok_info["vocab_size"] > np.iinfo(DTYPES[chosen]).max + 1:
        raise DataError(f"dtype {chosen} cannot hold token ids of tokenizer '{name}' "
                        f"(vocab_size {tok_info['vocab_size']}); use dtype uint32 or auto")

    settings = {"val_fraction": val_fraction, "val_docs": val_docs, "seed": seed, "shard_tokens": shard_tokens,
                "dtype": dtype, "text_field": text_field, "hf_split": hf_split, "eos": "after_each_document"}
    manifest = {"format": FORMAT, "tokenizer": tok_info, "dtype": chosen, "settings": settings,
                "inputs": [{"path": str(s), "sha256": fingerprint(s)} for s in sources]}
    if (out / "manifest.json").is_file():
        old = json.loads((out / "manifest.json").read_text())
        diff = _same_job(old, manifest)
        if not diff:
            return Prepared(out, old, reused=True)
        if not overwrite:
            raise DataError(f"{out}: already holds a dataset prepared with different {', '.join(diff)}; "
                            "pass overwrite=True (--overwrite) to replace it")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not a hylo dataset folder; refusing to replace it")

    counts = count_documents(sources, text_field)
    for entry, n in zip(manifest["inputs"], counts):
        entry["documents"] = n
    held_out = split_documents(sum(counts), val_fraction, val_docs, seed)
    encode, eos = encoder(tok), tok_info["eos_id"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        writers = {s: _ShardWriter(tmp, s, DTYPES[chosen], shard_tokens) for s in ("train", "val")}
        val_set, index = set(held_out), 0
        with _progress(progress) as bar:
            task = bar.add_task(f"tokenizing → {out.name}", total=sum(counts))
            for src in sources:
                for batch in _batches(iter_documents(src, text_field)):
                    for ids in encode(batch):
                        ids.append(eos)
                        writers["val" if index in val_set else "train"].write(ids)
                        index += 1
                    bar.advance(task, len(batch))
        if index != sum(counts):
            raise DataError(f"inputs changed while being read ({index} documents, expected {sum(counts)})")
        manifest["splits"] = {s: w.summary() for s, w in writers.items()}
        # a copy of the tokenizer inside the folder: the dataset (and a model trained on it, which exports the
        # tokenizer from here) stays usable where the original path does not exist, e.g. on another machine
        tok.save_pretrained(str(tmp / TOKENIZER_DIR))
        manifest["tokenizer"]["dir"] = TOKENIZER_DIR
        manifest["val_document_indices"] = held_out
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Prepared(out, manifest, reused=False)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an old ``out`` is moved aside first and deleted only after the rename."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
