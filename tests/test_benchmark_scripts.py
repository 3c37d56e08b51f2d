"""The GPU benchmark scripts run end to end in their --smoke mode on the CPU (tiny shapes, numbers meaningless).

GPU time is scarce: a script that breaks on its first line costs a whole device call. These runs check the
plumbing only: arguments, the sets of runs they multiply out, and the JSON each writes."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hylo.data import prepare, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
VAL = REPO.parent / "shared" / "data" / "corpus" / "gutenberg_val.txt.gz"


def _run(args: list[str], timeout: int = 300, env: dict | None = None) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                               "HOME": str(Path.home()), **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    if not VAL.is_file():
        pytest.skip(f"real corpus not found at {VAL}")
    root = tmp_path_factory.mktemp("bench_data")
    with gzip.open(VAL, "rt", encoding="utf-8") as f:
        text = f.read(400_000)
    (root / "corpus").mkdir()
    (root / "corpus" / "books.txt").write_text(text, encoding="utf-8")
    train_tokenizer(root / "corpus", 512, root / "tok", show_progress=False)
    return prepare(root / "corpus", root / "tok", root / "ds", val_fraction=0.0, val_docs=1, seed=0,
                   progress=False).path


def test_train_throughput_multiplies_runs_by_check(data, tmp_path):
    out = tmp_path / "tt.json"
    _run(["benchmarks/train_throughput.py", "--smoke", "--data", str(data), "--out", str(out), "--models",
          "attn-125m", "--sdpa", "auto", "cudnn", "--nan-check", "deferred", "sync", "--rope", "torch", "triton"])
    res = json.loads(out.read_text())
    runs = [(r["model"], r["sdpa"], r["nan_check"], r["rope"]) for r in res["runs"]]
    assert runs == [("attn-125m", "auto", "deferred", "torch"), ("attn-125m", "auto", "sync", "torch")], runs
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in res["runs"])
    prof = res["runs"][0]["step_kernels"]  # where a step's time goes: forward + backward, then clip + AdamW
    assert prof["fwd_bwd_wall_ms"] > 0 and prof["fwd_bwd_host_ms"] > 0
    assert prof["clip_and_adamw"]["wall_ms"] > 0 and prof["clip_and_adamw"]["top"]
    # no CUDA: recorded as skipped, not silently dropped
    assert any("cudnn" in s for s in res["skipped"]) and any("--rope triton" in s for s in res["skipped"])


def test_mqar_smoke_with_a_learning_rate_sweep(tmp_path):
    _run(["benchmarks/mqar.py", "--smoke", "--out", str(tmp_path), "--patterns", "attn", "mamba2", "--lrs", "1e-3",
          "1e-2"])
    res = json.loads((tmp_path / "mqar.json").read_text())
    assert [r["name"] for r in res["runs"]] == ["attn", "mamba2"]
    for r in res["runs"]:
        assert r.get("error") is None and [s["lr"] for s in r["lr_sweep"]] == [1e-3, 1e-2]
    assert (tmp_path / "mqar.png").is_file() and "separation" in res


def test_mqar_per_pattern_rates_and_a_wall_limit(tmp_path):
    """--lr-for sets one pattern's rate; --wall-limit stops before a model when the time is up and still writes
    the results (train_one's deadline itself: tests/test_mqar.py)."""
    _run(["benchmarks/mqar.py", "--smoke", "--out", str(tmp_path / "a"), "--patterns", "attn", "mamba2",
          "--lr-for", "mamba2=1e-2", "--warm-first"])
    res = json.loads((tmp_path / "a" / "mqar.json").read_text())
    assert [(r["name"], r["lr"]) for r in res["runs"]] == [("attn", 1e-3), ("mamba2", 1e-2)]
    assert set(res["warm_first_s"]) == {"attn", "mamba2"}  # every warm-up ran before any training
    assert all(isinstance(v, float) for v in res["warm_first_s"].values())
    assert res["settings"]["lr_for"] == {"mamba2": 1e-2}
    proc = subprocess.run([sys.executable, "benchmarks/mqar.py", "--smoke", "--out", str(tmp_path / "b"),
                           "--patterns", "attn", "mamba2", "--wall-limit", "0"],  # no time left for any model
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    res = json.loads((tmp_path / "b" / "mqar.json").read_text())  # written all the same
    assert proc.returncode == 1 and res["runs"] == [] and "before attn" in res["stopped"]
    proc = subprocess.run([sys.executable, "benchmarks/mqar.py", "--smoke", "--out", str(tmp_path / "c"),
                           "--lr-for", "nope=1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "PATTERN=LR" in proc.stderr + proc.stdout
    proc = subprocess.run([sys.executable, "benchmarks/mqar.py", "--out", str(tmp_path / "d"), "--lengths", "16"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--lengths" in proc.stderr + proc.stdout


def test_qwen3_vs_transformers_smoke(tmp_path):
    out = tmp_path / "q3.json"
    _run(["benchmarks/qwen3_vs_transformers.py", "--smoke", "--out", str(out), "--modes",
          "eager,eager+cublas,default+gemv,eager+dattn,eager+fuse,eager+kstep", "--tf-repeats", "2", "--rounds", "3"])
    res = json.loads(out.read_text())
    assert not res["errors"] and res["hylo"]["ms_per_token"] > 0 and res["transformers"]["ms_per_token"] > 0
    assert res["hylo_cublas"]["switches"] == {"HYLO_GEMV": "off", "HYLO_DECODE_ATTN": "off", "HYLO_GEMV_FUSE": "off",
                                              "HYLO_KERNEL_STEP": "on", "HYLO_PDL": "on", "HYLO_COMPILE_SCOPE": "step",
                                              "HYLO_GEMV_PRELOAD": "on", "HYLO_ATTN_EARLY_KV": "on",
                                              "HYLO_STEP_ATTN_OUT": "fused",
                                              "HYLO_STEP_FFN_SPLIT": "off", "HYLO_STEP_IO": "kernels",
                                              "HYLO_STEP_GLU": "up", "HYLO_GEMV_CONFIGS": "table"}
    assert not res["hylo_cublas"]["gemv"] and not res["hylo"]["kernel_step"] and not res["hylo"]["pdl"]
    assert {"hylo_compiled_gemv", "hylo_dattn", "hylo_fuse", "hylo_kstep"} <= set(res["skipped"])  # +gemv needs CUDA or the Triton interpreter
    assert res["best_mode"] in ("hylo", "hylo_cublas") and set(res["goals"]) == {"hylo_30x_faster",
                                                                                "hylo_within_1.5x_floor"}
    assert res["transformers"]["ms_per_token_fastest"] > 0 and len(res["transformers"]["generate_s"]) == 2
    # --rounds: the modes that ran, timed side by side; their medians judged against the rounds' floor
    for k in ("hylo", "hylo_cublas"):
        ts = res[k]["ms_per_token_rounds"]
        assert len(ts) == 3 and res[k]["ms_per_token_interleaved"] == sorted(ts)[1]
        floor = res["floor_ms_per_token_interleaved"]
        assert res[k]["x_floor_interleaved"] == res[k]["ms_per_token_interleaved"] / floor
    assert len(res["copy_bandwidth_GBps_rounds"]) == 3 and res["best_mode_interleaved"] in ("hylo", "hylo_cublas")
    assert set(res["goals_interleaved"]) == set(res["goals"])
    # float32: the converted model equals transformers' (bf16 rounding alone separates their greedy tokens)
    agree, positions = res["prompt_argmax_agree_fp32"]
    assert res["prompt_logits_max_abs_diff_fp32"] < 1e-4 * res["prompt_logits_max_abs_fp32"] and agree == positions
    assert res["floor_ms_per_token"] > 0 and "prompt_argmax_agree" in res
    g = res["greedy_fp32"]  # each model's own generate in float32: the same tokens
    assert g["compared"] > 0 and g["agree"] == g["compared"] and g["first_mismatch"] is None


def rec_glu(res) -> bool:
    """Whether every entry but the ``noglu`` ones took SwiGLU in the gate/up GEMV."""
    return all(r["glu_up"] for k, r in res["results"].items() if "noglu" not in k)


def test_attn_out_check_smoke(tmp_path):
    """The fused attention + output projection's GPU check, on the CPU (interpreter): checked against the chain."""
    out = tmp_path / "ao.json"
    _run(["benchmarks/attn_out_check.py", "--smoke", "--out", str(out), "--variants",
          "ao:64/16384/8/p+ffn,split+torchio+noglu",
          "--more-starts", "8"])
    res = json.loads(out.read_text())
    assert not res["errors"] and set(res["results"]) == {"chain_cache24", "ao_64_16384_8_p+ffn_cache24",
                                                          "split+torchio+noglu_cache24"}
    tio = res["results"]["split+torchio+noglu_cache24"]
    assert tio["sums"] == {"attn": "split", "ffn": False} and not tio["glu_up"] and rec_glu(res)
    assert tio["switches"]["HYLO_STEP_IO"] == "torch" and tio["switches"]["HYLO_STEP_GLU"] == "down"
    rec = res["results"]["ao_64_16384_8_p+ffn_cache24"]
    assert rec["sums"] == {"attn": "fused", "ffn": True} and rec["kernel_step"] and rec["attn_out"]["pre_kv"]
    assert set(rec["ms_per_token_from"]) == {"8"} and rec["ms_per_token_from"]["8"] > 0
    assert res["results"]["chain_cache24"]["sums"] is None
    for name in ("ao_64_16384_8_p+ffn_cache24", "split+torchio+noglu_cache24"):
        check = res["results"][name]["check"]
        assert check["max_abs_logit_diff"] < 1e-4 and check["argmax_agrees"]


def test_step_tune_smoke(tmp_path):
    """The in-step tuning of the preloading GEMVs' configs, on the CPU (interpreter): every timing recorded, the
    tuned configs a valid HYLO_GEMV_PRE_CONFIGS value covering the step's three products, both sides timed at the
    end."""
    from hylo.ops import gemv as G

    out = tmp_path / "tune.json"
    _run(["benchmarks/step_tune.py", "--smoke", "--out", str(out)])
    res = json.loads(out.read_text())
    assert not res["errors"] and res["glu_up"]
    assert res["timings"][0]["what"] == "autotuned" and len(res["timings"]) == 2 + 3  # one candidate per product
    assert set(G.parse_pre_configs(res["pre_configs"])) == {tuple(k) for k in res["products"].values()}
    assert res["products"]["gate_up"][2] and len(res["rounds"]["tuned"]) == len(res["rounds"]["autotuned"]) == 2


def test_step_tune_takes_a_model_and_merges_tables(tmp_path, monkeypatch):
    """``--model`` (a config folder: random weights): the products come from the model's blocks, one role per
    distinct shape (two FFN widths: two gate/up and two down roles). save_table adds to a device's table, keeping
    the entries it holds unless told to overwrite them."""
    from hylo.config import HyloConfig
    from hylo.ops import gemv as G

    cfg = HyloConfig(vocab_size=96, hidden_size=32, layers="a f a f", attn_num_heads=4, attn_num_kv_heads=2,
                     attn_head_dim=16, ffn_intermediate_size=48)
    cfg.save_pretrained(tmp_path / "m")
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import step_tune

    from hylo import HybridLM

    model = HybridLM(cfg)
    model.layers[3].mixer.down_proj.weight.data = model.layers[3].mixer.down_proj.weight.data[:, :32].contiguous()
    model.layers[3].mixer.gate_up_proj.weight.data = model.layers[3].mixer.gate_up_proj.weight.data[:64].contiguous()
    assert step_tune.products(model, True) == {"qkv": (128, 32, False), "gate_up": (48, 32, True),
                                               "down": (32, 48, False), "gate_up_2": (32, 32, True),
                                               "down_2": (32, 32, False)}
    assert step_tune.products(model, False)["gate_up"] == (96, 32, False)
    monkeypatch.setattr(G, "CONFIG_DIR", tmp_path)
    res = {"date": "d", "commit": "c", "shape": {"model": "m"}, "pre_configs": "128x32=4/8"}
    assert step_tune.save_table("GPU X", res, False) == str(tmp_path / "GPU_X.json")
    assert G.device_configs("GPU X") == {(128, 32, False): (4, 8)}
    res["pre_configs"] = "128x32=2/4,48x32g=1/4"
    step_tune.save_table("GPU X", res, False)  # keeps 128x32, adds 48x32g
    assert G.device_configs("GPU X") == {(128, 32, False): (4, 8), (48, 32, True): (1, 4)}
    assert step_tune.save_table("GPU X", res, False) is None  # nothing new
    step_tune.save_table("GPU X", res, True)
    assert G.device_configs("GPU X")[(128, 32, False)] == (2, 4)
    out = tmp_path / "tune.json"
    _run(["benchmarks/step_tune.py", "--smoke", "--model", str(tmp_path / "m"), "--out", str(out)])
    done = json.loads(out.read_text())
    assert not done["errors"] and done["shape"]["model"] == str(tmp_path / "m")
    assert done["products"] == {"qkv": [128, 32, False], "gate_up": [48, 32, True], "down": [32, 48, False]}


def test_cast_keeping_rope_keeps_exact_frequencies():
    """transformers' ``.to(bfloat16)`` rounds the RoPE frequency buffer (the float32 logits then move); the
    benchmark's cast keeps it float32 and exact through a round trip to bf16 and back."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qwen3_vs_transformers import TINY, cast_keeping_rope

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**TINY))
    exact = model.model.rotary_emb.inv_freq.clone()
    assert exact.dtype == torch.float32
    plain = Qwen3ForCausalLM(Qwen3Config(**TINY)).to(torch.bfloat16).float()
    assert not torch.equal(plain.model.rotary_emb.inv_freq, exact)  # what the cast guards against
    cast_keeping_rope(model, torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(model.model.rotary_emb.inv_freq, exact)
    cast_keeping_rope(model, torch.float32)
    assert torch.equal(model.model.rotary_emb.inv_freq, exact)


def test_decode_timeline_step_figures():
    """The timeline arithmetic on made-up kernel intervals of two kernel steps (one attention + FFN layer): roles by
    position, the union of overlapping intervals, idle time, and increments that add up to the span."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import decode_timeline as dt

    names = ["indexSelect", "_gemv_kernel", "_split_kernel", "_combine_kernel", "_gemv_kernel", "_gemv_kernel",
             "_gemv_kernel", "_gemv_kernel", "add"]
    assert dt.roles(names) == ["embed", "qkv", "attn", "combine", "o_proj", "ffn_in", "ffn_out", "head", "add"]
    # (start, duration) in us: the qkv GEMV overlaps attention by 1 us (a PDL launch), a 2-us gap before ffn_in
    times = [(0, 1), (1, 4), (4, 3), (7, 1), (8, 2), (12, 3), (15, 2), (17, 5), (22, 1)]
    ks = [{"name": n, "ts": t + 100 * step, "dur": d} for step in range(3) for n, (t, d) in zip(names, times)]
    s = dt.step_stats(ks, 3)
    assert s["kernels_per_step"] == 9 and s["period_ms"] == pytest.approx(0.1)
    assert s["span_ms"] == pytest.approx(0.023) and s["sum_ms"] == pytest.approx(0.022)
    assert s["busy_ms"] == pytest.approx(0.021) and s["idle_ms"] == pytest.approx(0.002)
    assert s["overlap_ms"] == pytest.approx(0.001)
    assert s["by_role"]["attn"] == {"calls": 1, "dur_ms": 0.003, "incr_ms": 0.002}
    assert s["by_role"]["ffn_in"]["incr_ms"] == pytest.approx(0.005)  # its 3 us and the gap before it
    assert sum(r["incr_ms"] for r in s["by_role"].values()) == pytest.approx(s["span_ms"])
    assert "error" in dt.step_stats(ks[:-1], 3)  # not one equal share per step
    assert dt.parse_configs("eager+kstep+nopdl@16")[0][::3] == ("hylo_kstep_nopdl_split16", 16)
    assert dt.parse_configs("eager@128/64")[0][::3] == ("hylo_split128_block64", 128)
    assert dt.parse_configs("eager@128/64")[0][4] == 64 and dt.parse_configs("eager")[0][3:] == (None, None)
    for bad in ("eager+kstep@x", "eager@128/48", "eager@128/8"):
        with pytest.raises(SystemExit):
            dt.parse_configs(bad)


def test_mqar_separation_leaves_out_models_that_did_not_learn():
    """The verdicts: a model below 0.5 on the easiest settings is 'not learned' and judged in neither claim;
    a learned hybrid that stays near the recurrent models fails the recovery claim."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import mqar as bench

    def run(name, easy, hard):
        return {"name": name, "accuracy": {"512x8": easy, "512x128": hard}}

    def verdict(*runs):
        return bench.separation({"settings": {"test": [[512, 8], [512, 128]]}, "runs": list(runs)})

    base = [run("attn", 1.0, 0.99), run("deltanet", 1.0, 0.3), run("mamba2", 0.01, 0.0),
            run("deltanet + attn", 1.0, 0.98)]
    s = verdict(*base)
    assert s["not_learned"] == ["mamba2"] and s["attention_solves"]
    assert s["recurrent_degrade"] is True and s["hybrids_recover"] is True
    s = verdict(*base, run("gdn + attn", 0.97, 0.4))  # learned, but not recovered
    assert s["hybrids_recover"] is False and s["hybrid_recovery"]["gdn + attn"] == pytest.approx(0.4 / 0.99)
    s = verdict(run("attn", 1.0, 0.99), run("mamba2", 0.01, 0.0), run("mamba2 + attn", 0.0, 0.0))
    assert s["recurrent_degrade"] is None and s["hybrids_recover"] is None  # nothing learned to judge
    assert verdict(run("attn", 1.0, 0.99), run("gdn", 1.0, 0.95))["recurrent_degrade"] is False
