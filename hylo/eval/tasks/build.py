"""Build hylo's offline lm-evaluation-harness tasks from a held-out text corpus.

Four tasks, each a jsonl file plus an lm_eval task YAML (templates in this package, copied with the jsonl path
filled in), all tagged ``hylo``:

- ``hylo_lastword`` (LAMBADA style, loglikelihood): a passage of whole paragraphs whose last paragraph ends in a
  word followed by sentence-final punctuation; the target is that word, the context everything before it.
  Metrics: ``acc`` (the greedy continuation is exactly the word) and ``perplexity`` of the target.
- ``hylo_lastword_gen`` (generate_until): the same passages; greedy generation, first word compared exactly.
- ``hylo_nextsent`` (HellaSwag style, multiple choice): one or two sentences of a paragraph as context, the
  sentence that follows them as the answer, and three distractor sentences of similar length from far away in
  the corpus (same book first, so names and style do not give the answer away). Metrics: ``acc``, ``acc_norm``.
- ``hylo_ppl`` (loglikelihood_rolling): passages of consecutive paragraphs; word/byte perplexity, bits per byte.

Everything is a function of (corpus bytes, n, seed): the same inputs give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

TASKS = ("hylo_lastword", "hylo_lastword_gen", "hylo_nextsent", "hylo_ppl")
TEMPLATES = Path(__file__).resolve().parent
DEFAULT_CORPUS_NAME = "gutenberg_val.txt.gz"
FORMAT = "hylo-eval-tasks/1"

# Passage sizes in words (whitespace-separated).
LASTWORD_WORDS = (40, 150)
PPL_WORDS = (150, 400)
SENT_WORDS = (6, 40)  # answer and distractor sentences
CONTEXT_MIN_WORDS = 8
FAR = 50  # distractors come from paragraphs at least this far away (same book) or from another book

_WS = re.compile(r"\s+")
_LAST_WORD = re.compile(r"^([A-Za-z]{2,})[.!?][\"'\u201d\u2019)]?$")  # word + final punctuation (+ closing quote)
_SENT_END = re.compile(r"[.!?][\"'\u201d\u2019)]?$")
# A sentence boundary: end punctuation (optionally a closing quote), space, then a capital or an opening quote.
_NEXT = r"\s+(?=[\"'\u201c\u2018(]?[A-Z])"
_SPLIT = re.compile(r"(?<=[.!?])" + _NEXT + r"|(?<=[.!?][\"'\u201d\u2019)])" + _NEXT)
_ABBREV = {"Mr", "Mrs", "Ms", "Dr", "St", "Mme", "Mlle", "Messrs", "Jr", "Sr", "Prof", "Rev", "Capt", "Col",
           "Gen", "Lt", "Sgt", "Hon", "No", "vs", "viz", "etc", "M", "Esq"}


class TaskBuildError(ValueError):
    """Bad corpus or settings for the task builder; the message names the value at fault."""


@dataclass(frozen=True)
class Para:
    book: int
    index: int  # paragraph index within its book
    text: str  # whitespace-normalized
    words: int


def default_corpus() -> Path | None:
    """``$HYLO_EVAL_CORPUS``, else ``gutenberg_val.txt.gz`` in ``shared/data/corpus`` beside the working folder or
    beside the source tree (the project layout); None when none exists."""
    env = os.environ.get("HYLO_EVAL_CORPUS")
    if env:
        return Path(env).expanduser()
    rel = Path("shared") / "data" / "corpus" / DEFAULT_CORPUS_NAME
    for base in (Path.cwd().parent, Path(__file__).resolve().parents[3].parent):
        if (base / rel).is_file():
            return base / rel
    return None


def _paragraphs(books: Sequence[str]) -> list[list[Para]]:
    out = []
    for b, book in enumerate(books):
        paras = []
        for i, raw in enumerate(re.split(r"\n[ \t]*\n", book)):
            text = _WS.sub(" ", raw).strip()
            n = len(text.split())
            # headings, chapter titles, tables of contents: short or upper-case lines
            if n < 5 or text.isupper() or text.upper().startswith("CHAPTER"):
                continue
            paras.append(Para(b, i, text, n))
        out.append(paras)
    return out


def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph: split after ``.!?`` (and a closing quote) before a capital, not after titles."""
    parts = _SPLIT.split(text)
    out: list[str] = []
    for p in parts:
        if out and out[-1].split()[-1].rstrip(".") in _ABBREV:
            out[-1] += " " + p
        else:
            out.append(p)
    return out


