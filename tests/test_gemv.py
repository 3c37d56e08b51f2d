"""hylo.ops.gemv on the CPU: the Triton GEMV under Triton's interpreter against F.linear, when ``linear`` takes it,
the HYLO_GEMV switch, the nn.Linear patch, a DecodeRunner step with the switch on (same logits as off), the
compiled step's trace (one graph of hylo::gemv products) and the benchmark's ``+gemv`` modes."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hylo.ops import backend
from hylo import HybridLM
from hylo.engine import DecodeRunner
from hylo.ops import gemv as G
from hylo.presets import preset

triton = pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]
K, N = 100, 37  # neither a multiple of the interpreter's blocks (BK 64, BN 32)


@pytest.fixture
def spy(spy_on):
    """Shapes of the calls of the op (its callers look it up at each call); it still runs."""
    return spy_on(G, "gemv")


def make(M, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    return [None if t is None else t.to(dtype) for t in (x, w, b)]


# ----------------------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_linear(interp, dtype, M, bias):
    x, w, b = make(M, dtype, bias, seed=M)
    y = G.gemv(x, w, b)
    assert y.dtype == dtype and y.shape == (M, N)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    else:  # one rounding of the float32 result: within an ulp of it
        torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(y, G.gemv_ref(x, w, b), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", ["norm", "swiglu", "residual", "norm+residual", "swiglu+residual+bias"])
def test_fused_prologue_and_epilogue_match_the_model(interp, dtype, fused):
    """The decode fusions against gemv_ref (RMSNorm / SwiGLU / residual computed as the model does), and
    gemv_ref itself against the model's own modules."""
    from hylo.layers.norm import RMSNorm

    M = 3
    g = torch.Generator().manual_seed(7)
    x, w, b = make(M, dtype, "bias" in fused, seed=5)
    kw = {}
    if "swiglu" in fused:
        kw["swiglu"] = True
        x = torch.randn(M, 2 * K, generator=g).to(dtype)
    if "norm" in fused:
        kw["norm_weight"], kw["eps"] = (1 + 0.3 * torch.randn(K, generator=g)).to(dtype), 1e-6
    if "residual" in fused:
        kw["residual"] = torch.randn(M, N, generator=g).to(dtype)
    y, ref = G.gemv(x, w, b, **kw), G.gemv_ref(x, w, b, **kw)
    # float32: the same arithmetic, checked tightly. bf16: Triton's interpreter truncates float32 -> bf16 (torch
    # and compiled Triton round to nearest), so each of the prologue's roundings can be an ulp off: within 3% of
    # the largest output (about 8 ulps)
    scale = ref.abs().max().item()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=0.03 * scale)
    torch.testing.assert_close(y, ref, **tol)
    assert y.dtype == dtype
    # gemv_ref is the model's computation
    h = x
    if "swiglu" in fused:
        gate, up = x.chunk(2, dim=-1)
        h = F.silu(gate) * up
    if "norm" in fused:
        norm = RMSNorm(K, 1e-6).to(dtype)
        norm.weight.data.copy_(kw["norm_weight"])
        h = norm(h)
    out = F.linear(h.float(), w.float(), None if b is None else b.float()).to(dtype)
    if "residual" in fused:
        out = out + kw["residual"]
    torch.testing.assert_close(ref, out, **tol)


def test_op_rejects_bad_input():
    x, w, b = make(2, torch.float32, True)
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        G.gemv(x, w[:, :-1])
    with pytest.raises(ValueError, match="one dtype"):
        G.gemv(x, w.double())
    with pytest.raises(ValueError, match="one dtype"):
        G.gemv(x, w, b.half())
    with pytest.raises(ValueError, match="contiguous"):
        G.gemv(x, torch.randn(K, N).t())
    with pytest.raises(ValueError, match="bias"):
        G.gemv(x, w, b[:-1])
    with pytest.raises(ValueError, match=r"\[M, 2K\]"):
        G.gemv(x, w, swiglu=True)
    with pytest.raises(ValueError, match="norm_weight"):
        G.gemv(x, w, norm_weight=torch.ones(K + 1))
    with pytest.raises(ValueError, match="residual"):
        G.gemv(x, w, residual=torch.zeros(2, N + 1))


