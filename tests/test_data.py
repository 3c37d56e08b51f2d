"""Data pipeline on small slices of the real corpus: tokenizer training, prepare, errors, loader."""

import gzip
import hashlib
import importlib
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hylo.data import DataError, TokenLoader, load_tokenizer, prepare, train_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # <repo>/../shared/data
CORPUS = SHARED / "corpus"
pytestmark = pytest.mark.skipif(not (CORPUS / "gutenberg_train_00.txt.gz").is_file(),
                                reason=f"real corpus not found at {SHARED} (expected shared/ beside the repo)")
SEP = "\n<|endoftext|>\n"
tok_module = importlib.import_module("hylo.data.tokenizer")  # the module, to monkeypatch hub_reachable/encoder


def _books(shard: str, n: int, chars: int) -> list[str]:
    """The first n books of a shard, each cut to ~chars at a paragraph break."""
    with gzip.open(CORPUS / shard, "rt", encoding="utf-8") as f:
        books = f.read(8_000_000).split(SEP)[:-1]  # the last piece may be cut mid-book
    assert len(books) >= n
    return [b[: b.rfind("\n\n", 0, chars)] for b in books[:n]]


def _wiki_articles(n: int, chars: int) -> list[str]:
    text = (SHARED / "wikitext103" / "wiki.valid.tokens").read_text(encoding="utf-8")
    parts = re.split(r"\n(?= = [^=].* = \n)", text)[1: n + 1]
    return [p[:chars] for p in parts]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder with a .txt.gz, a .txt and an ignored file, plus a .jsonl; returns (inputs, documents in order)."""
    root = tmp_path_factory.mktemp("corpus")
    folder = root / "books"
    folder.mkdir()
    a, b = _books("gutenberg_train_00.txt.gz", 5, 12_000), _books("gutenberg_train_01.txt.gz", 5, 12_000)
    with gzip.open(folder / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write(SEP.join(a) + "\n")
    (folder / "b.txt").write_text(SEP.join(b), encoding="utf-8")
    (folder / "notes.md").write_text("not data")
    wiki = _wiki_articles(4, 6_000)
    wiki[1] = wiki[1][:3000] + " <|endoftext|> " + wiki[1][3000:]  # literal separator text inside a document
    with open(root / "wiki.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(wiki))
    return [str(folder), str(root / "wiki.jsonl")], a + b + wiki


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus[0], 512, out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def dataset(corpus, tok_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "gutenberg"
    return prepare(corpus[0], tok_dir, out, val_fraction=0.2, seed=0, shard_tokens=8000)


def _stream(result, split: str) -> np.ndarray:
    m = result.manifest
    return np.concatenate([np.fromfile(result.path / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]])


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False, split_special_tokens=True)


# ---------------------------------------------------------------------------------------------- tokenizer
def test_train_tokenizer_hf_round_trip(tok_dir, corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert len(tok) == 512
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    text = corpus[1][0][:2000] + "\nnaïve café — 日本語 \t end"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text  # byte-level BPE is lossless
    prose = corpus[1][3][-3000:]
    assert len(tok.encode(prose, add_special_tokens=False)) < 0.6 * len(prose.encode())  # merges were learned
    assert tok.encode("<|endoftext|>", add_special_tokens=False) == [tok.eos_token_id]


def test_hub_name_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tok_module, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataError, match="no-such-org/no-such-tokenizer.*cannot be reached \\(no network\\?\\)"):
        load_tokenizer("no-such-org/no-such-tokenizer")
    with pytest.raises(DataError, match="no such tokenizer folder"):
        load_tokenizer("./missing-tokenizer-dir")


# ---------------------------------------------------------------------------------------------- prepare
def test_manifest_counts_match_a_direct_count(dataset, corpus, tok):
    m = dataset.manifest
    docs = corpus[1]
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == 512
    assert [i["documents"] for i in m["inputs"]] == [5, 5, 4]  # notes.md ignored
    assert [Path(i["path"]).name for i in m["inputs"]] == ["a.txt.gz", "b.txt", "wiki.jsonl"]
    n_tokens = sum(len(_ids(tok, d)) for d in docs) + len(docs)  # + one EOS per document
    splits = m["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(docs)
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == n_tokens
    assert splits["val"]["documents"] == round(0.2 * len(docs)) == len(m["val_document_indices"])
    assert len(splits["train"]["shards"]) > 1  # small shard_tokens: the loader must read across shards
    for split in splits.values():
        assert sum(s["tokens"] for s in split["shards"]) == split["tokens"]
        for s in split["shards"]:
            data = (dataset.path / s["file"]).read_bytes()
            assert len(data) == 2 * s["tokens"]
            assert hashlib.sha256(data).hexdigest() == s["sha256"]


def test_streams_hold_each_document_then_eos_and_splits_are_disjoint(dataset, corpus, tok):
    docs, val = corpus[1], set(dataset.manifest["val_document_indices"])
    eos = tok.eos_token_id
    for split, keep in (("train", lambda i: i not in val), ("val", lambda i: i in val)):
        expected = [t for i, d in enumerate(docs) if keep(i) for t in _ids(tok, d) + [eos]]
        stream = _stream(dataset, split)
        assert stream.tolist() == expected
        assert int((stream == eos).sum()) == dataset.manifest["splits"][split]["documents"]  # literal text ≠ EOS

    def split_docs(stream):
        return {tuple(x) for x in np.split(stream, np.flatnonzero(stream == eos) + 1) if len(x)}

    train_docs, val_docs = split_docs(_stream(dataset, "train")), split_docs(_stream(dataset, "val"))
    assert train_docs.isdisjoint(val_docs) and len(train_docs) + len(val_docs) == len(docs)


def test_split_is_deterministic_for_a_seed(dataset, corpus, tok_dir, tmp_path):
    same = prepare(corpus[0], tok_dir, tmp_path / "same", val_fraction=0.2, seed=0, shard_tokens=8000, progress=False)
    other = prepare(corpus[0], tok_dir, tmp_path / "other", val_fraction=0.2, seed=1, shard_tokens=8000,
                    progress=False)
    assert same.manifest["splits"] == dataset.manifest["splits"]  # identical shard checksums
    assert other.manifest["val_document_indices"] != dataset.manifest["val_document_indices"]


def test_folder_keeps_its_tokenizer_when_the_original_is_gone(corpus, tok_dir, tmp_path):
    """The prepared folder holds a copy of the tokenizer: moved to where the original path does not exist (as on
    the GPU machines), it still gives the tokenizer, the same one (equal ids), for training's export and eval."""
    import shutil

    from hylo.loading import _tokenizer_from_manifest

    local_tok = tmp_path / "tok"
    shutil.copytree(tok_dir, local_tok)
    res = prepare(corpus[0], local_tok, tmp_path / "ds", val_fraction=0.2, seed=0, shard_tokens=8000, progress=False)
    assert res.manifest["tokenizer"]["dir"] == "tokenizer" and (res.path / "tokenizer" / "tokenizer.json").is_file()
    shutil.rmtree(local_tok)
    moved = tmp_path / "elsewhere"
    shutil.move(res.path, moved)
    spec = _tokenizer_from_manifest({"data": str(moved)})
    assert spec == str(moved / "tokenizer")
    text = "It was the best of times, it was the worst of times."
    assert _ids(load_tokenizer(spec), text) == _ids(load_tokenizer(tok_dir), text)