def _rng(seed: int, task: str) -> random.Random:
    return random.Random(f"{seed}/{task}")  # str seeds are hashed with sha512: stable across runs and platforms


# ---------------------------------------------------------------------------------------------------- tasks
def _lastword(paras: list[list[Para]], n: int, seed: int) -> list[dict]:
    cands = [(b, j) for b, ps in enumerate(paras) for j, p in enumerate(ps)
             if p.words <= LASTWORD_WORDS[1] and _LAST_WORD.match(p.text.split()[-1])]
    _rng(seed, "lastword").shuffle(cands)
    used: set[tuple[int, int]] = set()
    out = []
    for b, j in cands:
        if len(out) >= n:
            break
        ps = paras[b]
        k, words = j, ps[j].words
        while k > 0 and ps[k - 1].index == ps[k].index - 1 and words + ps[k - 1].words <= LASTWORD_WORDS[1]:
            k -= 1  # extend backwards over adjacent paragraphs while the passage stays short enough
            words += ps[k].words
        if words < LASTWORD_WORDS[0] or any((b, i) in used for i in range(k, j + 1)):
            continue
        used.update((b, i) for i in range(k, j + 1))
        text = "\n\n".join(p.text for p in ps[k:j + 1])
        last = text.rsplit(" ", 1)
        target = _LAST_WORD.match(last[1]).group(1)
        out.append({"id": f"{b}:{ps[j].index}", "context": last[0], "target": target,
                    "text": f"{last[0]} {target}"})
    return out


def _nextsent(paras: list[list[Para]], n: int, seed: int) -> list[dict]:
    rng = _rng(seed, "nextsent")
    # the distractor pool: every sentence of a good length, with where it came from
    pool: list[tuple[int, int, str, int]] = []  # (book, paragraph position, sentence, words)
    sents: dict[tuple[int, int], list[str]] = {}
    for b, ps in enumerate(paras):
        for j, p in enumerate(ps):
            s = split_sentences(p.text)
            sents[(b, j)] = s
            for x in s:
                w = len(x.split())
                if SENT_WORDS[0] <= w <= SENT_WORDS[1] and _SENT_END.search(x):
                    pool.append((b, j, x, w))
    by_book: dict[int, list[int]] = {}
    for i, (b, *_rest) in enumerate(pool):
        by_book.setdefault(b, []).append(i)

    def far(i: int, b: int, j: int) -> bool:
        return pool[i][0] != b or abs(pool[i][1] - j) >= FAR

    cands = sorted(sents)
    rng.shuffle(cands)
    out = []
    for b, j in cands:
        if len(out) >= n:
            break
        s = sents[(b, j)]
        ends = [t for t in range(1, len(s)) if SENT_WORDS[0] <= len(s[t].split()) <= SENT_WORDS[1]
                and _SENT_END.search(s[t]) and len(" ".join(s[max(0, t - 2):t]).split()) >= CONTEXT_MIN_WORDS]
        if not ends:
            continue
        t = ends[rng.randrange(len(ends))]
        answer, context = s[t], " ".join(s[max(0, t - 2):t])
        w = len(answer.split())
        tol = max(3, w // 2)
        picked: list[str] = []
        for source in (by_book.get(b, []), range(len(pool))):  # same book first, then anywhere
            for _ in range(200):
                if len(picked) == 3 or not source:
                    break
                i = source[rng.randrange(len(source))]
                x = pool[i][2]
                if far(i, b, j) and abs(pool[i][3] - w) <= tol and x != answer and x not in picked:
                    picked.append(x)
        if len(picked) < 3:
            continue
        label = rng.randrange(4)
        choices = picked[:label] + [answer] + picked[label:]
        out.append({"id": f"{b}:{paras[b][j].index}", "context": context, "choices": choices, "label": label})
    return out


def _ppl(paras: list[list[Para]], n: int, seed: int) -> list[dict]:
    cands = [(b, j) for b, ps in enumerate(paras) for j in range(len(ps))]
    _rng(seed, "ppl").shuffle(cands)
    used: set[tuple[int, int]] = set()
    out = []
    for b, j in cands:
        if len(out) >= n:
            break
        ps = paras[b]
        k, words = j, ps[j].words
        while words < PPL_WORDS[0] and k + 1 < len(ps) and ps[k + 1].index == ps[k].index + 1:
            k += 1
            words += ps[k].words
        if not PPL_WORDS[0] <= words <= PPL_WORDS[1] or any((b, i) in used for i in range(j, k + 1)):
            continue
        used.update((b, i) for i in range(j, k + 1))
        out.append({"id": f"{b}:{ps[j].index}", "text": "\n\n".join(p.text for p in ps[j:k + 1])})
    return out


# ---------------------------------------------------------------------------------------------------- output
def _read_books(corpus: Path) -> tuple[list[str], str]:
    from ...data.prepare import DataError, iter_documents, resolve_inputs

    try:
        sources = resolve_inputs([corpus])
        books = [doc for src in sources for doc in iter_documents(src)]
    except DataError as e:
        raise TaskBuildError(str(e)) from None
    h = hashlib.sha256()
    for doc in books:
        h.update(doc.encode("utf-8"))
        h.update(b"\0")
    return books, h.hexdigest()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows), encoding="utf-8")


