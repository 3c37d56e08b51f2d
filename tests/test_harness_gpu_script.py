"""benchmarks/harness_gpu.py's pieces on the CPU: the batched argmax reference equals decoding one prompt at a time
with full forwards, and the case runner keeps its JSON current, skips cases that do not fit the time limit, records
failures, and marks the case running at the limit as interrupted."""

import importlib.util
import json
import threading
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hg():
    spec = importlib.util.spec_from_file_location("harness_gpu", REPO / "benchmarks" / "harness_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.DEV = "cpu"
    return mod


def test_batched_greedy_reference_matches_one_prompt_at_a_time(hg):
    from hylo import HybridLM
    from hylo.presets import preset

    torch.manual_seed(0)
    model = HybridLM(preset("tiny-all")).eval()  # every operator: padding must never leak into a row
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 17, 9)]
    got = hg.greedy_reference(model, prompts, 5, pad_id=7, multiple=16)
    for p, row in zip(prompts, got):
        seq = list(p)
        with torch.no_grad():
            for _ in range(5):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert row == seq[len(p):]


def _read(path):
    return json.loads(Path(path).read_text())["result"]


def test_cases_write_after_every_case_skip_and_record_failures(hg, tmp_path):
    out = tmp_path / "r.json"
    cases = hg.Cases(out, {"settings": {}}, limit=60)
    seen = []

    def first():
        seen.append(_read(out)["cases"]["a"])  # written as running before the case starts
        return {"x": 1}

    cases.run("a", first)
    assert seen == [{"running": True, "started_at_s": seen[0]["started_at_s"]}]
    assert _read(out)["cases"]["a"]["ok"] and _read(out)["cases"]["a"]["x"] == 1  # written after it
    cases.run("b", lambda: 1 / 0)
    b = _read(out)["cases"]["b"]
    assert not b["ok"] and "ZeroDivisionError" in b["error"] and "traceback" in b
    cases.run("c", lambda: pytest.fail("must not run"), estimate=1000)
    assert "time limit" in _read(out)["cases"]["c"]["skipped"]
    assert not (tmp_path / "r.json.tmp").exists()


def test_watchdog_marks_the_running_case_interrupted(hg, tmp_path):
    out = tmp_path / "r.json"
    fired = threading.Event()
    cases = hg.Cases(out, {"settings": {}}, limit=0.5, on_limit=fired.set)
    cases.watchdog()
    at_limit = []

    def slow():
        assert fired.wait(20)  # the watchdog fires while this case runs
        at_limit.append(_read(out))  # what a run stopped at the limit leaves (the real on_limit exits here)
        return {}

    cases.run("slow", slow)
    cases.cancel()
    assert "time limit" in at_limit[0]["stopped"]
    rec = at_limit[0]["cases"]["slow"]
    assert rec["ok"] is False and "time limit" in rec["interrupted"]


def test_trained_models_suites_run_before_the_random_weight_cases(hg, tmp_path, monkeypatch):
    """The lm_eval suites of the ``--model`` checkpoints run first (a time limit then cuts random-weight checks,
    not the numbers that mean something); without ``--model`` the random model's suite keeps its place."""
    import gzip

    pytest.importorskip("lm_eval")
    src = REPO.parent / "shared" / "data" / "corpus" / "gutenberg_val.txt.gz"
    if not src.is_file():
        pytest.skip(f"real corpus not found at {src}")
    with gzip.open(src, "rt", encoding="utf-8") as f:
        text = f.read(400_000)
    corpus = tmp_path / "val.txt.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        f.write(text)
    order = []

    def fake_run(self, name, fn, estimate=0.0):  # record the order; run nothing
        order.append(name)
        self.result["cases"][name] = {"ok": True}
        return {}

    monkeypatch.setattr(hg.Cases, "run", fake_run)
    monkeypatch.setattr(hg.Cases, "watchdog", lambda self: None)
    monkeypatch.setattr(hg.signal, "signal", lambda *a: None)
    common = ["--device", "cpu", "--n", "20", "--corpus", str(corpus), "--skip-all-ops", "--time-limit", "600"]
    hg.main(["--out", str(tmp_path / "a.json"), "--model", "A", "--model", "B", *common])
    assert order[:2] == ["lm_eval-suite/A", "lm_eval-suite/B"]
    assert {"mixed/score-exact", "mixed/generate", "mixed/score-speed"} <= set(order[2:])
    assert "lm_eval-suite/random-mixed" not in order
    saved = _read(tmp_path / "a.json")
    assert list(saved["cases"])[:2] == order[:2] and saved["setup_s"] > 0
    order.clear()
    hg.main(["--out", str(tmp_path / "b.json"), *common])
    assert order == ["mixed/score-exact", "mixed/generate", "lm_eval-suite/random-mixed", "mixed/score-speed"]
