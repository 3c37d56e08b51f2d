"""lm-evaluation-harness integration: task builder, the `hylo` model's scoring and generation against direct
computations, lm_eval runs on hylo and on a transformers Llama, and the errors a user sees."""

import gzip
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from hylo.eval.tasks import TASKS, TaskBuildError, build_tasks

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "corpus" / "gutenberg_val.txt.gz"
pytestmark = pytest.mark.skipif(not CORPUS.is_file(), reason=f"held-out corpus not found at {CORPUS}")
SEP = "\n<|endoftext|>\n"
SMALL = dict(vocab_size=512, hidden_size=32, layers="m2 f a f", attn_num_heads=4, attn_num_kv_heads=2,
             mamba2_head_dim=16, mamba2_state_size=16, mamba2_chunk_size=16, num_meta_tokens=2)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A slice of 4 held-out books, a 512-token BPE trained on it, tasks built from it, a tiny hylo model folder."""
    from hylo import HybridLM, HyloConfig
    from hylo.data import train_tokenizer

    root = tmp_path_factory.mktemp("harness")
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        books = f.read(2_000_000).split(SEP)[:-1]
    (root / "corpus").mkdir()
    (root / "corpus" / "books.txt").write_text(SEP.join(b[:50000] for b in books[:4]), encoding="utf-8")
    tok = train_tokenizer(root / "corpus", 512, root / "tok", show_progress=False)
    build_tasks(root / "tasks", corpus=root / "corpus", n=12, seed=0)
    torch.manual_seed(0)
    model = HybridLM(HyloConfig(**SMALL)).eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return SimpleNamespace(root=root, tok=tok, model=model, tasks=root / "tasks")


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_build_tasks_deterministic_with_right_answers(env, tmp_path):
    corpus = env.root / "corpus"
    build_tasks(tmp_path / "a", corpus=corpus, n=12, seed=0)
    build_tasks(tmp_path / "b", corpus=corpus, n=12, seed=1)
    for f in ("hylo_lastword.jsonl", "hylo_nextsent.jsonl", "hylo_ppl.jsonl"):
        assert (tmp_path / "a" / f).read_bytes() == (env.tasks / f).read_bytes(), f  # same seed: same bytes
        assert (tmp_path / "b" / f).read_bytes() != (env.tasks / f).read_bytes(), f  # other seed: other examples
    text = re.sub(r"\s+", " ", (corpus / "books.txt").read_text(encoding="utf-8"))

    last = _rows(env.tasks / "hylo_lastword.jsonl")
    assert len(last) == 12 and len({r["id"] for r in last}) == 12
    for r in last:
        assert r["text"] == f"{r['context']} {r['target']}" and r["target"].isalpha()
        tail = " ".join(r["context"].split()[-12:])
        # the passage really ends with the target word, followed by sentence-final punctuation in the corpus
        assert re.search(re.escape(f"{tail} {r['target']}") + r"[.!?]", text), r["id"]
        assert len(r["context"].split()) >= 30

    labels = set()
    for r in _rows(env.tasks / "hylo_nextsent.jsonl"):
        ans = r["choices"][r["label"]]
        labels.add(r["label"])
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4  # distractors differ from the answer
        assert f"{r['context']} {ans}" in text  # the answer is the sentence that follows the context
        for d in r["choices"]:
            assert d in text
            if d != ans:
                assert f"{r['context']} {d}" not in text
    assert len(labels) > 1

    for r in _rows(env.tasks / "hylo_ppl.jsonl"):
        assert all(re.sub(r"\s+", " ", p) in text for p in r["text"].split("\n\n"))
        assert len(r["text"].split()) >= 150

    for task in TASKS:  # YAMLs point at the data written next to them
        cfg = yaml.safe_load((env.tasks / f"{task}.yaml").read_text())
        assert cfg["task"] == task and "hylo" in cfg["tag"]
        assert Path(cfg["dataset_kwargs"]["data_files"]["test"]).is_file()

    with pytest.raises(TaskBuildError, match="n must be an int"):
        build_tasks(tmp_path / "c", corpus=corpus, n=0)
    with pytest.raises(TaskBuildError, match="no such file"):
        build_tasks(tmp_path / "c", corpus=tmp_path / "missing.txt.gz")


def _direct_scores(model, rows, L):
    """(sum log p, greedy) per (ctx, cont) from one unbatched full forward each, as lm_eval defines them."""
    out = []
    for ctx, cont in rows:
        inp = (ctx + cont)[-(L + 1):][:-1]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inp])).logits[0].float(), -1)[-len(cont):]
        tgt = torch.tensor(cont)
        out.append((logp.gather(1, tgt[:, None]).sum().item(), bool((logp.argmax(-1) == tgt).all())))
    return out


def test_hylo_scores_match_direct_computation(env):
    """Right-padded batches of mixed lengths, left truncation, rolling windows and greedy generation all agree
    with plain unbatched forwards, on a model with every operator (padding must never leak into a row)."""
    from hylo import HybridLM
    from hylo.eval.harness import HyloLM
    from hylo.presets import preset

    torch.manual_seed(0)
    model = HybridLM(preset("tiny-all")).eval()
    L = 40
    lm = HyloLM(pretrained=model, tokenizer=env.tok, batch_size=3, max_length=L, device="cpu", max_gen_toks=6)
    g = torch.Generator().manual_seed(1)
    rows = [(torch.randint(0, 512, (n,), generator=g).tolist(), torch.randint(0, 512, (c,), generator=g).tolist())
            for n, c in ((5, 3), (30, 1), (50, 4), (12, 2), (1, 7), (20, 5), (3, 1))]
    # a continuation that is the model's own greedy choice must be reported greedy
    ctx = rows[0][0]
    with torch.no_grad():
        greedy = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
    rows.append((ctx, [greedy]))
    got = lm.score_tokens(rows)
    want = _direct_scores(model, rows, L)
    for (a, ga), (b, gb) in zip(got, want):
        assert a == pytest.approx(b, abs=2e-4) and ga == gb
    assert want[-1][1] and not all(w[1] for w in want)

    # strings through lm_eval's request path (tokenization + empty context = prefix token)
    reqs = [SimpleNamespace(args=("The old man said", " nothing at all")), SimpleNamespace(args=("", "Once"))]
    enc = [(env.tok.encode("The old man said"), env.tok.encode(" nothing at all")),
           ([lm.prefix_token_id], env.tok.encode("Once"))]
    for (a, ga), (b, gb) in zip(lm.loglikelihood(reqs, disable_tqdm=True), _direct_scores(model, enc, L)):
        assert a == pytest.approx(b, abs=2e-4) and ga == gb

    # rolling: a text longer than max_length is scored in windows, every token exactly once
    text = "It was a bright cold day in April, and the clocks were striking thirteen. " * 4
    ids = env.tok.encode(text)
    assert len(ids) > L
    (rolled,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))], disable_tqdm=True)
    seq = [lm.prefix_token_id] + ids
    want_sum, s = 0.0, 0
    while s < len(ids):  # windows of L predictions, each with as much context as fits
        e = min(s + L, len(ids))
        want_sum += _direct_scores(model, [(seq[max(0, e + 1 - L - 1):s + 1], ids[s:e])], L)[0][0]
        s = e
    assert rolled == pytest.approx(want_sum, abs=1e-3)

    # greedy generation (hylo's engine) equals argmax over full forwards, cut before the stop string
    prompt = "The night was perfect, and"
    p_ids = env.tok.encode(prompt)
    seq = list(p_ids)
    for _ in range(6):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    ref = env.tok.decode(seq[len(p_ids):], skip_special_tokens=True)
    (full,) = lm.generate_until([SimpleNamespace(args=(prompt, {"until": ["\n\n\n"], "max_gen_toks": 6}))],
                                disable_tqdm=True)
    assert full == ref
    stop = ref.strip()[1:3]
    (cut,) = lm.generate_until([SimpleNamespace(args=(prompt, {"until": [stop], "max_gen_toks": 6}))],
                               disable_tqdm=True)
    assert cut == ref.split(stop)[0]


def _metrics(res, task):
    return {k.split(",")[0]: v for k, v in res["results"][task].items() if "," in k and "stderr" not in k}


@pytest.fixture
def only_local_tasks(monkeypatch):
    """lm_eval's command line indexes its ~14,000 built-in task YAMLs on every run (tens of seconds on a CI core);
    the tests need only the built folder, so the CLI's TaskManager skips the built-ins."""
    from hylo.eval import harness

    harness.load_model()
    import lm_eval.tasks

    tm = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda *a, **k: tm(*a, **{**k, "include_defaults": False}))


