"""MQAR (hylo.eval.mqar): the generator against a hand-written oracle, accuracy, loss masking, padding, the
harness and `hylo eval mqar` at toy sizes on the CPU."""

import dataclasses
import json
import time

import pytest
import torch
import typer
from typer.testing import CliRunner

from hylo.eval import mqar
from hylo.eval.mqar import HarnessConfig, MQARError, accuracy, generate


def oracle(row: list[int], num_pairs: int) -> dict[int, int]:
    """Position -> expected next token, read off one input row by hand: each key after the pairs asks for the
    value that followed it in the pairs."""
    table = {row[2 * i]: row[2 * i + 1] for i in range(num_pairs)}
    return {t: table[tok] for t, tok in enumerate(row) if t >= 2 * num_pairs and tok in table}


@pytest.mark.parametrize("noise", [False, True])
def test_every_query_asks_for_its_pairs_value(noise):
    V, n, L = 64, 6, 40
    d = generate(V, n, L, num_examples=200, seed=3, noise=noise)
    assert d.inputs.shape == d.targets.shape == (200, L)
    assert d.query_pos.shape == d.answers.shape == (200, n)
    for i in range(200):
        row, tgt = d.inputs[i].tolist(), d.targets[i].tolist()
        keys, values = row[0:2 * n:2], row[1:2 * n:2]
        assert len(set(keys)) == n and len(set(values)) == n
        assert all(1 <= k < V // 2 for k in keys) and all(V // 2 <= v < V for v in values)
        scored = {t: y for t, y in enumerate(tgt) if y != -100}
        assert len(scored) == n  # one query per key, every other position unscored
        assert sorted(row[t] for t in scored) == sorted(keys)
        assert all(t >= 2 * n and (t - 2 * n) % 2 == 0 for t in scored)
        if noise:  # random fillers may repeat a key by chance; the scored positions are the queries
            table = dict(zip(keys, values))
            assert all(table[row[t]] == y for t, y in scored.items())
        else:
            assert oracle(row, n) == scored
            assert all(tok == 0 for t, tok in enumerate(row) if t >= 2 * n and t not in scored)
        assert d.query_pos[i].tolist() == sorted(scored)
        assert d.answers[i].tolist() == [scored[t] for t in sorted(scored)]


def test_deterministic_for_a_seed():
    a, b = generate(128, 8, 64, 50, seed=7), generate(128, 8, 64, 50, seed=7)
    c = generate(128, 8, 64, 50, seed=8)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


def test_small_key_pool_still_unique():
    d = generate(vocab_size=2 * 9 + 2, num_pairs=9, seq_len=36, num_examples=100, seed=0)  # keys 1..9, all used
    assert all(sorted(r[0:18:2]) == list(range(1, 10)) for r in d.inputs.tolist())


def test_query_offsets_follow_a_decreasing_power_law():
    d = generate(1024, 4, 200, 4000, seed=1)
    slot = ((d.query_pos - 8) // 2).flatten()
    counts = torch.bincount(slot, minlength=96).float()
    assert counts[:10].sum() > 2 * counts[-10:].sum()
    u = generate(1024, 4, 200, 4000, seed=1, power_a=1.0)  # uniform offsets
    cu = torch.bincount(((u.query_pos - 8) // 2).flatten(), minlength=96).float()
    assert cu[:10].sum() < 1.5 * cu[-10:].sum()


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_size=64, num_pairs=8, seq_len=31), "seq_len=31 is too short"),
    (dict(vocab_size=16, num_pairs=8, seq_len=64), "vocab_size=16 is too small"),
    (dict(vocab_size=64, num_pairs=0, seq_len=64), "num_pairs=0"),
    (dict(vocab_size=64, num_pairs=2, seq_len=64, num_examples=0), "num_examples=0"),
    (dict(vocab_size=64, num_pairs=2, seq_len=64, power_a=0.0), "power_a=0.0"),
])
def test_invalid_settings_raise_clear_errors(kwargs, match):
    with pytest.raises(MQARError, match=match):
        generate(**kwargs)


