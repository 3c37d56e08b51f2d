"""`hylo eval retrieval`: prompts of exact length with the needle at the requested depth, the scorer, an oracle that
reads the key scores 1.0, cached greedy decoding matches full forwards, and the CLI writes JSON and a heat map."""

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hylo import HybridLM, HyloConfig
from hylo.cli import app
from hylo.data import load_tokenizer, train_tokenizer
from hylo.eval.common import EvalError
from hylo.eval.retrieval import (NEEDLE, QUESTION, Haystack, build_prompt, greedy_generate, passkey_retrieval,
                                 plot_heatmap, score_answer)

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "corpus"
pytestmark = pytest.mark.skipif(not (CORPUS / "gutenberg_train_00.txt.gz").is_file(),
                                reason=f"real corpus not found at {CORPUS}")
runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 512-token BPE trained on Gutenberg prose, and a ~60 kB haystack of held-out books (with a separator)."""
    root = tmp_path_factory.mktemp("retrieval")
    with gzip.open(CORPUS / "gutenberg_train_00.txt.gz", "rt", encoding="utf-8") as f:
        (root / "c.txt").write_text(f.read(300_000), encoding="utf-8")
    train_tokenizer(root / "c.txt", 512, root / "tok", show_progress=False)
    with gzip.open(CORPUS / "gutenberg_val.txt.gz", "rt", encoding="utf-8") as f:
        val = f.read(60_000)
    (root / "hay.txt").write_text(val[:30_000] + "\n<|endoftext|>\n" + val[30_000:], encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tok(files):
    return load_tokenizer(files / "tok")


@pytest.fixture(scope="module")
def hay_ids(files, tok):
    return Haystack(files / "hay.txt", tok).tokens(2000)


def tiny_hylo(seed=0):
    torch.manual_seed(seed)
    cfg = HyloConfig(vocab_size=512, hidden_size=32, layers="a f m2 f swa f", attn_num_heads=2, swa_window=16,
                     mamba2_head_dim=16, mamba2_state_size=8, mamba2_chunk_size=8, num_meta_tokens=2)
    return HybridLM(cfg).eval()


def _find(seq, sub):
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


@pytest.mark.parametrize("length", [160, 301])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_length_and_needle_depth(tok, hay_ids, length, depth):
    p = build_prompt(tok, hay_ids, length, depth, "40417", offset=37, prefix=tok.eos_token_id)
    assert len(p.ids) == length and p.ids[0] == tok.eos_token_id
    needle = tok(NEEDLE.format(key="40417"), add_special_tokens=False)["input_ids"]
    question = tok(QUESTION, add_special_tokens=False)["input_ids"]
    assert _find(p.ids, needle) == [p.needle_at]  # exactly one needle, where the builder says
    assert p.ids[-len(question):] == question  # the prompt ends with the question
    before = p.needle_at - p.filler_start
    assert before == round(depth * p.filler_len)
    assert abs(p.actual_depth - depth) <= 1 / p.filler_len
    # the filler is the haystack stretch starting at the offset, split around the needle
    filler = p.ids[p.filler_start:p.needle_at] + p.ids[p.needle_at + p.needle_len:len(p.ids) - len(question)]
    assert filler == hay_ids[37:37 + p.filler_len].tolist()
    assert "The pass key is 40417." in tok.decode(p.ids)


def test_prompt_too_short_and_bad_depth(tok, hay_ids):
    with pytest.raises(EvalError, match="length 20 is too short"):
        build_prompt(tok, hay_ids, 20, 0.5, "12345")
    with pytest.raises(EvalError, match="depth"):
        build_prompt(tok, hay_ids, 200, 1.5, "12345")


def test_score_answer():
    assert score_answer(" 12345. Remember", "12345")
    assert score_answer("12345", "12345")
    assert not score_answer(" 123456", "12345")
    assert not score_answer(" 1234", "12345")
    assert not score_answer(" the key", "12345")
    assert not score_answer(" 54321 or 12345", "12345")  # the first number counts


def _oracle(tok, correct=True):
    """A stand-in model that reads the key from the prompt (or answers a wrong number)."""
    def gen(model, ids, n):
        rows = []
        for row in ids.tolist():
            key = re.search(r"pass key is (\d+)\.", tok.decode(row)).group(1) if correct else "11111"
            out = tok(f" {key}. Remember", add_special_tokens=False)["input_ids"][:n]
            rows.append(out + [tok.eos_token_id] * (n - len(out)))
        return torch.tensor(rows)
    return gen


def test_oracle_scores_one_and_wrong_answers_zero(files, tok):
    model = tiny_hylo()
    kw = dict(lengths=[128, 200], depths=[0.0, 0.5, 1.0], trials=3, haystack=files / "hay.txt", batch_size=4)
    res = passkey_retrieval(model, tok, generate=_oracle(tok), **kw)
    assert np.array(res["accuracy"]).shape == (2, 3)
    assert res["overall"] == 1.0 and all(r["correct"] for r in res["results"])
    assert len({r["key"] for r in res["results"]}) > 1  # keys vary between trials
    assert len({r["haystack_offset"] for r in res["results"]}) > 1  # so does the filler
    assert res["max_new_tokens"] >= len(tok(" 12345", add_special_tokens=False)["input_ids"])
    wrong = passkey_retrieval(model, tok, generate=_oracle(tok, correct=False), **kw)
    assert wrong["overall"] == 0.0
    # the same seed gives the same prompts
    again = passkey_retrieval(model, tok, generate=_oracle(tok), **kw)
    assert [r["key"] for r in again["results"]] == [r["key"] for r in res["results"]]


def test_cached_greedy_decoding_matches_full_forwards(tok, hay_ids):
    model = tiny_hylo(1)
    x = torch.as_tensor(np.stack([hay_ids[:40], hay_ids[100:140]]))
    got = greedy_generate(model, x, 6)
    seq = x
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(got, seq[:, 40:])


def test_transformers_model_generates(tok, hay_ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    x = torch.as_tensor(hay_ids[:30])[None]
    got = greedy_generate(llama, x, 4)
    seq = x
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, llama(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(got, seq[:, 30:])


def test_cli_writes_json_and_heatmap(files, tok, tmp_path):
    model = tiny_hylo()
    d = tmp_path / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    out = tmp_path / "ret"
    r = runner.invoke(app, ["eval", "retrieval", str(d), "--lengths", "140,180", "--depths", "0,1", "--trials", "2",
                            "--haystack", str(files / "hay.txt"), "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "retrieval.json").read_text())
    assert doc["kind"] == "retrieval" and doc["result"]["lengths"] == [140, 180]
    acc = np.array(doc["result"]["accuracy"])
    assert acc.shape == (2, 2) and ((0 <= acc) & (acc <= 1)).all()
    assert len(doc["result"]["results"]) == 2 * 2 * 2
    png = (out / "retrieval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_heatmap_annotates_cells(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = {"accuracy": [[1.0, 0.5], [0.25, 0.0]], "lengths": [1024, 2048], "depths": [0.0, 1.0], "trials": 4,
           "overall": 0.4375, "model": "m"}
    shown = []
    orig = plt.Axes.text
    try:
        plt.Axes.text = lambda self, x, y, s, *a, **k: shown.append(s) or orig(self, x, y, s, *a, **k)
        plot_heatmap(res, tmp_path / "h.png")
    finally:
        plt.Axes.text = orig
    assert shown == ["1.00", "0.50", "0.25", "0.00"]
    assert (tmp_path / "h.png").stat().st_size > 0


def test_cli_errors(files, tmp_path):
    cases = [
        (["eval", "retrieval", str(tmp_path / "nomodel"), "--haystack", str(files / "hay.txt")], "nomodel"),
        (["eval", "retrieval", "x", "--lengths", "10,abc"], "10,abc"),
        (["eval", "retrieval", "x", "--depths", "0,2"], "0,2"),
    ]
    for args, needle in cases:
        r = runner.invoke(app, args)
        assert r.exit_code != 0 and needle in r.output, (args, r.output)
    with pytest.raises(EvalError, match="nohay.txt"):
        passkey_retrieval(tiny_hylo(), load_tokenizer(files / "tok"), lengths=[64], haystack=tmp_path / "nohay.txt")


class _Counting(torch.nn.Module):
    """Wraps a hylo model and counts prefills (``hidden_states`` with a cache) and their batch sizes."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config
        self.prefills: list[int] = []
        self.steps = 0

    def new_cache(self, *a, **k):
        return self.inner.new_cache(*a, **k)

    def hidden_states(self, ids, cache=None):
        self.prefills.append(ids.shape[0])
        return self.inner.hidden_states(ids, cache=cache)

    def logits(self, h):
        return self.inner.logits(h)

    def decode_step(self, ids, cache):
        self.steps += 1
        return self.inner.decode_step(ids, cache)

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()