def test_rerun_is_a_no_op_and_other_settings_need_overwrite(dataset, corpus, tok_dir):
    from typer.testing import CliRunner

    from hylo.cli_data import data_app

    files = sorted(dataset.path.iterdir())
    before = {p: p.stat().st_mtime_ns for p in files}
    again = prepare(corpus[0], tok_dir, dataset.path, val_fraction=0.2, seed=0, shard_tokens=8000)
    assert again.reused and again.manifest == dataset.manifest
    args = ["prepare", *corpus[0], "-t", str(tok_dir), "-o", str(dataset.path), "--val-fraction", "0.2",
            "--shard-tokens", "8000"]
    res = CliRunner().invoke(data_app, args)
    assert res.exit_code == 0 and "nothing to do" in " ".join(res.output.split()), res.output
    assert sorted(dataset.path.iterdir()) == files and {p: p.stat().st_mtime_ns for p in files} == before
    with pytest.raises(DataError, match="different settings.*overwrite"):
        prepare(corpus[0], tok_dir, dataset.path, val_fraction=0.2, seed=5, shard_tokens=8000)
    assert {p: p.stat().st_mtime_ns for p in files} == before


def _no_output(tmp_path, out):
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp dirs left


def _big_vocab_tokenizer(path):
    """A 70k-word WordLevel tokenizer: ids beyond uint16."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|endoftext|>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(path)
    return path


def _case(name, tmp_path, corpus):
    """(inputs, extra prepare kwargs, message regex) for one bad input."""
    good = str(Path(corpus[0][0]) / "b.txt")
    if name == "missing":
        return [good, str(tmp_path / "missing.txt")], {}, r"missing\.txt: no such file or folder"
    if name == "empty":
        (tmp_path / "empty.txt").write_text("")
        return [good, str(tmp_path / "empty.txt")], {}, r"empty\.txt: empty file"
    if name == "empty_gz":
        with gzip.open(tmp_path / "empty.txt.gz", "wb"):
            pass
        return [str(tmp_path / "empty.txt.gz")], {}, r"empty\.txt\.gz: empty file"
    if name == "non_utf8":
        (tmp_path / "bad.txt").write_bytes(b"hello world\n" + b"caf\xe9 au lait\n")
        return [good, str(tmp_path / "bad.txt")], {}, r"bad\.txt: not valid UTF-8 at byte offset 15"
    if name == "non_utf8_gz":
        with gzip.open(tmp_path / "bad.txt.gz", "wb") as f:
            f.write(b"ok\n<|endoftext|>\nabc\xff\n")
        return [str(tmp_path / "bad.txt.gz")], {}, r"bad\.txt\.gz: not valid UTF-8 at byte offset 20 of the decompressed"
    if name == "unknown_type":
        (tmp_path / "data.csv").write_text("text\nhello\n")
        return [str(tmp_path / "data.csv")], {}, r"data\.csv: unknown file type"
    if name == "jsonl_field":
        (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"content": "no text field"}\n')
        return [str(tmp_path / "rows.jsonl")], {}, r"rows\.jsonl:2: no string field 'text'"
    if name == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"body": ["hello"]}), tmp_path / "t.parquet")
            return [str(tmp_path / "t.parquet")], {}, r"t\.parquet: no column 'text'"
        except ImportError:
            (tmp_path / "t.parquet").write_bytes(b"PAR1")
            return [str(tmp_path / "t.parquet")], {}, r"t\.parquet: reading \.parquet needs pyarrow"
    if name == "uint16_too_small":
        return [good], {"tokenizer": str(_big_vocab_tokenizer(tmp_path / "big_tok")), "dtype": "uint16"}, \
            r"dtype uint16 cannot hold.*vocab_size 70002"
    if name == "dataset_no_network":
        return ["some-org/some-dataset"], {}, r"'some-org/some-dataset' is not a local path.*(datasets|no network)"
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["missing", "empty", "empty_gz", "non_utf8", "non_utf8_gz", "unknown_type",
                                  "jsonl_field", "parquet", "uint16_too_small", "dataset_no_network"])
def test_bad_input_is_a_clear_error_and_leaves_nothing(name, tmp_path, corpus, tok_dir, monkeypatch):
    monkeypatch.setattr(tok_module, "hub_reachable", lambda timeout=3.0: False)
    inputs, kwargs, message = _case(name, tmp_path, corpus)
    kwargs = {"tokenizer": str(tok_dir), **kwargs}
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        prepare(inputs, out_dir=out, progress=False, **kwargs)
    _no_output(tmp_path, out)


def test_wide_vocab_uses_uint32(tmp_path):
    tok = _big_vocab_tokenizer(tmp_path / "big_tok")
    (tmp_path / "w.jsonl").write_text('{"text": "w69999 w3"}\n{"text": "w65536"}\n')
    res = prepare([tmp_path / "w.jsonl"], tok, tmp_path / "out", val_fraction=0, progress=False)
    assert res.manifest["dtype"] == "uint32"
    assert _stream(res, "train").tolist() == [70001, 5, 1, 65538, 1]


def test_crash_mid_write_keeps_the_old_dataset(dataset, corpus, tok_dir, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "ds"
    shutil.copytree(dataset.path, out)
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = tok_module.encoder

    def failing_encoder(tok):
        encode = real(tok)

        def run(texts):
            ids = encode(texts)
            yield ids[0]  # one document reaches the shard file, then the "crash"
            raise RuntimeError("disk on fire")
        return run

    monkeypatch.setattr(tok_module, "encoder", failing_encoder)
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare(corpus[0], tok_dir, out, val_fraction=0.2, seed=3, shard_tokens=8000, overwrite=True, progress=False)
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_cli_error_is_one_line_not_a_traceback(tmp_path, tok_dir):
    from typer.testing import CliRunner

    from hylo.cli_data import data_app

    res = CliRunner().invoke(data_app, ["prepare", str(tmp_path / "nope.txt"), "-t", str(tok_dir), "-o",
                                        str(tmp_path / "out")])
    assert res.exit_code == 1 and "no such file or folder" in res.output and "Traceback" not in res.output


# ---------------------------------------------------------------------------------------------- loader
def _take(loader, n):
    return [(x.clone(), y.clone()) for x, y in itertools.islice(loader, n)]


def test_random_loader_is_deterministic_and_windows_come_from_the_stream(dataset):
    seq = 32
    a = _take(TokenLoader(dataset.path, "train", seq, 4, seed=0), 5)
    b = _take(TokenLoader(dataset.path / "manifest.json", "train", seq, 4, seed=0), 5)
    c = _take(TokenLoader(dataset.path, "train", seq, 4, seed=1), 5)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    stream = _stream(dataset, "train").astype(np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(stream, seq + 1)
    starts = set()
    for x, y in a:
        assert x.dtype == torch.long and x.shape == (4, seq) and torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], 1).numpy():
            (hit,) = np.flatnonzero((windows == row).all(1))[:1]
            starts.add(int(hit))
    assert len(starts) == 20 and len({s % seq for s in starts}) == 1  # distinct windows, one offset per epoch


def test_pinned_batches_are_one_pinned_tensor_per_step(dataset, monkeypatch):
    """pin_memory=True pins each batch once (x and y are views of it, so both copy asynchronously); the batches
    are the same as unpinned ones. CPU stand-in for Tensor.pin_memory, which needs CUDA."""
    from hylo.data import loader as L

    pinned = []
    monkeypatch.setattr(L, "_pin", lambda t: pinned.append(t.clone()) or pinned[-1])
    a = list(itertools.islice(TokenLoader(dataset.path, "train", 32, 4, seed=0, pin_memory=True), 3))
    b = _take(TokenLoader(dataset.path, "train", 32, 4, seed=0), 3)
    assert len(pinned) == 3
    for (x, y), (xb, yb), p in zip(a, b, pinned):
        assert torch.equal(x, xb) and torch.equal(y, yb)
        assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()


def test_resume_from_state_dict_gives_the_same_next_batches(dataset):
    make = lambda: TokenLoader(dataset.path, "train", 128, 16, seed=7)
    full = make()
    n = len(full)
    ref = _take(full, n + 5)  # crosses into epoch 1
    assert not torch.equal(ref[0][0], ref[n][0])  # a new epoch reshuffles
    part = make()
    _take(part, n - 2)
    state = json.loads(json.dumps(part.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(_take(resumed, 7), ref[n - 2:]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(DataError, match="seq_len"):
        TokenLoader(dataset.path, "train", 64, 16, seed=7).load_state_dict(state)


def test_sequential_mode_covers_the_tokens_in_order(dataset):
    loader = TokenLoader(dataset.path, "train", 64, 4, mode="sequential")
    batches = list(loader)
    assert len(batches) == len(loader) == ((dataset.manifest["splits"]["train"]["tokens"] - 1) // 64) // 4
    stream = _stream(dataset, "train").astype(np.int64)
    inputs = torch.cat([x.reshape(-1) for x, _ in batches]).numpy()
    targets = torch.cat([y.reshape(-1) for _, y in batches]).numpy()
    assert np.array_equal(inputs, stream[: len(inputs)]) and np.array_equal(targets, stream[1: len(inputs) + 1])
    assert torch.equal(next(iter(loader))[0], batches[0][0])  # a second pass starts again at the beginning


def test_two_ranks_get_disjoint_batches(dataset):
    rows = []
    for rank in (0, 1):
        loader = TokenLoader(dataset.path, "train", 64, 4, seed=0, rank=rank, world_size=2)
        rows.append({tuple(r) for x, _ in _take(loader, len(loader)) for r in x.tolist()})
        assert len(rows[-1]) == 4 * len(loader)
    assert rows[0].isdisjoint(rows[1])
    r0 = next(iter(TokenLoader(dataset.path, "train", 64, 2, mode="sequential", rank=0, world_size=2)))[0]
    r1 = next(iter(TokenLoader(dataset.path, "train", 64, 2, mode="sequential", rank=1, world_size=2)))[0]
    assert torch.equal(r0[0], torch.from_numpy(_stream(dataset, "train")[:64].astype(np.int64)))
    assert torch.equal(r1[0], torch.from_numpy(_stream(dataset, "train")[128:192].astype(np.int64)))