# ----------------------------------------------------------------------------------------- linear() routing
def test_linear_takes_the_kernel_only_for_decode_products(interp, spy):
    w = make(1, torch.float32, False)[1]
    g = torch.Generator().manual_seed(1)
    with G.gemv_mode("on"):
        for shape in [(1, 1, K), (4, K), (2, 2, K), (3, 1, K)]:  # rows 1..4, any leading shape
            x = torch.randn(shape, generator=g)
            spy.clear()
            y = G.linear(x, w)
            assert spy == [(x.numel() // K, K)], shape
            torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
        for x in [torch.randn(5, K), torch.randn(2, 4, K)]:  # more than MAX_ROWS rows: prefill, big buckets
            spy.clear()
            torch.testing.assert_close(G.linear(x, w), F.linear(x, w))
            assert spy == []
        x = torch.randn(1, K)
        spy.clear()
        with pytest.raises(RuntimeError):  # dtypes differ: F.linear's own error
            G.linear(x.half(), w)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # F.linear computes in bf16 here
            assert G.linear(x, w).dtype == torch.bfloat16
        assert spy == []
        wg = w.clone().requires_grad_()
        G.linear(x, wg)  # the op has no backward
        assert spy == []
        with torch.no_grad():
            G.linear(x, wg)
        assert spy == [(1, K)]
    spy.clear()
    with G.gemv_mode("off"):
        torch.testing.assert_close(G.linear(x, w), F.linear(x, w))
    assert spy == []


def test_linear_without_interpreter_on_cpu_takes_f_linear(monkeypatch, spy):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, _ = make(1, torch.float32, False)
    with G.gemv_mode("on"):
        torch.testing.assert_close(G.linear(x, w), F.linear(x, w))
    assert spy == [] and not G.supported(torch.device("cpu"))


def test_switch():
    assert (G._GEMV.env, G._GEMV.choices) == ("HYLO_GEMV", ("auto", "off", "on"))
    before = G.get_gemv()
    with pytest.raises(ValueError, match="invalid"):
        G.set_gemv("fast")
    with G.gemv_mode("on"):
        assert G.get_gemv() == "on"
    assert G.get_gemv() == before


def test_enabled_auto_takes_cuda_only(interp, monkeypatch):
    """``auto`` (the default) sends a runner's products to the kernel on CUDA only; ``on`` also under the CPU
    interpreter; ``off`` nowhere; and nothing where Triton is missing."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with G.gemv_mode("auto"):
        assert G.enabled(cuda) and not G.enabled(cpu)
    with G.gemv_mode("on"):
        assert G.enabled(cuda) and G.enabled(cpu)
    with G.gemv_mode("off"):
        assert not G.enabled(cuda) and not G.enabled(cpu)
    monkeypatch.setattr(G, "triton", None)
    with G.gemv_mode("on"):
        assert not G.enabled(cuda)


def test_invalid_env_value_is_refused(monkeypatch):
    monkeypatch.setenv("HYLO_GEMV", "yes")
    with pytest.raises(ValueError, match="HYLO_GEMV='yes' is invalid"):
        type(G._GEMV)(G._GEMV.what, G._GEMV.env, G._GEMV.choices, "off")


# ----------------------------------------------------------------------------------------- the nn.Linear patch
class Doubled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_gemv_linears_patches_and_restores(interp, spy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, N), nn.ReLU(), Doubled(N, 8))
    x = torch.randn(1, K)
    ref = model(x)
    patch = G.gemv_linears(model)
    with torch.no_grad(), G.gemv_mode("off"):
        with patch:  # turns the switch on
            with patch:  # re-entered: the outer exit still restores
                torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
            assert "forward" in model[0].__dict__ and G.get_gemv() == "on"
        assert spy == [(1, K)]  # the subclass with its own forward keeps it
        assert all("forward" not in m.__dict__ for m in model) and G.get_gemv() == "off"
        spy.clear()
        model(x)
        assert spy == []


# ----------------------------------------------------------------------------------------- the decode step
def tiny_all(seed=0):
    torch.manual_seed(seed)
    model = HybridLM(preset("tiny-all")).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every parameter random, so JetBlock's zero-initialised generator matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def n_linear_calls(model) -> int:
    """nn.Linear calls in one decode step of ``model``: every such module of the layers is used once."""
    return sum(isinstance(m, nn.Linear) for m in model.layers.modules())


def test_runner_same_logits_with_gemv(interp, spy):
    """Every projection and the LM head of the step go through the kernel (interpreter) for a bucket of 2 rows,
    with the logits of the F.linear step; a bucket of 5 rows, prefill and the model's own forward never do."""
    model = tiny_all()
    ids = torch.tensor([[3, 4], [5, 6]])
    off = DecodeRunner(model, 2, 8)
    ref = [off.step(t) for t in ids]
    with G.gemv_mode("on"):
        on = DecodeRunner(model, 2, 8)
        assert on.gemv and not off.gemv
        spy.clear()
        got = [on.step(t) for t in ids]
        assert len(spy) == 2 * (n_linear_calls(model) + 1) and {rows for rows, _ in spy} == {2}
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert all("forward" not in m.__dict__ for m in model.modules())  # restored after every step
        spy.clear()
        DecodeRunner(model, 5, 8).step(torch.arange(5))
        with torch.no_grad():
            model(ids[:1, :1])  # a 1-token forward outside the runner: its Linear modules are not patched
        assert spy == []


def test_fused_step_same_logits_fewer_norms(interp, spy, spy_on):
    """HYLO_GEMV_FUSE=on: the attention and FFN blocks' pre-norms, the final norm, SwiGLU's product and the
    residual adds run inside the GEMVs; same logits as the unfused step (float32), one GEMV per product, and
    exactly one RMSNorm call fewer per fused block (plus the final one). Not taken for 5 rows or with the switch
    off."""
    from hylo.engine import fused
    from hylo.layers import norm as N

    model = tiny_all()
    ids = torch.tensor([[3, 4], [5, 6], [7, 1]])
    norms = spy_on(N, "rms_norm")
    with G.gemv_mode("on"):
        plain = DecodeRunner(model, 2, 8)
        norms.clear()
        ref = [plain.step(t) for t in ids]
        n_plain = len(norms)
        with fused.fuse_mode("on"):
            on = DecodeRunner(model, 2, 8)
            assert on.fused and not plain.fused
            norms.clear()
            spy.clear()
            got = [on.step(t) for t in ids]
            assert not DecodeRunner(model, 5, 8).fused
    n_fused = sum(fused.fusable(b) for b in model.layers)
    assert n_fused == sum(type(b.mixer).__name__ in ("Attention", "SlidingWindowAttention", "SwiGLU")
                          for b in model.layers) > 0
    assert len(norms) == n_plain - len(ids) * (n_fused + 1)
    assert len(spy) == len(ids) * (n_linear_calls(model) + 1) and {rows for rows, _ in spy} == {2}
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture
def traceable_kernel(monkeypatch):
    """Pretend the kernel can run on the CPU without the interpreter (which cannot be traced): what torch.compile
    traces on a GPU, captured but never launched."""
    monkeypatch.setattr(G, "triton_interpreting", lambda: True)
    monkeypatch.setattr(backend, "triton_interpreting", lambda: True)  # supported(cpu), via triton_supported
    monkeypatch.setattr(G, "kernel", lambda: triton.jit(G._gemv_kernel))  # compiled kind, never run


def test_compiled_step_traces_one_graph_of_gemv(traceable_kernel, dynamo_targets):
    """What torch.compile sees on a GPU, traced on the CPU: pretend the kernel can run (no interpreter), capture
    dynamo's graph of the runner's step without running it: one graph (fullgraph), every product a hylo::gemv."""
    model = tiny_all()
    with G.gemv_mode("on"):
        runner = DecodeRunner(model, 1, 8)
    with runner._linears:  # the runner's patch turns the switch on while the step is traced
        targets = dynamo_targets(runner._fn, torch.tensor([3]))
    assert targets.count(torch.ops.hylo.gemv.default) == n_linear_calls(model) + 1
    assert F.linear not in targets and torch._C._nn.linear not in targets


def test_compiled_fused_step_traces_one_graph(traceable_kernel, dynamo_targets):
    """The fused step as torch.compile sees it (traced, not run, as above): one graph, one hylo::gemv per product,
    and the fused blocks' norms gone from it (fewer rsqrt)."""
    from hylo.engine import fused

    model = tiny_all()
    with G.gemv_mode("on"):
        runner = DecodeRunner(model, 1, 8)
        with fused.fuse_mode("on"):
            fused_runner = DecodeRunner(model, 1, 8)
    assert fused_runner.fused
    with runner._linears:  # the runner's patch turns the switch on while the step is traced
        plain = dynamo_targets(runner._fn, torch.tensor([3]))
    with fused_runner._linears:
        targets = dynamo_targets(fused_runner._fn, torch.tensor([3]))
    assert targets.count(torch.ops.hylo.gemv.default) == n_linear_calls(model) + 1
    assert F.linear not in targets and torch._C._nn.linear not in targets
    n_fused = sum(fused.fusable(b) for b in model.layers)
    assert targets.count(torch.rsqrt) == plain.count(torch.rsqrt) - n_fused - 1


# ----------------------------------------------------------------------------------------- the benchmark
def test_benchmark_modes():
    sys.path.insert(0, str(REPO / "benchmarks"))  # the script imports its sibling timing.py
    try:
        spec = importlib.util.spec_from_file_location("qwen3_vs_transformers",
                                                      REPO / "benchmarks" / "qwen3_vs_transformers.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    on, off, dattn = {"gemv": "on"}, {"gemv": "off"}, {"decode_attn": "on"}
    assert mod.parse_modes("eager,default+gemv,max-autotune-no-cudagraphs+gemv,eager+cublas,default+dattn+cublas,"
                           "default+fuse,eager+kstep+nopdl") == [
        ("hylo", False, {}), ("hylo_compiled_gemv", True, on),
        ("hylo_compiled_max_autotune_no_cudagraphs_gemv", "max-autotune-no-cudagraphs", on),
        ("hylo_cublas", False, off), ("hylo_compiled_dattn_cublas", True, {**dattn, **off}),
        ("hylo_compiled_fuse", True, {"fuse": "on"}), ("hylo_kstep_nopdl", False, {"kernel_step": "on", "pdl": "off"})]
    with pytest.raises(SystemExit, match="suffix"):
        mod.parse_modes("eager+fast")


def test_result_files_record_the_kernel_switches(monkeypatch):
    """hylo.runinfo.versions() (in every result file) records each switch as it is at that moment."""
    from hylo.runinfo import versions

    monkeypatch.setenv("HYLO_PAD_HEADS", "0")
    with G.gemv_mode("off"):
        sw = versions()["switches"]
    assert sw["HYLO_GEMV"] == "off" and sw["HYLO_PAD_HEADS"] == "0"
    assert {"HYLO_BACKEND", "HYLO_SDPA", "HYLO_DECODE_ATTN", "HYLO_LINEAR_CE", "HYLO_SSD_PAD_V"} <= set(sw)
    assert versions()["switches"]["HYLO_GEMV"] == G.get_gemv()


@pytest.mark.parametrize("fused", ["plain", "norm+residual", "swiglu+bias"])
@pytest.mark.parametrize("M", [1, 3])
def test_preloading_kernel_matches_reference(interp, fused, M):
    """HYLO_GEMV_PRELOAD's kernel (a tile of whole rows per program, every row of x): same results as gemv_ref,
    with the fusions; K = 100 is padded to 128 in registers."""
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 2 * K if "swiglu" in fused else K, generator=g)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if "bias" in fused else None
    kw = {"norm_weight": 1 + 0.1 * torch.randn(K, generator=g), "eps": 1e-6,
          "residual": torch.randn(M, N, generator=g)} if "norm" in fused else {"swiglu": "swiglu" in fused}
    got = G.gemv_direct(x, w, b, preload=True, **kw)
    torch.testing.assert_close(got, G.gemv_ref(x, w, b, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extras", ["plain", "norm+bias", "norm+acc"])
def test_glu_epilogue_matches_reference(interp, dtype, extras):
    """``glu``: the gate/up GEMV leaves SwiGLU's ``silu(gate) * up`` (N = 37 outputs from 74 rows, not a multiple of
    the interpreter's tile) as glu_ref computes it; the down projection after it equals the chain that reads the
    gate/up product and computes SwiGLU in its prologue, bit for bit (same roundings in the same order)."""
    g = torch.Generator().manual_seed(7)
    M = 2
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (0.3 * torch.randn(2 * N, K, generator=g)).to(dtype)
    wd = (0.3 * torch.randn(20, N, generator=g)).to(dtype)
    b = torch.randn(2 * N, generator=g).to(dtype) if "bias" in extras else None
    kw = {"norm_weight": (1 + 0.1 * torch.randn(K, generator=g)).to(dtype), "eps": 1e-6} if "norm" in extras else {}
    if "acc" in extras:  # the input waits for a float32 sum, as after the fused attention
        acc = torch.randn(M, K, generator=g)
        kw_acc = dict(acc=acc, h_out=torch.empty_like(x))
        x_in = (acc.to(dtype).float() + x.float()).to(dtype)
    else:
        kw_acc, x_in = {}, x
    act = G.gemv_direct(x, w, b, glu=True, **kw, **kw_acc)
    assert act.shape == (M, N) and act.dtype == dtype
    ref = G.glu_ref(x_in, w, b, **kw).float()
    # bf16: the interpreter truncates float32 -> bf16 where torch rounds to nearest, and the norm's roundings add up
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=0.04 * float(ref.abs().max()))
    torch.testing.assert_close(act.float(), ref, **tol)
    gu = G.gemv_direct(x, w, b, preload=True, **kw, **({**kw_acc, "h_out": torch.empty_like(x)} if kw_acc else {}))
    chain = G.gemv_direct(gu, wd, swiglu=True, preload=True, residual=x[:, :20])
    assert torch.equal(G.gemv_direct(act, wd, preload=True, residual=x[:, :20]), chain)
    with pytest.raises(ValueError, match="glu"):
        G.gemv_direct(x, w[:-1], glu=True)
    with pytest.raises(ValueError, match="glu"):
        G.gemv_direct(x, w, glu=True, residual=act)


def test_fixed_preload_configs(interp, monkeypatch):
    """HYLO_GEMV_PRE_CONFIGS: ``NxK[g]=BN/WARPS`` entries are parsed (bad ones refused) and a product of that shape
    takes the fixed tile instead of the autotuner's (under the interpreter: its BN; results unchanged, a tile over
    PRELOAD_ELEMS refused)."""
    assert G.parse_pre_configs("4096x1024=4/8, 3072x1024g=2/16") == {(4096, 1024, False): (4, 8),
                                                                      (3072, 1024, True): (2, 16)}
    for bad in ("4096x1024=3/8", "4096x1024=4", "4096=4/8", "4096x1024=4/5"):
        with pytest.raises(ValueError, match="HYLO_GEMV_PRE_CONFIGS"):
            G.parse_pre_configs(bad)
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, K, generator=g), torch.randn(2 * N, K, generator=g)
    want = G.gemv_ref(x, w)
    for bn in (1, 32):  # 74 outputs: 74 tiles, or 3 with the last one partial
        monkeypatch.setattr(G, "PRE_CONFIGS", {(2 * N, K, False): (bn, 4), (N, K, True): (bn, 4)})
        torch.testing.assert_close(G.gemv_direct(x, w, preload=True), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(G.gemv_direct(x, w, glu=True), G.glu_ref(x, w), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(G, "PRE_CONFIGS", {(2 * N, K, False): (256, 4)})  # 256 x 128 > 16384 weights
    with pytest.raises(ValueError, match="PRELOAD_ELEMS"):
        G.gemv_direct(x, w, preload=True)


def test_device_tables_of_configs(monkeypatch):
    """The shipped table for an H100 parses (the Qwen3-0.6B step's three products); an unknown device has none;
    PRE_CONFIGS comes first, and the table is read on CUDA devices only, with HYLO_GEMV_CONFIGS=table."""
    h100 = G.device_configs("NVIDIA H100 80GB HBM3")
    assert set(h100) == {(4096, 1024, False), (3072, 1024, True), (1024, 3072, False)}
    assert all(bn * (1 << (k - 1).bit_length()) * (2 if glu else 1) <= G.PRELOAD_ELEMS
               for (n, k, glu), (bn, w) in h100.items())
    assert G.device_configs("A GPU with no table") == {}
    cpu = torch.device("cpu")
    assert G.fixed_config(4096, 1024, False, cpu) is None
    monkeypatch.setattr(G, "PRE_CONFIGS", {(4096, 1024, False): (2, 4)})
    assert G.fixed_config(4096, 1024, False, cpu) == (2, 4)


def test_preload_applies_where_rows_fit():
    """on: every product whose rows fit in a tile (the LM head's too, but the kernel step asks for the plain
    kernel there); off: none."""
    assert G.preload_applies(3072, "on") and not G.preload_applies(3072, "off")
    assert not G.preload_applies(2 * G.PRELOAD_ELEMS, "on")  # a row longer than a tile
