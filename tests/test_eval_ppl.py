"""`hylo eval ppl`: the sliding window scores each token once with the right context (checked against a single
forward and a brute-force per-token computation), bits-per-byte arithmetic, data sources, JSON, CLI and errors."""

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hylo import HybridLM, HyloConfig
from hylo.cli import app
from hylo.data import prepare, train_tokenizer
from hylo.eval.common import EvalError
from hylo.eval.ppl import load_tokens, perplexity, sliding_window_nll, tokens_from_texts, windows

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "corpus"
WIKI = REPO.parent / "shared" / "data" / "wikitext103" / "wiki.test.tokens"
pytestmark = pytest.mark.skipif(not (CORPUS / "gutenberg_train_00.txt.gz").is_file(),
                                reason=f"real corpus not found at {CORPUS}")
SEP = "\n<|endoftext|>\n"
runner = CliRunner()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A 512-token byte-level BPE trained on ~300 kB of Gutenberg prose."""
    root = tmp_path_factory.mktemp("ppl_tok")
    with gzip.open(CORPUS / "gutenberg_train_00.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read(300_000)
    (root / "c.txt").write_text(text, encoding="utf-8")
    train_tokenizer(root / "c.txt", 512, root / "tok", show_progress=False)
    return root / "tok"


@pytest.fixture(scope="module")
def tok(tok_dir):
    from hylo.data import load_tokenizer

    return load_tokenizer(tok_dir)


def tiny_hylo(seed=0, layers="a f m2 f", meta=2):
    """Attention plus a recurrent operator (no padding possible) and meta tokens."""
    torch.manual_seed(seed)
    cfg = HyloConfig(vocab_size=512, hidden_size=32, layers=layers, attn_num_heads=2, mamba2_head_dim=16,
                     mamba2_state_size=8, mamba2_chunk_size=8, num_meta_tokens=meta)
    return HybridLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_hylo()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tok):
    d = tmp_path_factory.mktemp("ppl_model") / "m"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def text():
    """Real text with multi-byte characters, so bytes != characters."""
    body = gzip.open(CORPUS / "gutenberg_val.txt.gz", "rt", encoding="utf-8").read(20_000)[5000:5600]
    return body + " Café — naïve façade 😀 “quoted”.\n"


@pytest.mark.parametrize("n,context,stride", [(10, 4, 2), (10, 4, 4), (3, 8, 4), (11, 4, 3), (37, 8, 1), (40, 8, 8)])
def test_windows_score_each_token_once(n, context, stride):
    ws = windows(n, context, stride)
    scored = [t for b, e, f in ws for t in range(f, e)]
    assert len(scored) == len(set(scored)) and scored == sorted(scored)
    assert all(e - b <= context and f > b and e > f for b, e, f in ws)
    if stride < context:  # every token but the first
        assert scored == list(range(1, n))
        assert all(f - b >= min(context - stride, f) for b, e, f in ws)  # at least context - stride of context
    else:  # disjoint chunks: the first token of each is context only
        assert scored == [t for t in range(n) if t % context]


def test_single_window_equals_one_forward(model, tok, text):
    ids = torch.tensor(tok(text[:300], add_special_tokens=False)["input_ids"])[None]
    n = ids.shape[1]
    res = perplexity(model, tok, text=text[:300], context=n + 5, stride=n + 5, prefix=False)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert res["tokens_scored"] == n - 1
    assert res["nll"] == pytest.approx(loss, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_stride_equal_context_is_independent_chunks(model, tok, text):
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:100])
    nll = sliding_window_nll(model, ids.numpy(), 32, 32, batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, 100, 32):
            chunk = ids[b:b + 32][None]
            total += model(chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    assert np.isfinite(nll).sum() == count
    assert np.nansum(nll) == pytest.approx(total, rel=1e-5)


def brute_force(model, ids, context, stride):
    """NLL of each token from a forward of exactly its own context: the window that first contains it."""
    out = np.full(len(ids), np.nan)
    with torch.no_grad():
        for t in range(1, len(ids)):
            k = max(0, (t - context) // stride + 1)
            x = torch.as_tensor(ids[k * stride: t + 1])[None]
            out[t] = -torch.log_softmax(model(x).logits[0, -2].double(), -1)[ids[t]].item()
    return out


@pytest.mark.parametrize("context,stride,batch", [(12, 5, 3), (10, 1, 4)])
def test_strided_equals_brute_force(model, tok, text, context, stride, batch):
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"][:41])
    got = sliding_window_nll(model, ids, context, stride, batch_size=batch)
    want = brute_force(model, ids, context, stride)
    assert np.isnan(got[0]) and np.isfinite(got[1:]).all()
    np.testing.assert_allclose(got[1:], want[1:], rtol=1e-4, atol=1e-5)
    # and the batch size does not matter
    np.testing.assert_allclose(sliding_window_nll(model, ids, context, stride, batch_size=1)[1:], got[1:],
                               rtol=1e-5, atol=1e-6)


def test_bits_per_byte_arithmetic(model, tok, text):
    nbytes = len(text.encode("utf-8"))
    assert nbytes > len(text)  # multi-byte characters present
    toks = tokens_from_texts(tok, [text], "t")
    assert toks.token_bytes.sum() == nbytes and toks.bytes_exact
    res = perplexity(model, tok, text=text, context=64, stride=32, batch_size=4)
    assert res["prefix_token"] == "<|endoftext|>"
    assert res["tokens_scored"] == len(toks.ids) and res["bytes_scored"] == nbytes
    total = res["nll"] * res["tokens_scored"]
    assert res["bits_per_byte"] == pytest.approx(total / math.log(2) / nbytes, rel=1e-9)
    assert res["bits_per_token"] == pytest.approx(res["nll"] / math.log(2), rel=1e-9)
    # without the prefix the first token is context only: its bytes leave the count too
    res2 = perplexity(model, tok, text=text, context=64, stride=32, batch_size=4, prefix=False)
    first = tok.decode(toks.ids[:1].tolist())
    assert res2["tokens_scored"] == len(toks.ids) - 1
    assert res2["bytes_scored"] == nbytes - len(first.encode("utf-8"))
    # max_tokens counts bytes of the kept tokens only
    res3 = perplexity(model, tok, text=text, context=64, stride=32, max_tokens=50)
    assert res3["tokens_scored"] == 50
    assert res3["bytes_scored"] == len(tok.decode(toks.ids[:50].tolist()).encode("utf-8"))


def test_text_file_with_documents_and_prepared_folder(model, tok, tok_dir, tmp_path):
    docs = ["First document, with an accent: é.", "Second — with a dash.", "Third one.\nTwo lines.",
            "Fourth document here.", "Fifth and last."]
    corpus = tmp_path / "corpus.txt.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        f.write(SEP.join(docs))
    toks = load_tokens(corpus, tok)
    eos = tok.eos_token_id
    assert toks.documents == 5 and int((toks.ids == eos).sum()) == 4  # EOS between documents
    assert toks.token_bytes.sum() == sum(len(d.encode()) for d in docs) and toks.bytes_exact
    assert (toks.token_bytes[toks.ids == eos] == 0).all()

    prep = prepare(corpus, tok_dir, tmp_path / "ds", val_docs=2, seed=0, progress=False)
    held = [docs[i] for i in prep.manifest["val_document_indices"]]
    val = load_tokens(prep.path, tok)
    stored = np.fromfile(prep.path / "val_00000.bin", dtype=np.uint16).astype(np.int64)
    np.testing.assert_array_equal(val.ids, stored)
    assert val.documents == 2 and val.bytes_exact and val.bytes_method == "byte-level tokens"
    assert val.token_bytes.sum() == sum(len(d.encode()) for d in held)
    assert any("stores no text" in n for n in val.notes)
    res = perplexity(model, tok, prep.path, context=16, stride=8)
    assert res["bytes_scored"] == sum(len(d.encode()) for d in held) and res["documents"] == 2
    with pytest.raises(EvalError, match="no 'nope' split"):
        load_tokens(prep.path, tok, split="nope")
    # a model folder without a tokenizer: the prepared folder's manifest names it
    bare = tmp_path / "bare"
    model.save_pretrained(bare)
    res2 = perplexity(str(bare), None, prep.path, context=16, stride=8, device="cpu")
    assert res2["nll"] == pytest.approx(res["nll"], rel=1e-6)


def test_offsets_path_for_tokenizers_that_are_not_byte_level(tok, text, tmp_path, monkeypatch):
    """Byte counts from character offsets (SentencePiece-style tokenizers) and from decoding a prepared folder agree
    with the byte-level counts: the same totals, and the same bytes per token wherever no character is split."""
    import hylo.eval.ppl as ppl

    exact = tokens_from_texts(tok, [text], "t")
    assert exact.bytes_method == "offsets" and exact.token_bytes.sum() == len(text.encode())
    monkeypatch.setattr(ppl, "byte_lengths", lambda tok: None)
    off = tokens_from_texts(tok, [text], "t")
    np.testing.assert_array_equal(off.ids, exact.ids)
    assert off.token_bytes.sum() == len(text.encode()) and off.bytes_exact
    ascii_prefix = next(i for i, c in enumerate(text) if ord(c) > 127)
    n_ascii = len(tok(text[:ascii_prefix], add_special_tokens=False)["input_ids"]) - 1
    np.testing.assert_array_equal(off.token_bytes[:n_ascii], exact.token_bytes[:n_ascii])
    docs = [text[:300], text[300:]]
    corpus = _write(tmp_path / "c.txt", SEP.join(docs + ["a third document", "a fourth one"]))
    prep = prepare(corpus, tok, tmp_path / "ds", val_docs=2, seed=1, progress=False)
    val = load_tokens(prep.path, tok)
    held = [(docs + ["a third document", "a fourth one"])[i] for i in prep.manifest["val_document_indices"]]
    assert val.bytes_method == "decoded" and val.bytes_exact
    assert val.token_bytes.sum() == sum(len(d.encode()) for d in held)


@pytest.mark.skipif(not WIKI.is_file(), reason="WikiText-103 test file not found")
def test_wikitext_file_is_read_verbatim(tok):
    raw = WIKI.read_text(encoding="utf-8")[:2000]
    toks = tokens_from_texts(tok, [raw], "wiki")
    assert toks.documents == 1 and toks.token_bytes.sum() == len(raw.encode())


def test_cli_writes_json(model_dir, model, tok, text, tmp_path):
    data = tmp_path / "t.txt"
    data.write_text(text, encoding="utf-8")
    out = tmp_path / "r" / "ppl.json"
    r = runner.invoke(app, ["eval", "ppl", str(model_dir), "--data", str(data), "--context", "48", "--stride",
                            "16", "--batch-size", "3", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["kind"] == "ppl" and doc["meta"]["torch"] == torch.__version__ and "device" in doc["meta"]
    api = perplexity(model, tok, text=text, context=48, stride=16)
    assert doc["result"]["nll"] == pytest.approx(api["nll"], rel=1e-6)
    assert doc["result"]["bytes_scored"] == len(text.encode())
    assert "bits/byte" in r.output


def test_transformers_model_folder(tok, text, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    llama = LlamaForCausalLM(cfg).eval()
    d = tmp_path / "llama"
    llama.save_pretrained(d)
    tok.save_pretrained(d)
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"][:30])
    got = sliding_window_nll(llama, ids, 10, 4, batch_size=2)
    np.testing.assert_allclose(got[1:], brute_force(llama, ids, 10, 4)[1:], rtol=1e-4, atol=1e-5)
    out = tmp_path / "llama.json"
    r = runner.invoke(app, ["eval", "ppl", str(d), "--data", str(_write(tmp_path / "x.txt", text)), "--context",
                            "32", "--stride", "16", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())["result"]
    assert res["nll"] == pytest.approx(perplexity(llama, tok, text=text, context=32, stride=16)["nll"], rel=1e-6)


def _write(p, text):
    p.write_text(text, encoding="utf-8")
    return p


def test_cli_errors_name_the_value(model_dir, tmp_path, text):
    data = _write(tmp_path / "t.txt", text)
    cases = [
        (["eval", "ppl", str(tmp_path / "nomodel"), "--data", str(data)], "nomodel"),
        (["eval", "ppl", str(model_dir), "--data", str(tmp_path / "missing.txt")], "missing.txt"),
        (["eval", "ppl", str(model_dir), "--data", str(data), "--context", "0"], "--context"),
        (["eval", "ppl", str(model_dir), "--data", str(data), "--context", "64", "--stride", "65"], "--stride"),
        (["eval", "ppl", str(model_dir), "--data", str(data), "--dtype", "int3"], "int3"),
    ]
    for args, needle in cases:
        r = runner.invoke(app, args)
        assert r.exit_code != 0, args
        assert needle in r.output, (args, r.output)
    with pytest.raises(EvalError, match="stride"):
        perplexity(tiny_hylo(), None, text="x", context=8, stride=9)


def test_hf_dataset_without_network_is_a_clear_error(tok, monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(EvalError, match="no_such_dataset_hylo.*cannot be reached"):
        load_tokens("no_such_dataset_hylo:cfg:test", tok)


def test_vocab_mismatch_is_caught(tok, text):
    small = HybridLM(HyloConfig(vocab_size=64, hidden_size=32, layers="a f", attn_num_heads=2)).eval()
    with pytest.raises(EvalError, match="embedding has 64 rows"):
        perplexity(small, tok, text=text, context=16, stride=8)