def test_accuracy_against_the_oracle():
    d = generate(64, 4, 24, 30, seed=2)
    preds = torch.zeros_like(d.targets)
    for i, row in enumerate(d.inputs.tolist()):
        for t, y in oracle(row, 4).items():
            preds[i, t] = y
    assert accuracy(preds, d.targets) == (120, 120)
    wrong = preds.clone()
    wrong[torch.arange(5), d.query_pos[:5, 0]] = 0  # break 5 answers (0 is never a value)
    wrong[:, 0] = 7  # unscored positions do not count
    assert accuracy(wrong, d.targets) == (115, 120)
    logits = torch.nn.functional.one_hot(wrong, 64).float()
    assert accuracy(logits, d.targets) == (115, 120)


def test_loss_matches_hybridlm_labels_and_padding_is_exact():
    """mqar_loss (query positions only) equals HybridLM's own shifted-label loss with hf_labels, and right
    padding does not change causal predictions (attention and a recurrent operator)."""
    torch.manual_seed(0)
    from hylo.model import HybridLM

    model = HybridLM(mqar.model_config("a f d f", 32, 64)).eval()
    d = generate(64, 3, 20, 8, seed=4)
    with torch.no_grad():
        ours = mqar.mqar_loss(model, d.inputs, d.query_pos, d.answers)
        theirs = model(d.inputs, labels=d.hf_labels()).loss
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        p = mqar.pad_to(d, 28, 5)
        assert p.inputs.shape == (8, 28) and p.answers.shape == (8, 5) and (p.answers[:, 3:] == -100).all()
        torch.testing.assert_close(mqar.query_logits(model, p.inputs, p.query_pos)[:, :3],
                                   mqar.query_logits(model, d.inputs, d.query_pos), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mqar.mqar_loss(model, p.inputs, p.query_pos, p.answers), ours)


def _tiny(**kw) -> HarnessConfig:
    base = dict(patterns=["a f", "d f"], hidden=[32], train=[(16, 2), (32, 4)], test=[(16, 2), (32, 4), (32, 8)],
                vocab_size=64, train_examples=64, test_examples=16, steps=4, batch_size=8, log_interval=2,
                device="cpu")
    return HarnessConfig(**{**base, **kw})