def test_prompts_are_batched_and_results_reported_per_length(files, tok):
    """Prompts of one length share a prefill (batches of near-equal size); each length is reported when done."""
    model = _Counting(tiny_hylo())
    seen = []
    kw = dict(depths=[0.0, 1.0], trials=3, haystack=files / "hay.txt", on_length=seen.append)
    res = passkey_retrieval(model, tok, lengths=[128, 200], batch_size=4, **kw)
    n = 2 * 3  # prompts per length
    assert model.prefills == [3, 3, 3, 3]  # ceil(6 / 4) = 2 batches per length, sizes differing by at most 1
    assert res["batches"] == {"128": [3, 3], "200": [3, 3]}
    assert model.steps == len(model.prefills) * (res["max_new_tokens"] - 1)  # a few decode steps per batch
    assert [s["lengths"] for s in seen] == [[128], [128, 200]] and [s["complete"] for s in seen] == [False, True]
    assert len(seen[0]["results"]) == n and np.array(seen[0]["accuracy"]).shape == (1, 2)
    assert seen[-1]["accuracy"] == res["accuracy"]
    # without a batch size: as many rows as fit in batch_tokens
    model.prefills.clear()
    res = passkey_retrieval(model, tok, lengths=[128, 200], batch_tokens=400, **kw)
    assert model.prefills == [3, 3, 2, 2, 2]  # 400 // 128 = 3 rows, 400 // 200 = 2 rows
    assert len(model.prefills) <= sum(-(-n // (400 // L)) for L in (128, 200))


def test_tokenizer_encoder_built_once(files, tok, monkeypatch):
    """Building the fast encoder costs ~0.1 s with a 16k vocabulary; it must not happen per prompt."""
    import tokenizers

    import hylo.eval.ppl as ppl

    calls = []
    real = tokenizers.Tokenizer.from_str
    monkeypatch.setattr(tokenizers.Tokenizer, "from_str", lambda s: calls.append(1) or real(s))
    ppl._FAST_ENCODERS.clear()
    passkey_retrieval(tiny_hylo(), tok, lengths=[128, 160], depths=[0.0, 0.5, 1.0], trials=2,
                      haystack=files / "hay.txt", generate=_oracle(tok))
    assert len(calls) == 1


def test_cli_keeps_finished_lengths_when_interrupted(files, tok, tmp_path, monkeypatch):
    from hylo.eval import retrieval

    model = tiny_hylo()
    d = tmp_path / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    real = retrieval.greedy_generate

    def gen(m, x, n, prec=None):
        if x.shape[1] == 180:
            raise KeyboardInterrupt  # as if the run were stopped during the second length
        return real(m, x, n, prec)

    monkeypatch.setattr(retrieval, "greedy_generate", gen)
    out = tmp_path / "ret"
    r = runner.invoke(app, ["eval", "retrieval", str(d), "--lengths", "140,180", "--depths", "0,1", "--trials", "2",
                            "--haystack", str(files / "hay.txt"), "--out", str(out), "--device", "cpu"])
    assert r.exit_code != 0
    doc = json.loads((out / "retrieval.json").read_text())["result"]
    assert doc["lengths"] == [140] and doc["lengths_requested"] == [140, 180] and not doc["complete"]
    assert len(doc["results"]) == 4 and (out / "retrieval.png").stat().st_size > 0


@pytest.mark.parametrize("n,rows", [(25, 32), (25, 8), (8, 3), (6, 4), (1, 1), (0, 3)])
def test_even_batches(n, rows):
    from hylo.eval.retrieval import even_batches

    got = even_batches(n, rows)
    assert len(got) == -(-n // rows) and [i for r in got for i in r] == list(range(n))
    sizes = [len(r) for r in got]
    assert all(0 < s <= rows for s in sizes) and (not sizes or max(sizes) - min(sizes) <= 1)