def test_lm_eval_runs_hylo_on_local_tasks(env, tmp_path, only_local_tasks):
    from hylo.eval import harness

    tm = harness.task_manager(env.tasks, include_defaults=False)  # lm_eval's 14k built-in tasks: not needed
    res = harness.simple_evaluate(model="hylo", model_args=f"pretrained={env.root / 'model'},max_length=64",
                                  tasks=["hylo"], task_manager=tm, limit=2, batch_size=4, device="cpu",
                                  bootstrap_iters=0)
    assert set(res["results"]) == set(TASKS)
    m = {t: _metrics(res, t) for t in TASKS}
    assert 0 <= m["hylo_lastword"]["acc"] <= 1 and m["hylo_lastword"]["perplexity"] > 1
    assert 0 <= m["hylo_nextsent"]["acc"] <= 1 and 0 <= m["hylo_nextsent"]["acc_norm"] <= 1
    assert 0 <= m["hylo_lastword_gen"]["exact_match"] <= 1
    # an untrained model: about uniform over 512 tokens, i.e. ~9 bits per token, several bits per byte
    assert 1 < m["hylo_ppl"]["bits_per_byte"] < 20 and math.isfinite(m["hylo_ppl"]["word_perplexity"])

    # the lm_eval command line with --model hylo (what `python -m hylo.eval.harness` runs)
    harness.main(["--model", "hylo", "--model_args", f"pretrained={env.root / 'model'},max_length=64",
                  "--tasks", "hylo_nextsent", "--include_path", str(env.tasks), "--limit", "2", "--device", "cpu",
                  "--output_path", str(tmp_path / "out")])
    out = next((tmp_path / "out").rglob("results_*.json"))
    assert json.loads(out.read_text())["results"]["hylo_nextsent"]["acc,none"] == m["hylo_nextsent"]["acc"]


