"""hylo.ops.decode_ffn on the CPU: the fused FFN block under Triton's interpreter (two launches, no barrier)
against the two-GEMV reference and the model's own FFN block, and its input checks."""

import pytest
import torch

from hylo.ops import decode_ffn as DF
from hylo.ops import gemv as G
from hylo.ops.gemv import gemv_ref

triton = pytest.importorskip("triton")
D, I = 40, 52  # neither a multiple of the interpreter's blocks (BK 32, BI 8, BN 8, BKI 32)


def make(M, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(M, D, generator=g), torch.randn(2 * I, D, generator=g) / D ** 0.5,
          torch.randn(D, I, generator=g) / I ** 0.5, 1 + 0.1 * torch.randn(D, generator=g)]
    if bias:
        ts += [torch.randn(2 * I, generator=g), torch.randn(D, generator=g)]
    return [t.to(dtype) for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_two_gemvs(interp, dtype, M, bias):
    x, wgu, wd, nw, *b = make(M, dtype, bias, seed=M)
    y = DF.decode_ffn(x, wgu, wd, nw, 1e-6, *b)
    ref = DF.decode_ffn_ref(x, wgu, wd, nw, 1e-6, *b)
    assert y.dtype == dtype and y.shape == (M, D)
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    else:  # against the two Triton GEMVs (the interpreter's bf16 roundings are its own, so not the reference's):
        # same roundings; sums in another block order may move an intermediate rounding by an ulp
        two = G.gemv(G.gemv(x, wgu, b[0] if b else None, nw, 1e-6), wd, b[1] if b else None, residual=x, swiglu=True)
        torch.testing.assert_close(y, two, rtol=1e-2, atol=1e-2)
        assert (y == two).float().mean() > 0.9
    # the reference is the two GEMVs of the kernel step, written out
    gu = gemv_ref(x, wgu, b[0] if b else None, nw, 1e-6)
    assert torch.equal(ref, gemv_ref(gu, wd, b[1] if b else None, residual=x, swiglu=True))


def test_kernel_matches_the_model_block(interp):
    """Against hylo's own pre-norm SwiGLU block (float32): the fused kernel computes what the layer does."""
    from hylo import HybridLM
    from hylo.config import HyloConfig

    cfg = HyloConfig(vocab_size=64, hidden_size=D, layers=["attn", "ffn"], attn_num_heads=4, attn_num_kv_heads=2,
                     attn_head_dim=8, ffn_intermediate_size=I)
    torch.manual_seed(0)
    block = HybridLM(cfg).layers[1].eval()
    x = torch.randn(2, D)
    m, n = block.mixer, block.norm
    y = DF.decode_ffn(x, m.gate_up_proj.weight, m.down_proj.weight, n.weight, n.eps)
    with torch.no_grad():
        want = x + m(n(x))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused(interp):
    x, wgu, wd, nw = make(1, torch.float32, False)
    with pytest.raises(ValueError, match="shapes"):
        DF.decode_ffn(x, wgu[:-1], wd, nw, 1e-6)
    with pytest.raises(ValueError, match="one dtype"):
        DF.decode_ffn(x, wgu.double(), wd, nw, 1e-6)
    with pytest.raises(ValueError, match="both biases"):
        DF.decode_ffn(x, wgu, wd, nw, 1e-6, torch.zeros(2 * I))