def task_yaml(task: str, data_file: Path) -> str:
    """The packaged YAML of ``task`` with its ``data_files`` pointing at ``data_file`` (absolute)."""
    cfg = yaml.safe_load((TEMPLATES / f"{task}.yaml").read_text(encoding="utf-8"))
    cfg["dataset_kwargs"] = {"data_files": {"test": str(data_file.resolve())}}
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=120)


def build_tasks(out_dir: str | os.PathLike, corpus: str | os.PathLike | None = None, n: int = 500,
                seed: int = 0) -> dict:
    """Write ``<task>.jsonl`` + ``<task>.yaml`` for every task and a ``manifest.json`` into ``out_dir``.

    ``corpus``: text files or a folder (``.txt``/``.txt.gz`` with documents separated by ``<|endoftext|>`` lines,
    or ``.jsonl``), default :func:`default_corpus`. ``n`` examples per task (fewer if the corpus runs out; zero
    is an error). Use the folder with ``lm_eval --include_path OUT_DIR --tasks hylo`` (or single task names).
    Returns the manifest.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise TaskBuildError(f"n must be an int >= 1 (examples per task), got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TaskBuildError(f"seed must be an int, got {seed!r}")
    if corpus is None:
        corpus = default_corpus()
        if corpus is None:
            raise TaskBuildError("no corpus given and none found: pass --corpus PATH (a .txt/.txt.gz/.jsonl file or "
                                 f"folder), or set HYLO_EVAL_CORPUS; the default is shared/data/corpus/"
                                 f"{DEFAULT_CORPUS_NAME} beside the working folder")
    corpus = Path(corpus).expanduser()
    books, digest = _read_books(corpus)
    paras = _paragraphs(books)
    rows = {"hylo_lastword": _lastword(paras, n, seed), "hylo_nextsent": _nextsent(paras, n, seed),
            "hylo_ppl": _ppl(paras, n, seed)}
    rows["hylo_lastword_gen"] = rows["hylo_lastword"]
    for task in TASKS:
        if not rows[task]:
            raise TaskBuildError(f"{corpus}: too little text to build any {task} example (it needs paragraphs "
                                 "separated by blank lines)")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for task in TASKS:
        data = out / (("hylo_lastword" if task == "hylo_lastword_gen" else task) + ".jsonl")
        if task != "hylo_lastword_gen":
            _write_jsonl(data, rows[task])
        (out / f"{task}.yaml").write_text(task_yaml(task, data), encoding="utf-8")
        files[task] = {"data": data.name, "yaml": f"{task}.yaml", "examples": len(rows[task])}
    manifest = {"format": FORMAT, "corpus": str(corpus.resolve()), "corpus_sha256": digest, "n": n, "seed": seed,
                "tasks": files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
