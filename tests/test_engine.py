"""Inference engine (CPU, no graphs): greedy decoding ≡ argmax over full forwards for ragged batches and chunked
prefill (every operator, meta tokens), stops, sampling, streaming text, errors, the runner and `hylo generate`."""

import pytest
import torch
from typer.testing import CliRunner

from hylo import HybridLM
from hylo.data import train_tokenizer
from hylo.engine import DecodeRunner, Engine, IncrementalDetokenizer, SamplingParams, sample
from hylo.engine.sampling import filter_logits
from hylo.presets import preset


def perturb(model, seed=1):
    """Random values in every parameter, so zero-initialised parts (JetBlock's generator) matter and greedy
    continuations vary instead of repeating one token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def tiny_all(**kw):
    torch.manual_seed(0)
    return perturb(HybridLM(preset("tiny-all", **kw)).eval())


@pytest.fixture(scope="module")
def model():
    return tiny_all()


def reference_greedy(model, prompt, n):
    """Argmax continuation recomputing the full forward for every new token."""
    seq = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(seq).logits[0, -1].argmax())
            out.append(t)
            seq = torch.cat([seq, torch.tensor([[t]])], 1)
    return out


def prompts_of(lengths, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# ----------------------------------------------------------------------------- greedy ≡ full forward
@pytest.mark.parametrize("chunk", [4, 2048])
def test_ragged_batch_greedy_matches_full_forward(model, chunk):
    prompts = prompts_of([5, 13, 9])  # ragged, 3 rows -> bucket 4 with a dummy row; 13 > chunk 4
    eng = Engine(model, max_batch_size=4, max_seq_len=40, prefill_chunk=chunk)
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=8))
    assert eng.last_stats["bucket"] == 4 and not eng.last_stats["graphed"]
    for p, o in zip(prompts, outs):
        assert o.prompt_ids == p
        assert o.token_ids == reference_greedy(model, p, 8)
        assert o.finish_reason == "length" and o.text is None


def test_repeated_calls_reset_the_cache(model):
    eng = Engine(model, max_batch_size=2, max_seq_len=32, prefill_chunk=3)
    a, b = prompts_of([7, 4], seed=3)
    first = eng.generate([a], SamplingParams(max_new_tokens=6))[0].token_ids
    eng.generate([b, a], SamplingParams(max_new_tokens=6))  # other rows, other lengths in between
    assert eng.generate([a], SamplingParams(max_new_tokens=6))[0].token_ids == first == reference_greedy(model, a, 6)


def test_max_seq_len_caps_generation(model):
    p = prompts_of([10])[0]
    eng = Engine(model, max_batch_size=1, max_seq_len=14)
    out = eng.generate([p], SamplingParams(max_new_tokens=50))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    assert out.token_ids == reference_greedy(model, p, 4)


def test_stop_token_ends_one_row_others_continue(model):
    prompts = prompts_of([6, 11, 8], seed=5)
    refs = [reference_greedy(model, p, 8) for p in prompts]
    # a token that row 0 produces early and the other rows never produce
    stop = next(t for t in refs[0][1:5] if all(t not in r for r in refs[1:]))
    k = refs[0].index(stop)
    outs = Engine(model, max_batch_size=4, max_seq_len=32).generate(
        prompts, SamplingParams(max_new_tokens=8, stop_token_ids=[stop]))
    assert outs[0].token_ids == refs[0][:k + 1] and outs[0].finish_reason == "stop"
    for o, r in zip(outs[1:], refs[1:]):
        assert o.token_ids == r and o.finish_reason == "length"


# ----------------------------------------------------------------------------- sampling
def test_sampling_is_seeded_and_filters_reduce_to_greedy(model):
    prompts = prompts_of([5, 8], seed=7)
    eng = Engine(model, max_batch_size=2, max_seq_len=40)
    run = lambda **kw: [o.token_ids for o in eng.generate(prompts, SamplingParams(max_new_tokens=8, **kw))]
    greedy = run()
    sampled = run(temperature=1.5, seed=1)
    assert sampled == run(temperature=1.5, seed=1)
    assert sampled != run(temperature=1.5, seed=2)
    assert sampled != greedy
    assert run(temperature=1.5, top_k=1, seed=3) == greedy
    assert run(temperature=1.5, top_p=1e-6, seed=3) == greedy


def test_sample_follows_the_distribution_and_the_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(40000, 4)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(sample(logits, 1.0, generator=g), minlength=4).float() / 40000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.01, rtol=0)
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, top_p=0.7, generator=g).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(sample(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    f = filter_logits(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), top_k=2)
    assert torch.isinf(f).tolist() == [[True, False, False, True]]
    assert sample(torch.tensor([[0.0, 2.0, 1.0]]), 0.0).tolist() == [1]


# ----------------------------------------------------------------------------- text
TEXT = ("The quick brown fox jumps over the lazy dog. Café crème, naïve façade; 日本語のテキスト 🙂.\n"
        "Pack my box with five dozen liquor jugs. Über grüne Wiesen! ") * 40


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_tok")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    train_tokenizer(root / "text.txt", 300, root / "tok", min_frequency=1, show_progress=False)
    return root / "tok"


@pytest.fixture(scope="module")
def tok(tok_dir):
    from hylo.data import load_tokenizer

    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def text_model(tok):
    return tiny_all(vocab_size=len(tok))


def test_detokenizer_never_splits_characters(tok):
    text = "naïve 日本語 🙂 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    d = IncrementalDetokenizer(tok, [])
    deltas = [d.add(i) for i in ids] + [d.flush()]
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) == text


def test_text_generation_streams_deltas_that_add_up(text_model, tok):
    eng = Engine(text_model, tok, max_batch_size=2, max_seq_len=64)
    prompts = ["The quick brown", "日本語"]
    sp = SamplingParams(max_new_tokens=20, temperature=1.0, seed=0, ignore_eos=True)
    outs = eng.generate(prompts, sp)
    streamed = {0: "", 1: ""}
    for row, delta in eng.stream(prompts, sp):
        assert isinstance(delta, str) and delta
        streamed[row] += delta
    for i, o in enumerate(outs):
        assert o.prompt_ids[0] == tok.bos_token_id and o.prompt_ids[1:] == tok.encode(prompts[i])
        assert o.text == tok.decode(o.token_ids, skip_special_tokens=True) == streamed[i]
        assert eng.last_outputs[i] == o


def test_stop_strings_cut_the_text(text_model, tok):
    eng = Engine(text_model, tok, max_batch_size=2, max_seq_len=64)
    prompts = ["Pack my", "The quick"]
    sp = SamplingParams(max_new_tokens=30, temperature=1.0, seed=4, ignore_eos=True)
    full, other = (o.text for o in eng.generate(prompts, sp))
    # a 2-character stop string first seen at j >= 3 in row 0 and absent from row 1 (random weights also give
    # invalid UTF-8, shown as U+FFFD)
    j = next(j for j in range(3, len(full) - 1) if "\ufffd" not in full[j:j + 2] and full.find(full[j:j + 2]) == j
             and full[j:j + 2] not in other)
    stop = full[j:j + 2]
    got = {0: "", 1: ""}
    outs = eng.generate(prompts, SamplingParams(**{**sp.__dict__, "stop_strings": ["never here", stop]}),
                        on_delta=lambda row, d: got.__setitem__(row, got[row] + d))
    assert outs[0].finish_reason == "stop" and outs[0].text == full[:j] == got[0]
    assert tok.decode(outs[0].token_ids, skip_special_tokens=True).startswith(full[:j] + stop)
    assert outs[1].finish_reason == "length" and outs[1].text == other == got[1]  # the other row runs on


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_are_clear_errors(model, tok):
    eng = Engine(model, max_batch_size=2, max_seq_len=16)
    cases = [
        (lambda: eng.generate([list(range(16))]), "max_seq_len"),
        (lambda: eng.generate([[1], [2], [3]]), "max_batch_size"),
        (lambda: eng.generate([[]]), "empty"),
        (lambda: eng.generate([]), "no prompts"),
        (lambda: eng.generate([1, 2, 3]), "list of prompts"),
        (lambda: eng.generate([[1, 600]]), "outside"),
        (lambda: eng.generate(["hi"]), "tokenizer"),
        (lambda: eng.generate([[1]], SamplingParams(temperature=-1)), "temperature"),
        (lambda: eng.generate([[1]], SamplingParams(top_p=0)), "top_p"),
        (lambda: eng.generate([[1]], SamplingParams(top_k=-2)), "top_k"),
        (lambda: eng.generate([[1]], SamplingParams(max_new_tokens=0)), "max_new_tokens"),
        (lambda: eng.generate([[1]], SamplingParams(stop_token_ids=[512])), "stop_token_ids"),
        (lambda: eng.generate([[1]], SamplingParams(stop_strings=["x"])), "stop_strings"),
        (lambda: Engine(model, max_batch_size=0), "max_batch_size"),
        (lambda: Engine(model, cuda_graphs=True), "CUDA"),
        (lambda: Engine(tok, max_batch_size=1), "hylo models"),
    ]
    for fn, words in cases:
        with pytest.raises((ValueError, TypeError), match=words):
            fn()
    with pytest.raises(ValueError, match="empty"):
        Engine(model, tok).generate([""])


# ----------------------------------------------------------------------------- runner
def test_runner_step_reset_and_positions(model):
    r = DecodeRunner(model, 2, 12)
    assert not r.graphed and r.positions() == [0, 0]
    cache = model.new_cache(2, 12)
    ids = torch.tensor([[3, 4], [5, 6], [7, 8]])
    for t in ids:
        torch.testing.assert_close(r.step(t), model.decode_step(t, cache))
    assert r.positions() == [3, 3]
    r.reset()
    torch.testing.assert_close(r.step(ids[0]), model.decode_step(ids[0], model.new_cache(2, 12)))
    r.set_positions([4, 11])
    assert r.positions() == [4, 11]
    r.step(ids[0])
    with pytest.raises(ValueError, match="full"):
        r.step(ids[0])
    with pytest.raises(ValueError, match="positions"):
        r.set_positions(12)
    with pytest.raises(ValueError, match="CUDA"):
        DecodeRunner(model, 1, 8, cuda_graph=True)


def test_compiled_decode_step_matches_eager():
    """``compile=True``: the step through inductor, one graph without breaks, same greedy tokens as the full
    forward with every operator, meta tokens and the weight-normalized head, over two calls on one cache."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m = tiny_all(weight_norm=True)
    eng = Engine(m, max_batch_size=1, max_seq_len=24, prefill_chunk=5, compile=True)
    for prompts in (prompts_of([11], seed=3), prompts_of([7], seed=4)):
        outs = eng.generate(prompts, SamplingParams(max_new_tokens=6))
        for p, o in zip(prompts, outs):
            assert o.token_ids == reference_greedy(m, p, 6)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_block_scoped_compile_shares_one_graph_per_kind_of_block(monkeypatch):
    """HYLO_COMPILE_SCOPE=block: each block's step compiled on its own, so the 6 attention and 6 FFN blocks give
    2 graphs in all, not one graph of 12 blocks; the logits equal eager ones over three steps. With the GEMV on
    (its launch stood in for by the reference on the CPU), whose per-module forward patch must not split them."""
    from torch._dynamo.utils import counters

    from hylo.engine import kernel_step
    from hylo.engine import runner as R
    from hylo.ops import backend
    from hylo.ops import gemv as G

    monkeypatch.setattr(G, "triton_interpreting", lambda: True)  # the GEMV "supported" on the CPU
    monkeypatch.setattr(backend, "triton_interpreting", lambda: True)
    monkeypatch.setattr(G, "_launch", lambda x, w, b, nw, eps, r, swiglu, *rest, **kw: G.gemv_ref(x, w, b, nw, eps,
                                                                                               r, swiglu))
    torch.manual_seed(0)
    m = HybridLM(preset("qwen3-0.6b", vocab_size=128, hidden_size=32, attn_num_heads=2, attn_num_kv_heads=1,
                        attn_head_dim=16, ffn_intermediate_size=64, layers=" ".join(["a f"] * 6))).eval()
    torch._dynamo.reset()
    counters.clear()
    with G.gemv_mode("on"), R.compile_scope_mode("block"), kernel_step.kernel_step_mode("off"):  # else it takes a f
        r = DecodeRunner(m, 2, 16, compile=True)
        assert r.gemv and r.compile_scope == "block"
        ref = DecodeRunner(m, 2, 16)
        ids = torch.tensor([[3, 4], [5, 6], [7, 1]])
        for t in ids:
            torch.testing.assert_close(r.step(t), ref.step(t), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- CLI
def test_cli_generate(text_model, tok, tmp_path):
    from hylo.cli import app

    text_model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cli = CliRunner()
    one = cli.invoke(app, ["generate", str(tmp_path / "m"), "-p", "The quick", "-n", "8", "--device", "cpu",
                           "--ignore-eos"])
    assert one.exit_code == 0, one.output
    eng = Engine(text_model, tok, max_batch_size=1, max_seq_len=32)
    expected = eng.generate(["The quick"], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].text
    assert "The quick" + expected in one.output
    two = cli.invoke(app, ["generate", str(tmp_path / "m"), "-p", "Pack my", "-p", "Über", "-n", "5", "--device",
                           "cpu", "--temperature", "0.8", "--seed", "1"])
    assert two.exit_code == 0, two.output
    assert "prompt 0" in two.output and "prompt 1" in two.output and "tokens/s" in two.output
    bad = cli.invoke(app, ["generate", str(tmp_path / "m"), "-p", "x", "--top-p", "2", "--device", "cpu"])
    assert bad.exit_code == 1 and "top_p" in bad.output
