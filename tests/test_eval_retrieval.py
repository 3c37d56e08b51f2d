"""`hylo eval retrieval`: prompts of exact length with the needle at the requested depth, the scorer, an oracle that
reads the key scores 1.0, cached greedy decoding matches full forwards, the teacher-forced key log-prob is exactly
that of the key's tokens (batched or not) and its gain over the control is > 0 for a copying model and 0 for one
blind to the context, and the CLI writes JSON and heat maps."""

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
    gain = np.array(doc["result"]["key_logprob_gain"])
    assert gain.shape == (2, 2) and np.isfinite(gain).all() and "key log-prob gain" in r.output
    assert all(r["key_logprob"] <= 0 and r["key_tokens"] >= 1 for r in doc["result"]["results"])
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
    # ceil(6 / 4) = 2 batches per length, sizes differing by at most 1; each batch: the prompts' prefill (greedy
    # decoding and the key's teacher-forced score share it), then the control prompts' (same shape)
    assert model.prefills == [3] * 8
    assert res["batches"] == {"128": [3, 3], "200": [3, 3]}
    # decode steps per batch: greedy, plus the key's tokens but the first for the prompts and for the controls
    k = [max(r["key_tokens"] for r in res["results"][i:i + 3]) for i in range(0, 4 * 3, 3)]
    assert model.steps == sum(res["max_new_tokens"] - 1 + 2 * (kb - 1) for kb in k)
    assert [s["lengths"] for s in seen] == [[128], [128, 200]] and [s["complete"] for s in seen] == [False, True]
    assert len(seen[0]["results"]) == n and np.array(seen[0]["accuracy"]).shape == (1, 2)
    assert seen[-1]["accuracy"] == res["accuracy"]
    # without a batch size: as many rows as fit in batch_tokens
    model.prefills.clear()
    res = passkey_retrieval(model, tok, lengths=[128, 200], batch_tokens=400, key_logprob=False, **kw)
    assert model.prefills == [3, 3, 2, 2, 2]  # 400 // 128 = 3 rows, 400 // 200 = 2 rows
    assert len(model.prefills) <= sum(-(-n // (400 // L)) for L in (128, 200))
    assert "key_logprob_gain" not in res and "key_logprob" not in res["results"][0]


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

    def gen(m, x, n, prec=None, **kw):
        if x.shape[1] == 180:
            raise KeyboardInterrupt  # as if the run were stopped during the second length
        return real(m, x, n, prec, **kw)

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


# ------------------------------------------------------------------ the teacher-forced key log-prob and its control
def _direct_key_logprobs(model, prompt, key):
    """log p(key[i] | prompt, key[:i]) from one full forward of ``prompt + key`` (no cache, no batching)."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(key)])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return torch.stack([lp[len(prompt) - 1 + i, t] for i, t in enumerate(key)])


def test_key_logprobs_score_exactly_the_key_tokens(hay_ids):
    """Batched (keys of different lengths padded), through the cache and decode steps, and fused with greedy
    decoding: the same numbers as a direct forward of each prompt + key alone."""
    from hylo.eval.retrieval import key_logprobs

    model = tiny_hylo(2)
    x = torch.as_tensor(np.stack([hay_ids[:48], hay_ids[300:348], hay_ids[700:748]]))
    keys = [[5, 17, 300], [9], [44, 45]]
    kx = torch.tensor([k + k[-1:] * (3 - len(k)) for k in keys])
    got = key_logprobs(model, x, kx)
    tokens, fused = greedy_generate(model, x, 4, key_ids=kx)
    for b, k in enumerate(keys):
        want = _direct_key_logprobs(model, x[b].tolist(), k)
        torch.testing.assert_close(got[b, :len(k)], want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fused[b, :len(k)], want, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, greedy_generate(model, x, 4))  # scoring the key does not disturb decoding


def test_key_logprobs_transformers_model(hay_ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hylo.eval.retrieval import key_logprobs

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    x = torch.as_tensor(np.stack([hay_ids[:30], hay_ids[50:80]]))
    kx = torch.tensor([[7, 8, 9], [10, 11, 11]])
    got = key_logprobs(llama, x, kx)
    for b in range(2):
        torch.testing.assert_close(got[b], _direct_key_logprobs(llama, x[b].tolist(), kx[b].tolist()),
                                   atol=1e-4, rtol=1e-4)


def test_control_key_differs_at_every_digit_and_keeps_the_needle_length(tok):
    from hylo.eval.retrieval import control_key

    rng = np.random.default_rng(0)
    n_tokens = lambda k: len(tok(NEEDLE.format(key=k), add_special_tokens=False)["input_ids"])  # noqa: E731
    keys = [str(k) for k in np.random.default_rng(1).integers(10_000, 100_000, 40)] + ["12345", "99999", "10000"]
    for key in keys:
        c = control_key(key, rng, n_tokens)
        assert len(c) == len(key) and c[0] != "0" and all(a != b for a, b in zip(key, c)), (key, c)
    # a needle length rule it can meet: the control has the key's class whenever a digit-different key can
    rule = lambda k: k[0] in "13"  # noqa: E731  (e.g. " 1" and " 3" are tokens, " 8" is " " + "8")
    for key in keys:
        c = control_key(key, rng, rule)
        assert rule(c) == rule(key) and all(a != b for a, b in zip(key, c)), (key, c)
    # and when it cannot (the only "7"-class key is "7..." itself), still a digit-different key
    c = control_key("70000", rng, lambda k: k[0] == "7")
    assert c[0] not in "07" and all(a != b for a, b in zip("70000", c))


class _ToyLM(torch.nn.Module):
    """A context model with known logits (+``boost`` on one token, 0 elsewhere). ``copy``: the token that followed
    the most recent earlier occurrence of the longest suffix that occurred before (an idealized induction head);
    else a fixed function of the current token only (a bigram model: ignores the context)."""

    def __init__(self, copy: bool, vocab: int = 512, boost: float = 5.0):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 1)
        self.copy, self.vocab, self.boost = copy, vocab, boost

    def get_input_embeddings(self):
        return self.emb

    def _predict(self, ids: list[int], t: int) -> int:
        if self.copy:
            for m in range(min(t, 12), 0, -1):
                suffix = ids[t - m + 1:t + 1]
                for j in range(t - 1, m - 2, -1):
                    if ids[j - m + 1:j + 1] == suffix:
                        return ids[j + 1]
        return (ids[t] * 7 + 3) % self.vocab

    def forward(self, input_ids, logits_to_keep=0, **kw):
        from types import SimpleNamespace

        B, T = input_ids.shape
        keep = T if not logits_to_keep else logits_to_keep
        out = torch.zeros(B, keep, self.vocab)
        for b, row in enumerate(input_ids.tolist()):
            for i, t in enumerate(range(T - keep, T)):
                out[b, i, self._predict(row, t)] = self.boost
        return SimpleNamespace(logits=out)


def _toy_generate(model, ids, n):
    for _ in range(n):
        ids = torch.cat([ids, model(ids, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[:, -n:]


def test_copying_model_gains_and_context_blind_model_does_not(files, tok):
    kw = dict(lengths=[128, 180], depths=[0.0, 0.5, 1.0], trials=2, haystack=files / "hay.txt", batch_size=3,
              generate=_toy_generate)
    log_z = float(np.log(np.exp(5.0) + 511))
    cp = passkey_retrieval(_ToyLM(copy=True), tok, **kw)
    assert cp["overall"] == 1.0  # it copies the key greedily too
    for r in cp["results"]:
        assert r["key_logprob"] == pytest.approx(5.0 - log_z, abs=1e-3)  # every key token predicted
        assert r["key_logprob_gain_first"] == pytest.approx(5.0, abs=1e-3)  # the control predicts its own digit
        assert r["key_logprob_gain"] > 1.0 and r["control_key"] != r["key"]
    gain = np.array(cp["key_logprob_gain"])
    assert gain.shape == (2, 3) and (gain > 1.0).all() and cp["key_logprob_gain_overall"] > 1.0
    assert set(cp["key_logprob_gain_by_length"]) == {"128", "180"}

    blind = passkey_retrieval(_ToyLM(copy=False), tok, **kw)
    assert blind["overall"] == 0.0
    assert all(abs(r["key_logprob_gain"]) < 1e-6 for r in blind["results"])
    assert np.abs(np.array(blind["key_logprob_gain"])).max() < 1e-6
    assert [r["key"] for r in blind["results"]] == [r["key"] for r in cp["results"]]


def test_batching_does_not_change_the_key_logprobs(files, tok):
    kw = dict(lengths=[140], depths=[0.0, 1.0], trials=3, haystack=files / "hay.txt")
    one = passkey_retrieval(tiny_hylo(3), tok, batch_size=1, **kw)
    all_ = passkey_retrieval(tiny_hylo(3), tok, batch_size=6, **kw)
    assert all_["batches"] == {"140": [6]} and one["batches"] == {"140": [1] * 6}
    for a, b in zip(one["results"], all_["results"]):
        assert a["answer"] == b["answer"]
        for f in ("key_logprob", "key_logprob_control", "key_logprob_gain"):
            assert a[f] == pytest.approx(b[f], abs=2e-4), f
    np.testing.assert_allclose(one["key_logprob_gain"], all_["key_logprob_gain"], atol=2e-4)
    # the accuracy fields keep their form
    assert one["accuracy"] == all_["accuracy"] and set(one["by_length"]) == {"140"}


def test_heatmap_draws_the_gain_panel(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = {"accuracy": [[0.0, 0.0]], "lengths": [1024], "depths": [0.0, 1.0], "trials": 4, "overall": 0.0,
           "model": "m", "key_logprob_gain": [[0.42, -0.05]], "key_logprob_gain_overall": 0.185}
    shown, images = [], []
    orig_text, orig_imshow = plt.Axes.text, plt.Axes.imshow
    try:
        plt.Axes.text = lambda self, x, y, s, *a, **k: shown.append(s) or orig_text(self, x, y, s, *a, **k)
        plt.Axes.imshow = lambda self, m, *a, **k: images.append(k) or orig_imshow(self, m, *a, **k)
        plot_heatmap(res, tmp_path / "h.png")
    finally:
        plt.Axes.text, plt.Axes.imshow = orig_text, orig_imshow
    assert shown == ["0.00", "0.00", "+0.42", "-0.05"]
    assert images[1]["vmin"] == -images[1]["vmax"] > -1  # centred on 0
    assert (tmp_path / "h.png").stat().st_size > 0