def test_same_tasks_on_transformers_llama(env):
    """lm_eval's own `hf` model runs the built tasks offline; the `hylo` model on the same Llama folder gives the
    same numbers, so hylo's scoring follows lm_eval's conventions exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hylo.eval import harness

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                      eos_token_id=env.tok.eos_token_id, bos_token_id=env.tok.bos_token_id)
    path = env.root / "llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    env.tok.save_pretrained(path)
    tasks = ["hylo_lastword", "hylo_nextsent"]
    common = dict(tasks=tasks, task_manager=harness.task_manager(env.tasks, include_defaults=False), limit=3,
                  batch_size=2, device="cpu", bootstrap_iters=0)
    hf = harness.simple_evaluate(model="hf", model_args=f"pretrained={path},dtype=float32", **common)
    hy = harness.simple_evaluate(model="hylo", model_args=f"pretrained={path}", **common)
    for t in tasks:
        a, b = _metrics(hf, t), _metrics(hy, t)
        assert set(a) == set(b) and a
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4), (t, k)


def test_clear_errors(env, capsys, only_local_tasks):
    from hylo.eval.common import EvalError
    from hylo.eval.harness import HyloLM, main

    with pytest.raises(EvalError, match="does-not-exist: no such file or folder"):
        HyloLM(pretrained=str(env.root / "does-not-exist"), device="cpu")
    with pytest.raises(EvalError, match="no tokenizer found"):
        tokless = env.root / "tokless"
        env.model.save_pretrained(tokless)
        HyloLM(pretrained=str(tokless), device="cpu")
    with pytest.raises(SystemExit) as e:
        main(["--model", "hylo", "--model_args", f"pretrained={env.root / 'model'}", "--tasks", "hylo_lastwrod",
              "--include_path", str(env.tasks), "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "hylo_lastwrod" in err and "not found" in err
    with pytest.raises(SystemExit) as e:
        main(["--model", "hylo", "--model_args", f"pretrained={env.root / 'nope'}", "--tasks", "hylo_lastword",
              "--include_path", str(env.tasks), "--device", "cpu"])
    assert e.value.code == 2 and "nope: no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # hylo's tasks named without the folder they were built in
        main(["--model", "hylo", "--model_args", f"pretrained={env.root / 'model'}", "--tasks", "hylo_nextsent"])
    assert e.value.code == 2 and "build-tasks" in capsys.readouterr().err


def test_generate_greedy_batches_prompts_by_length(env):
    """Prompts go to the engine sorted by length (the engine prefills each distinct length of a call separately),
    and the texts come back in the caller's order, equal to generating each prompt alone."""
    from hylo.eval.harness import generate_greedy

    model = env.model
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 9, 5, 9, 5, 9)]
    prefills = []
    real = model.hidden_states

    def counting(ids=None, inputs_embeds=None, cache=None):
        if cache is not None:
            prefills.append(ids.shape[1])
        return real(ids, inputs_embeds, cache)

    model.hidden_states = counting
    try:
        got = generate_greedy(model, env.tok, prompts, 4, [], 3, 64)
    finally:
        del model.hidden_states
    assert sorted(prefills) == [5, 9]  # one prefill per length: [5, 5, 5] and [9, 9, 9] (unsorted: four)
    alone = [generate_greedy(model, env.tok, [p], 4, [], 1, 64)[0] for p in prompts]
    assert got == alone