def test_harness_writes_json_and_plot(tmp_path):
    logs = []
    res = mqar.run(_tiny(), log=logs.append)
    paths = mqar.save(res, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert [r["name"] for r in data["runs"]] == ["a f", "d f"]
    for r in data["runs"]:
        assert r["error"] is None and r["steps"] == 4
        assert set(r["accuracy"]) == {"16x2", "32x4", "32x8"}
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
    assert len(data["table"]) == 6
    assert {"pattern", "hidden", "seq_len", "num_pairs", "accuracy"} <= set(data["table"][0])
    assert paths["png"].stat().st_size > 1000
    assert any("d f" in line for line in logs)


def test_harness_records_a_failing_model_and_goes_on(monkeypatch):
    real = mqar.train_one

    def flaky(pattern, *a, **k):
        if pattern == "d f":
            raise RuntimeError("kernel exploded")
        return real(pattern, *a, **k)

    monkeypatch.setattr(mqar, "train_one", flaky)
    res = mqar.run(_tiny(patterns=["d f", "a f"], steps=2), log=lambda s: None)
    assert res["runs"][0]["error"] == "RuntimeError: kernel exploded"
    assert res["runs"][1]["error"] is None and res["runs"][1]["accuracy"]
    assert [r["accuracy"] for r in res["table"] if r["pattern"] == "d f"] == [None] * 3


def test_harness_rejects_bad_settings():
    with pytest.raises(MQARError, match="seq_len=16 is too short"):
        _tiny(test=[(16, 8)]).validate()
    with pytest.raises(ValueError, match="layers"):
        _tiny(patterns=["a q"]).validate()


def test_cli_takes_several_values_per_flag(tmp_path):
    app = typer.Typer()
    mqar.register(app)
    app.command("noop")(lambda: None)  # a second command keeps `mqar` a subcommand, as under `hylo eval`
    out = tmp_path / "res"
    r = CliRunner().invoke(app, ["mqar", "--patterns", "a f", "swa f", "--hidden", "32", "--seq-lens", "16", "32",
                                 "--pairs", "2", "4", "8", "--steps", "2", "--vocab-size", "64",
                                 "--train-examples", "32", "--test-examples", "8", "--swa-window", "4",
                                 "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "mqar.json").read_text())
    assert [x["name"] for x in data["runs"]] == ["a f", "swa f"]
    assert [list(s) for s in data["settings"]["test"]] == [[16, 2], [16, 4], [32, 2], [32, 4], [32, 8]]  # 16x8 skipped
    assert (out / "mqar.png").exists()
    bad = CliRunner().invoke(app, ["mqar", "--seq-lens", "8", "--pairs", "4", "--out", str(out)])
    assert bad.exit_code == 1 and "no test setting fits" in bad.output


def test_weighted_training_mix_and_default_mix():
    assert mqar.parse_train_setting("64x4*3") == (64, 4, 3.0)
    assert mqar.parse_train_setting((64, 4)) == (64, 4, 1.0)
    with pytest.raises(MQARError, match="weights must be > 0"):
        mqar.parse_train_setting("64x4*0")
    with pytest.raises(MQARError, match="SEQ_LENxPAIRS"):
        mqar.parse_train_setting("64-4")
    train, tests = mqar.build_data(_tiny(train=[(16, 2, 3.0), (32, 4)], train_examples=10))
    assert len(train) == 40 and train.seq_len == 32 and train.num_pairs == 4
    assert (train.answers[:30, 2:] == -100).all() and (train.answers[30:] != -100).all()
    assert all(d.inputs.shape[1] == 32 for d in tests.values()) and tests["16x2"].seq_len == 16
    mix = mqar.default_train_mix([(64, 8), (128, 16)])
    assert (64, 8, 1.0) in mix and (128, 16, 1.0) in mix and (32, 4, 3.0) in mix
    assert [s for s in mix if s[:2] == (128, 16)] == [(128, 16, 1.0)]  # not added twice
    assert all(L <= 64 for L, _, _ in mqar.default_train_mix([(64, 8)]))


def test_time_budget_fits_the_schedule_and_probe_can_stop_early(monkeypatch):
    logs = []
    res = mqar.run(_tiny(patterns=["a f"], steps=10_000, time_budget_s=0.5, calib_steps=6), log=logs.append)
    r = res["runs"][0]
    assert r["error"] is None and 6 < r["steps"] == r["planned_steps"] < 10_000
    assert any("ms/step" in line for line in logs)
    calls = []
    monkeypatch.setattr(mqar, "evaluate", lambda model, data, *a: calls.append(len(data)) or (len(calls) >= 2))
    res = mqar.run(_tiny(patterns=["a f"], steps=50, eval_interval=3, log_interval=100, stop_accuracy=0.99,
                         eval_batch_size=8, kernel_warmup=False),  # the warm-up would call evaluate too
                   log=lambda s: None)
    assert res["runs"][0]["steps"] == 6 and res["runs"][0]["solved_at"] == 6  # probes at 3 (fails), 6 (passes)
    assert calls[:2] == [8, 8]  # one batch (eval_batch_size) of the hardest setting; then the full test sets


def test_kernel_warmup_leaves_training_unchanged():
    """The untimed warm-up step (forward+backward, evaluation forwards) must not step the optimizer, leave
    gradients behind, draw from the training sampler or move the RNG: losses, probes and accuracies are
    identical with and without it."""
    cfg = _tiny(patterns=["a d"], steps=6, log_interval=1, eval_interval=3, eval_batch_size=5, batch_size=4)
    train, tests = mqar.build_data(cfg)
    runs = {}
    for flag in (False, True):
        logs = []
        runs[flag] = mqar.train_one("a d", 32, dataclasses.replace(cfg, kernel_warmup=flag), train, tests,
                                    torch.device("cpu"), log=logs.append)
        assert any("warm-up" in line for line in logs) == flag
    off, on = runs[False], runs[True]
    assert off["warmup_s"] == 0.0 and on["warmup_s"] > 0.0
    assert len(on["history"]) == 6
    for a, b in zip(off["history"], on["history"]):
        assert a["step"] == b["step"] and a["loss"] == b["loss"]
        assert {k: v for k, v in a.items() if k.startswith("acc_")} == {k: v for k, v in b.items()
                                                                         if k.startswith("acc_")}
    assert off["accuracy"] == on["accuracy"]
    assert off["history"][0]["loss"] != off["history"][-1]["loss"]  # it did train


def test_a_tiny_model_learns_recall_beyond_the_in_context_plateau():
    """DeltaNet (its short convolution finds the previous token) learns MQAR in a few hundred steps; 4 pairs:
    guessing among the in-context values gives 0.25, chance 1/16. Fails if data, labels or loss masking are off."""
    cfg = HarnessConfig(patterns=["d d"], hidden=[32], train=[(16, 2), (16, 4)], test=[(16, 4)], vocab_size=32,
                        train_examples=2000, test_examples=200, steps=300, batch_size=32, lr=3e-3, device="cpu",
                        log_interval=1000)
    acc = mqar.run(cfg, log=lambda s: None)["runs"][0]["accuracy"]["16x4"]
    assert acc > 0.7


def test_pure_attention_learns_recall_at_toy_size():
    """Two attention layers (no short convolution: they must learn a previous-token head, then an induction head)
    leave the in-context guessing plateau (0.25 for 4 pairs) at toy size in a few hundred steps."""
    cfg = HarnessConfig(patterns=["a a"], hidden=[32], train=[(8, 2, 2.0), (16, 4)], test=[(16, 4)], vocab_size=32,
                        train_examples=2000, test_examples=200, steps=600, batch_size=32, lr=3e-3, device="cpu",
                        log_interval=1000)
    acc = mqar.run(cfg, log=lambda s: None)["runs"][0]["accuracy"]["16x4"]
    assert acc > 0.8


def test_curriculum_starts_on_short_settings_and_is_off_without_a_split(monkeypatch):
    """Rows of the long setting are rare in the first batches and make up about their share of the mix once the
    ramp is over; with every setting short the curriculum leaves training exactly as without it."""
    seen = []
    real = mqar.mqar_loss
    monkeypatch.setattr(mqar, "mqar_loss",
                        lambda model, x, q, a: seen.append((a != -100).sum(1)) or real(model, x, q, a))
    cfg = _tiny(patterns=["a"], train=[(16, 2), (32, 8)], steps=40, batch_size=64, kernel_warmup=False,
                curriculum=0.5, curriculum_len=16, log_interval=100)
    mqar.run(cfg, log=lambda s: None)
    long_share = [float((n == 8).float().mean()) for n in seen]
    assert len(seen) == 40
    assert max(long_share[:2]) < 0.2 and 0.3 < sum(long_share[-10:]) / 10 < 0.7
    runs = []
    for cur in (0.0, 0.5):
        runs.append(mqar.run(_tiny(patterns=["a"], steps=6, log_interval=1, curriculum=cur, kernel_warmup=False),
                             log=lambda s: None)["runs"][0])
    assert [h["loss"] for h in runs[0]["history"]] == [h["loss"] for h in runs[1]["history"]]
    assert mqar.HarnessConfig().curriculum > 0  # on by default, the same for every pattern


def test_lr_sweep_keeps_each_models_best_rate(monkeypatch):
    """With ``lr_sweep`` every pattern is trained once per rate (same seed and data) and its best run by mean test
    accuracy is kept, with every rate's result listed; a failed rate does not hide the others."""
    calls = []

    def fake(pattern, hidden, cfg, train, tests, device, log=print):
        calls.append((pattern, cfg.lr, cfg.lr_sweep))
        if pattern == "d f" and cfg.lr == 1e-2:
            raise RuntimeError("diverged")
        good = {"a f": 1e-3, "d f": 3e-3}[pattern]  # each pattern has its own best rate
        acc = 0.9 if cfg.lr == good else 0.2
        return {"name": pattern, "hidden": hidden, "lr": cfg.lr, "steps": 4, "final_loss": 1.0, "train_time_s": 0.1,
                "accuracy": {k: acc for k in tests}, "error": None}

    monkeypatch.setattr(mqar, "train_one", fake)
    res = mqar.run(_tiny(lr_sweep=[1e-3, 3e-3, 1e-2]), log=lambda s: None)
    assert calls == [(p, lr, None) for p in ("a f", "d f") for lr in (1e-3, 3e-3, 1e-2)]
    best = {r["name"]: r for r in res["runs"]}
    assert len(res["runs"]) == 2 and best["a f"]["lr"] == 1e-3 and best["d f"]["lr"] == 3e-3
    sweep = best["d f"]["lr_sweep"]
    assert [s["lr"] for s in sweep] == [1e-3, 3e-3, 1e-2] and sweep[1]["mean_accuracy"] == pytest.approx(0.9)
    assert sweep[2]["mean_accuracy"] is None and "diverged" in sweep[2]["error"]
    assert mqar.pick_best([{"lr": 1, "error": "x", "accuracy": {}}])["lr"] == 1  # all failed: the record stays
    with pytest.raises(MQARError, match="lr_sweep"):
        _tiny(lr_sweep=[]).validate()
    with pytest.raises(MQARError, match="lr_sweep"):
        _tiny(lr_sweep=[1e-3, -1.0]).validate()


def test_cli_lrs_sweeps_and_reports_the_kept_rate(tmp_path, monkeypatch):
    seen = []
    real = mqar.train_one

    def spy(pattern, hidden, cfg, *a, **k):
        seen.append(cfg.lr)
        return real(pattern, hidden, cfg, *a, **k)

    monkeypatch.setattr(mqar, "train_one", spy)
    app = typer.Typer()
    mqar.register(app)
    app.command("noop")(lambda: None)
    out = tmp_path / "res"
    r = CliRunner().invoke(app, ["mqar", "--patterns", "a f", "--hidden", "32", "--seq-lens", "16", "--pairs", "2",
                                 "--steps", "2", "--vocab-size", "64", "--train-examples", "16",
                                 "--test-examples", "8", "--lrs", "1e-3", "1e-2", "--device", "cpu",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert seen == [1e-3, 1e-2]
    run = json.loads((out / "mqar.json").read_text())["runs"][0]
    assert [s["lr"] for s in run["lr_sweep"]] == [1e-3, 1e-2] and run["lr"] in (1e-3, 1e-2)
    bad = CliRunner().invoke(app, ["mqar", "--lrs", "fast", "--out", str(out)])
    assert bad.exit_code == 1 and "--lrs takes numbers" in bad.output


def test_deadline_and_interrupt_stop_training_but_keep_the_scored_model(monkeypatch):
    """A wall-clock deadline fits the budgeted schedule to it and stops a run still going (truncated); a
    KeyboardInterrupt during training stops it where it is and the model is still scored (interrupted); run()
    then trains no further model but keeps what ran."""
    cfg = _tiny(patterns=["a f"], steps=10_000, log_interval=1000, kernel_warmup=False)
    train, tests = mqar.build_data(cfg)
    cpu = torch.device("cpu")
    rec = mqar.train_one("a f", 32, cfg, train, tests, cpu, log=lambda s: None, deadline=time.perf_counter() + 0.3)
    assert rec["truncated"] and not rec["interrupted"] and 1 <= rec["steps"] < 10_000
    assert set(rec["accuracy"]) == set(tests)
    budgeted = dataclasses.replace(cfg, time_budget_s=60.0, calib_steps=6)  # the deadline binds, not the budget
    t0 = time.perf_counter()
    rec = mqar.train_one("a f", 32, budgeted, train, tests, cpu, log=lambda s: None, deadline=t0 + 0.5)
    assert rec["planned_steps"] < 10_000 and time.perf_counter() - t0 < 5

    real, calls = mqar.mqar_loss, []

    def interrupt_at_5(*a):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(mqar, "mqar_loss", interrupt_at_5)
    logs = []
    res = mqar.run(_tiny(patterns=["a f", "d f"], steps=50, log_interval=100, kernel_warmup=False), log=logs.append)
    assert res.get("interrupted") and [r["name"] for r in res["runs"]] == ["a f"]  # "d f" never started
    r = res["runs"][0]
    assert r["interrupted"] and r["truncated"] and r["steps"] == 5 and set(r["accuracy"]) == set(tests)
    assert any("interrupted at step 5" in line for line in logs)
