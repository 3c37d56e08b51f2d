"""hylo.profile on the CPU: LUT interpolation and lookups, the predictor on a synthetic LUT, memory accounting against
real models, max batch, integration of step times, the JSON schema, plots, and the whole `hylo profile` flow on a
tiny model (`--device cpu`). No timing asserts: CPU latencies mean nothing; the flow and the arithmetic do."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from hylo import HybridLM
from hylo.cli import app
from hylo.presets import preset
from hylo.profile import (LUT, LUTError, effective_context, integrate_steps, max_batch, model_memory, model_pieces,
                          predict_decode, predict_generate, predict_max_batch, predict_throughput, signature)
from hylo.profile.lut import interp1
from hylo.profile.pieces import state_bytes, weight_bytes
from hylo.profile.plots import write_plots
from hylo.profile.report import check_profile


def cfg_all(**kw):
    """Every operator, with non-default head sizes so a signature that missed a field would be caught."""
    over = dict(gdn_head_k_dim=8, gdn_head_v_dim=24, jet_head_k_dim=8, jet_head_v_dim=12, jet_num_heads=2,
                deltanet_num_heads=2, ffn_intermediate_size=80, attn_qk_norm=True)
    return preset("tiny-all", **{**over, **kw})


# ----------------------------------------------------------------------------- interpolation
def test_interp1_linear_log_and_ends():
    xs, f = [1, 4, 16], (lambda x: 2.0 + 0.5 * x)
    ys = [f(x) for x in xs]
    for x in (1, 2.5, 7, 16):
        y, extra = interp1(xs, ys, x)
        assert y == pytest.approx(f(x)) and not extra
    y, extra = interp1(xs, ys, 0.5)  # below: the first value
    assert y == ys[0] and extra
    y, extra = interp1(xs, ys, 32)  # above: the last segment extended
    assert y == pytest.approx(f(32)) and extra
    y, _ = interp1([1, 2], [5.0, 3.0], 10)  # a decreasing last segment is held flat, never extended down
    assert y == 3.0
    g = lambda x: 3.0 * x ** 0.7  # noqa: E731  (power law: exact in log space)
    y, _ = interp1([1, 8, 64], [g(1), g(8), g(64)], 20, space="log")
    assert y == pytest.approx(g(20))
    assert interp1([5], [2.0], 7) == (2.0, True)


# ----------------------------------------------------------------------------- synthetic LUT
def formula(op, sig, ctx, b):
    """A made-up cost: affine in batch, attention adds batch x context."""
    base = {"attn": 0.05, "swa": 0.04, "mamba2": 0.06, "deltanet": 0.07, "gdn": 0.08, "jet": 0.09, "ffn": 0.02,
            "norm": 0.005, "embed": 0.003, "head": 0.03, "overhead": 0.01,
            "kattn": 0.03, "kswa": 0.025, "kffn": 0.015, "khead": 0.02}[op]
    ms = base * (1 + sig.get("hidden_size", 64) / 64) + 1e-3 * b
    if op in ("attn", "swa", "kattn", "kswa"):
        ms += 1e-5 * b * ctx
    return ms


def synthetic_lut(configs, contexts=(16, 64, 256), batches=(1, 4, 16), meta=None):
    from hylo.profile.measure import lut_points

    lut = LUT(meta=meta or {"dtype": "float32", "free_bytes": 1 << 30})
    for op, sig, c, b in lut_points(configs, contexts, batches):
        lut.add({"op": op, "sig": sig, "context": c, "batch": b, "ms": formula(op, sig, c, b),
                 "temp_bytes": 1000 * b})
    return lut


def expected_ms(cfg, cache_len, b):
    return sum(n * formula(op, sig, effective_context(op, sig, cache_len), 1 if op == "overhead" else b)
               for op, sig, n in model_pieces(cfg))


def test_lut_exact_lookup_context_batch_and_window():
    cfg = cfg_all()
    lut = synthetic_lut([cfg])
    sig = signature(cfg, "attn")
    for c, b in ((16, 1), (40, 3), (100, 10), (256, 16)):  # off-grid: exact for a bilinear cost
        r = lut.lookup("attn", sig, c, b)
        assert r.how == "exact" and not r.extrapolated
        assert r.ms == pytest.approx(formula("attn", sig, c, b))
    swa = signature(cfg, "swa")
    w = swa["swa_window"]
    assert lut.lookup("swa", swa, 10_000, 4).ms == pytest.approx(formula("swa", swa, w, 4))  # ring buffer
    ffn = signature(cfg, "ffn")
    assert lut.lookup("ffn", ffn, 16, 4).ms == lut.lookup("ffn", ffn, 4096, 4).ms  # context-free
    assert lut.lookup("attn", sig, 1024, 1).extrapolated


def test_lut_missing_and_scaled(tmp_path):
    small, big = cfg_all(hidden_size=64), cfg_all(hidden_size=128, mamba2_head_dim=32)
    lut = synthetic_lut([small, big])
    mid = cfg_all(hidden_size=96, mamba2_head_dim=16)
    sig = signature(mid, "ffn")
    with pytest.raises(LUTError, match="work="):
        lut.lookup("ffn", sig, 64, 1)

    def work(op, s, ctx, b):
        return weight_bytes(op, s, 4) + b * state_bytes(op, s, ctx, torch.float32)

    r = lut.lookup("ffn", sig, 64, 4, work=work)
    lo = lut.lookup("ffn", signature(small, "ffn"), 64, 4).ms
    hi = lut.lookup("ffn", signature(big, "ffn"), 64, 4).ms
    assert r.how == "interpolated" and len(r.sources) == 2 and lo < r.ms < hi
    empty = LUT([{"op": "ffn", "sig": sig, "context": 0, "batch": 1, "ms": 1.0}])
    with pytest.raises(LUTError, match="'attn'"):
        empty.lookup("attn", signature(mid, "attn"), 64, 1)
    # files
    lut.save(tmp_path / "lut.json")
    back = LUT.load(tmp_path / "lut.json")
    assert back.entries == lut.entries and back.meta == lut.meta
    (tmp_path / "bad.json").write_text(json.dumps({"entries": []}))
    with pytest.raises(LUTError, match="not a hylo LUT"):
        LUT.load(tmp_path / "bad.json")
    with pytest.raises(LUTError, match="ms > 0"):
        LUT([{"op": "ffn", "sig": sig, "context": 0, "batch": 1, "ms": -1}])


# ----------------------------------------------------------------------------- signatures the table lacks
FIXED = {"attn": 0.05, "swa": 0.04, "mamba2": 0.11, "deltanet": 0.13, "gdn": 0.12, "jet": 0.15, "ffn": 0.012,
         "norm": 0.012, "embed": 0.002, "head": 0.02, "overhead": 0.005}


def byte_law_lut(widths, slopes=None, contexts=(16, 64, 256), batches=(1, 4, 16)):
    """A LUT whose every entry obeys ``ms = FIXED[op] + slope x bytes read`` (the predictor's own byte count),
    measured for every piece of ``cfg_all`` at ``widths``; ``slopes``: per-operator slopes (default one for all)."""
    from hylo.profile.measure import lut_points
    from hylo.profile.predict import work_fn

    work = work_fn(torch.float32)

    def law(op, sig, ctx, b):
        return FIXED[op] + (slopes or {}).get(op, 2e-6) * work(op, sig, ctx, b)

    lut = LUT(meta={"dtype": "float32", "free_bytes": 1 << 30})
    for op, sig, c, b in lut_points([cfg_all(hidden_size=w) for w in widths], contexts, batches):
        lut.add({"op": op, "sig": sig, "context": c, "batch": b, "ms": law(op, sig, c, b), "temp_bytes": 100 * b})
    return lut, law, work


@pytest.mark.parametrize("width,how", [(96, "interpolated"), (160, "scaled"), (48, "scaled")])
def test_missing_signature_exact_under_a_byte_law(width, how):
    """Leave a width out of a table generated from ms = a + b x bytes: between two widths (interpolation in bytes)
    and beyond them (fixed part + the rest scaled by bytes, slope fitted on the table) the lookup is the law."""
    lut, law, work = byte_law_lut([64, 128])
    assert lut.ms_per_byte(work) == pytest.approx(2e-6, rel=1e-9)
    cfg = cfg_all(hidden_size=width)
    for op, sig, _ in model_pieces(cfg):
        if op == "overhead":
            continue
        assert lut.fixed_ms(op, signature(cfg_all(hidden_size=64), op), work) == pytest.approx(FIXED[op])
        for cache_len, b in ((16, 1), (40, 3), (256, 16)):
            r = lut.lookup(op, sig, cache_len, b, work=work)
            assert r.how == how, op
            assert r.ms == pytest.approx(law(op, sig, effective_context(op, sig, cache_len), b), rel=1e-9), op
    p = predict_decode(cfg, lut, 100, 4)
    assert p.ms_per_token == pytest.approx(sum(n * law(op, sig, effective_context(op, sig, 100 + 4),
                                                       1 if op == "overhead" else 4)
                                               for op, sig, n in model_pieces(cfg)), rel=1e-9)
    assert set(p.scaled) == {op for op, _, _ in model_pieces(cfg)} - {"overhead"}


def test_missing_signature_monotonic_in_width_and_old_scaling_was_not():
    """Per-operator slopes (the device slope fitted on the table is then only an average): predictions still grow
    with the width, and are exact at the measured widths; the fixed part is not scaled away."""
    slopes = {"attn": 1e-6, "swa": 3e-6, "mamba2": 5e-6, "deltanet": 2e-6, "gdn": 4e-6, "jet": 6e-6, "ffn": 2e-6,
              "head": 1e-6}
    lut, law, work = byte_law_lut([64, 128], slopes)
    for cache_len, b in ((16, 1), (256, 16)):
        row = [predict_decode(cfg_all(hidden_size=w), lut, cache_len - 4, b).ms_per_token
               for w in (48, 64, 80, 96, 112, 128, 160, 192)]
        assert all(x < y for x, y in zip(row, row[1:])), row
    # a mixer at 3/4 of the one width measured keeps its whole fixed cost
    # (Mamba2 measured at width 128 only; the slope comes from the other operators' pairs of widths)
    both, law, _ = byte_law_lut([64, 128])
    sig96, sig128 = signature(cfg_all(hidden_size=96), "mamba2"), signature(cfg_all(hidden_size=128), "mamba2")
    one = LUT([e for e in both.entries if e["op"] != "mamba2" or e["sig"] == sig128], both.meta)
    r = one.lookup("mamba2", sig96, 16, 1, work=work)
    ratio = work("mamba2", sig96, 0, 1) / work("mamba2", sig128, 0, 1)
    assert r.how == "scaled" and r.ms == pytest.approx(law("mamba2", sig96, 0, 1), rel=1e-9)
    # scaling the whole time by bytes (the old estimate) would lose the fixed part that the smaller width keeps
    assert r.ms - ratio * one.lookup("mamba2", sig128, 16, 1).ms == pytest.approx(FIXED["mamba2"] * (1 - ratio))


def test_missing_signature_prefers_the_same_kernels():
    """A qk-norm attention is not estimated from plain ones when one with qk norm exists (and vice versa)."""
    lut, _, work = byte_law_lut([64])
    plain = signature(cfg_all(hidden_size=128, attn_qk_norm=False), "attn")
    lut.add({"op": "attn", "sig": plain, "context": 16, "batch": 1, "ms": 9.0})  # much slower, other kernels
    want = signature(cfg_all(hidden_size=96), "attn")  # qk norm, as the width-64 entries
    r = lut.lookup("attn", want, 16, 1, work=work)
    assert r.sources == [signature(cfg_all(hidden_size=64), "attn")] and r.ms < 1.0
    r = lut.lookup("attn", signature(cfg_all(hidden_size=96, attn_qk_norm=False), "attn"), 16, 1, work=work)
    assert r.sources == [plain] and r.ms > 1.0


def test_ms_per_byte_without_pairs_is_the_best_rate_seen():
    lut, _, work = byte_law_lut([64])  # one signature per operator: no slope to fit
    rates = [e["ms"] / work(e["op"], e["sig"], e["context"], e["batch"]) for e in lut.entries if e["op"] != "overhead"]
    assert lut.ms_per_byte(work) == pytest.approx(min(rates))
    n = len(lut)
    lut.add({**lut.entries[0], "ms": lut.entries[0]["ms"] * 1e-3})  # a faster entry: the cached fit is dropped
    assert len(lut) == n and lut.ms_per_byte(work) < min(rates)


def test_max_batch_of_a_width_the_table_lacks_counts_temporaries():
    lut, _, _ = byte_law_lut([64, 128])
    cfg = cfg_all(hidden_size=96)
    mem = model_memory(cfg, 100, torch.float32)
    mb = predict_max_batch(cfg, lut, 100, memory_bytes=1e8, margin=0.5)
    assert mb["temp_bytes_per_row"] > 0  # estimated from the neighbours, not 0
    assert mb["per_seq_bytes"] == mem["state_bytes_per_seq"] + mb["temp_bytes_per_row"]


# ----------------------------------------------------------------------------- predictor
def test_predict_decode_generate_throughput():
    cfg = cfg_all(num_meta_tokens=8)
    lut = synthetic_lut([cfg])
    for ctx, b in ((16, 1), (100, 4), (200, 16)):
        p = predict_decode(cfg, lut, ctx, b)
        assert p.ms_per_token == pytest.approx(expected_ms(cfg, ctx + 8, b))  # meta tokens lengthen the cache
        assert sum(p.by_op.values()) == pytest.approx(p.ms_per_token)
        assert p.tokens_per_s == pytest.approx(1e3 * b / p.ms_per_token)
        assert p.scaled == [] and not p.extrapolated  # inside the grid (overhead: batch-independent)
    g = predict_generate(cfg, lut, 200, cache="static")
    assert g["seconds"] == pytest.approx(200 * expected_ms(cfg, 208, 1) / 1e3)
    grow = predict_generate(cfg, lut, 200, cache="growing")
    assert grow["seconds"] < g["seconds"]  # attention's cost grows with the cache: a short cache is cheaper
    t = predict_throughput(cfg, lut, 100, batch=4)
    assert t["tokens_per_s"] == pytest.approx(4e3 / expected_ms(cfg, 108, 4))
    mb = predict_max_batch(cfg, lut, 100, memory_bytes=1e8, margin=0.5)
    mem = model_memory(cfg, 100, torch.float32)
    assert mb["batch"] == int((0.5e8 - mem["weights_bytes"]) // (mem["state_bytes_per_seq"] + 1000))
    auto = predict_throughput(cfg, lut, 100, memory_bytes=1e8, margin=0.5, cap=None)
    assert auto["batch"] == mb["batch"]
    other = cfg_all(hidden_size=96, mamba2_head_dim=16)  # a width the table lacks: scaled
    assert set(predict_decode(other, lut, 64).scaled) >= {"ffn", "attn"}


def cfg_attn_ffn(**kw):
    """Attention, a sliding window and FFN only: the blocks the kernel decode step takes."""
    from hylo import HyloConfig

    return HyloConfig(**{**dict(vocab_size=64, hidden_size=48, layers="a f swa f", attn_num_heads=3,
                                attn_num_kv_heads=1, attn_head_dim=16, swa_window=32, ffn_intermediate_size=96),
                         **kw})


def test_kernel_step_pieces_and_predictions():
    """A model the kernel step applies to is predicted from its pieces (no norm piece: the blocks hold it) at the
    batches the step takes, from the usual pieces above them, and a hybrid never; a table without the kernel
    step's pieces predicts the usual step. With the step, a static cache's generation integrates over positions
    (attention reads up to the position), as the growing cache does."""
    from hylo.profile.measure import lut_points

    ka, hyb = cfg_attn_ffn(), cfg_all()
    assert {op: n for op, _, n in model_pieces(ka, kernel_step=True)} == {
        "kattn": 1, "kswa": 1, "kffn": 2, "embed": 1, "khead": 1, "overhead": 1}
    pts = lut_points([ka, hyb], [16, 64, 256], [1, 4, 16], kernel_step=True)
    k_pts = [(op, sig, b) for op, sig, _, b in pts if op in ("kattn", "kswa", "kffn", "khead")]
    assert {op for op, _, _ in k_pts} == {"kattn", "kswa", "kffn", "khead"}
    assert {b for _, _, b in k_pts} == {1, 4} and all(sig["hidden_size"] == 48 for _, sig, _ in k_pts)
    lut = LUT(meta={"dtype": "float32"})
    for op, sig, c, b in pts:
        lut.add({"op": op, "sig": sig, "context": c, "batch": b, "ms": formula(op, sig, c, b)})
    p = predict_decode(ka, lut, 100, 1)
    want = sum(n * formula(op, sig, effective_context(op, sig, 100), 1)
               for op, sig, n in model_pieces(ka, kernel_step=True))
    assert p.kernel_step and "norm" not in p.by_op and p.ms_per_token == pytest.approx(want)
    big = predict_decode(ka, lut, 100, 16)  # past the GEMV's rows: the usual step
    assert not big.kernel_step and big.ms_per_token == pytest.approx(expected_ms(ka, 100, 16))
    assert not predict_decode(hyb, lut, 100, 1).kernel_step
    assert not predict_decode(ka, synthetic_lut([ka]), 100, 1).kernel_step  # an older table
    static = predict_generate(ka, lut, 200, cache="static")
    assert static["seconds"] == pytest.approx(predict_generate(ka, lut, 200, cache="growing")["seconds"])
    assert static["seconds"] < 200 * predict_decode(ka, lut, 200, 1).ms_per_token / 1e3


def test_kernel_step_pieces_compute_the_blocks(interp):
    """``kattn`` / ``kffn`` / ``khead`` (the LUT's pieces of the kernel step) compute what the model's layers do:
    a block's ``x + op(norm(x))`` with the cache written at ``pos``, and ``head(norm(x))`` (float32, Triton's
    interpreter); the LUT builder times them on the CPU when asked."""
    from hylo.ops import gemv as G
    from hylo.profile.measure import build_lut
    from hylo.profile.pieces import make_piece

    torch.manual_seed(0)
    cfg = cfg_attn_ffn(attn_qk_norm=True)
    pos = torch.tensor([5, 9])
    with G.gemv_mode("on"):
        for op in ("kattn", "kswa", "kffn"):
            piece = make_piece(op, signature(cfg, op[1:])).eval()
            with torch.no_grad():
                for p in piece.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            x = piece.inputs(2, "cpu", torch.float32)
            st = piece.init_state(2, 16, device="cpu", dtype=torch.float32)
            for t in st.values():
                t.normal_()
            ref_st = {k: t.clone() for k, t in st.items()}
            with torch.no_grad():
                got = piece.step(x, st, pos)
                ref = x + piece.mixer.step(piece.norm(x)[:, None], ref_st, pos)[:, 0]
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
            for k in st:
                torch.testing.assert_close(st[k], ref_st[k], rtol=1e-5, atol=1e-5)
        head = make_piece("khead", signature(cfg, "head")).eval()
        x = head.inputs(2, "cpu", torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(head.step(x, {}, pos), head.lm_head(head.norm(x)), rtol=1e-4, atol=1e-4)
        lut = build_lut([cfg_attn_ffn(layers="a f")], [8], [1], device="cpu", dtype=torch.float32, repeats=1,
                        kernel_step=True)
    ok = {e["op"] for e in lut.entries if "ms" in e}
    assert {"kattn", "kffn", "khead", "attn", "ffn", "head"} <= ok


@pytest.mark.parametrize("kw", [{}, {"num_meta_tokens": 0, "tie_word_embeddings": False, "swa_window": 8}])
def test_model_memory_matches_a_real_model(kw):
    cfg = cfg_all(**kw)
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    for ctx in (8, 40):
        mem = model_memory(cfg, ctx, torch.float32)
        real_w = sum(p.numel() * 4 for p in model.parameters())  # parameters() yields tied weights once
        assert mem["weights_bytes"] == real_w
        cache = model.new_cache(3, ctx)
        assert mem["state_bytes_per_seq"] * 3 == cache.nbytes()
    for i, op in enumerate(cfg.layers):  # each signature rebuilds its layer exactly
        real = sum(p.numel() for p in model.layers[i].mixer.parameters()) * 4
        assert weight_bytes(op, signature(cfg, op), 4) == real


def test_max_batch_and_integrate():
    assert max_batch(100, 8, weight_bytes=10, margin=0.9) == 10
    assert max_batch(100, 8, weight_bytes=10, margin=0.9, cap=4) == 4
    assert max_batch(100, 8, weight_bytes=95) == 0
    assert max_batch(1000, 7, fixed_bytes=300, margin=1.0) == 100
    with pytest.raises(ValueError, match="margin"):
        max_batch(100, 8, margin=0)
    with pytest.raises(ValueError, match="per_seq"):
        max_batch(100, 0)
    assert integrate_steps([(50, 2.0)], 100) == pytest.approx(200.0)
    a, b, n = 1.0, 0.01, 1000
    pts = [(p, a + b * p) for p in (0, 250, 1000)]
    assert integrate_steps(pts, n) == pytest.approx(a * n + b * n * n / 2)
    assert integrate_steps([(100, 1.0), (900, 3.0)], n) == pytest.approx(100 + 1600 + 300)


# ----------------------------------------------------------------------------- schema and plots
def fake_doc():
    model = {"name": "m", "config": {}, "memory": {"weights_bytes": 1, "state_bytes_per_seq": {"8": 2},
                                                   "peak_bytes": None},
             "decode": [{"context": c, "batch": 1, "ms_per_token": 1.0 + c / 100, "tokens_per_s": 1.0}
                        for c in (8, 64)],
             "generate": {"tokens": 64, "batch": 1, "seconds": 0.1, "method": "integrated"}, "prefill": [],
             "throughput": [{"context": 64, "batch": 4, "ms_per_step": 2.0, "tokens_per_s": 2000.0}],
             "throughput_vs_batch": [{"context": 64, "batch": b, "ms_per_step": 1.0 + b,
                                      "tokens_per_s": 1e3 * b / (1 + b)} for b in (1, 4)],
             "prediction": {"decode": [{"context": 8, "ms_per_token": 1.1, "measured": 1.08, "rel_error": 0.02}]},
             "errors": []}
    return {"schema": "hylo.profile/1", "date": "x", "environment": {"device": {}, "versions": {"torch": "t",
            "commit": "c"}}, "dtype": "bfloat16", "options": {}, "models": [model]}


def test_schema_check_and_plots(tmp_path):
    doc = fake_doc()
    check_profile(doc)
    bad = fake_doc()
    del bad["models"][0]["memory"]["peak_bytes"]
    with pytest.raises(ValueError, match="peak_bytes"):
        check_profile(bad)
    bad = fake_doc()
    bad["models"][0]["decode"][0]["ms_per_token"] = 0
    with pytest.raises(ValueError, match="ms_per_token"):
        check_profile(bad)
    made = write_plots(doc, tmp_path)
    assert {p.name for p in made} == {"ms_per_token_vs_context.png", "throughput_vs_batch.png",
                                      "predicted_vs_measured.png"}
    for p in made:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the whole flow on the CPU
def test_cli_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    r = CliRunner().invoke(app, ["profile", "tiny-all"])
    assert r.exit_code == 2
    text = "".join(r.output.split())  # rich wraps lines
    assert "CUDA" in text and "--devicecpu" in text


def test_cli_profile_end_to_end_cpu(tmp_path):
    out, lut_path = tmp_path / "prof", tmp_path / "lut.json"
    args = ["profile", "tiny-all", "--device", "cpu", "--contexts", "8,24", "--generate", "24", "--prefill", "12",
            "--prefill-chunk", "5", "--throughput-contexts", "16", "--max-batch", "2", "--sweep", "1",
            "--steps", "3", "--repeats", "1", "--lut-out", str(lut_path), "--lut-batches", "1,2", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "profile.json").read_text())
    check_profile(doc)
    m = doc["models"][0]
    assert m["errors"] == []
    cfg = preset("tiny-all")
    assert m["memory"]["state_bytes_per_seq"]["24"] == model_memory(cfg, 24, torch.float32)["state_bytes_per_seq"]
    assert [d["context"] for d in m["decode"]] == [8, 24]
    assert m["generate"]["tokens"] == 24 and "integrated" in m["generate"]["method"]
    assert m["prefill"][0]["chunk"] == 5
    assert m["throughput"][0]["batch"] == 2 and [t["batch"] for t in m["throughput_vs_batch"]] == [1, 2]
    pred = m["prediction"]
    assert len(pred["decode"]) == 2 and all(math.isfinite(d["rel_error"]) for d in pred["decode"])
    assert pred["generate"]["measured"] == m["generate"]["seconds"]
    # the LUT holds every piece of the model
    lut = LUT.load(lut_path)
    assert not [e for e in lut.entries if "error" in e]
    for op, sig, _ in model_pieces(cfg):
        assert lut.lookup(op, sig, 24 + cfg.num_meta_tokens, 2).how == "exact"
    for png in ("ms_per_token_vs_context.png", "throughput_vs_batch.png", "predicted_vs_measured.png"):
        assert (out / png).stat().st_size > 1000
    # the predictor alone, from that LUT, on any machine
    r = CliRunner().invoke(app, ["profile", "tiny-all", "--predict-only", "--lut", str(lut_path), "--contexts", "8,24",
                                 "--generate", "24", "--out", str(out)])
    assert r.exit_code == 0, r.output
    p = json.loads((out / "prediction.json").read_text())["models"][0]
    assert p["decode"][1]["ms_per_token"] == pytest.approx(predict_decode(cfg, lut, 24).ms_per_token)


def test_build_lut_extends_without_remeasuring():
    from hylo.profile.measure import build_lut, lut_points

    cfg = preset("tiny-all")
    lut = build_lut([cfg], [8], [1], device="cpu", dtype=torch.float32, repeats=1)
    assert len(lut) == len(lut_points([cfg], [8], [1]))
    before = [dict(e) for e in lut.entries]
    lut = build_lut([cfg], [8, 16], [1], device="cpu", dtype=torch.float32, lut=lut, repeats=1)
    assert len(lut) == len(lut_points([cfg], [8, 16], [1]))
    assert all(e in lut.entries for e in before)  # kept as they were


def test_build_lut_measures_again_what_other_switches_measured():
    """Entries record the switches they ran under; a build under a switch set otherwise measures them again
    (unless keep_stale), one that only adds a switch keeps them, and entries with no record are kept."""
    from hylo.ops import gemv as G
    from hylo.profile.lut import switch_key
    from hylo.profile.measure import build_lut

    cfg = preset("tiny-all")
    kw = dict(device="cpu", dtype=torch.float32, repeats=1)
    lut = build_lut([cfg], [8], [1], **kw)
    key = lut.entries[0]["switches"]
    assert all(e["switches"] == key for e in lut.entries) and lut.meta["switch_sets"][key]["HYLO_GEMV_PRELOAD"]
    first = [dict(e) for e in lut.entries]
    with G.gemv_preload_mode("off" if G.get_gemv_preload() == "on" else "on"):
        kept = build_lut([cfg], [8], [1], lut=LUT(first, dict(lut.meta)), keep_stale=True, **kw)
        assert kept.entries == first  # nothing measured
        again = build_lut([cfg], [8], [1], lut=LUT(first, dict(lut.meta)), **kw)
    assert len(again) == len(first) and all(e["switches"] != key for e in again.entries)
    # a set that lacks a switch the current one has is no evidence; neither is an entry with no record
    sets = {key: {k: v for k, v in lut.meta["switch_sets"][key].items() if k != "HYLO_GEMV_PRELOAD"}}
    older = [{**e, "switches": key} for e in first[:2]] + [{k: v for k, v in e.items() if k != "switches"}
                                                          for e in first[2:]]
    same = build_lut([cfg], [8], [1], lut=LUT(older, {"switch_sets": sets}), **kw)
    assert same.entries[:len(older)] == older and switch_key({}) != key


def test_cli_bad_inputs(tmp_path):
    r = CliRunner().invoke(app, ["profile", str(tmp_path / "nope"), "--device", "cpu", "--out", str(tmp_path)])
    assert r.exit_code == 1 and "nope" in "".join(r.output.split())
    r = CliRunner().invoke(app, ["profile", "tiny-all", "--device", "cpu", "--contexts", "8,x"])
    assert r.exit_code == 2 and "--contexts" in r.output
    r = CliRunner().invoke(app, ["profile", "tiny-all", "--predict-only"])
    assert r.exit_code == 2 and "--lut" in r.output
