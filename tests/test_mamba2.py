"""Mamba2 layer: parallel vs decode steps, state continuation, gradients, init, HF Mamba2 compatibility."""

import copy

import pytest
import torch
import torch.nn.functional as F

from hylo.config import HyloConfig
from hylo.layers.mamba2 import Mamba2

D_MODEL = 32


def make_layer(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = HyloConfig(vocab_size=64, hidden_size=D_MODEL, layers="m2", mamba2_expand=2, mamba2_head_dim=16,
                     mamba2_state_size=8, mamba2_n_groups=2, mamba2_conv_size=4, mamba2_chunk_size=16)
    layer = Mamba2(cfg, layer_idx=0)
    for lin in (layer.in_proj, layer.out_proj):  # the model's generic init, sized so outputs are O(1)
        torch.nn.init.normal_(lin.weight, std=0.3)
    with torch.no_grad():  # non-trivial values for the params that init to constants
        layer.D.uniform_(0.5, 1.5)
        layer.norm.weight.uniform_(0.5, 1.5)
    return layer.to(dtype)


def inputs(T, b=2, dtype=torch.float32, seed=1):
    return torch.randn(b, T, D_MODEL, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run_steps(layer, x, state):
    pos = torch.zeros(x.shape[0], dtype=torch.long)
    ys = []
    for t in range(x.shape[1]):
        ys.append(layer.step(x[:, t:t + 1], state, pos + t))
    return torch.cat(ys, 1)


def test_shapes_and_state():
    layer = make_layer()
    assert layer.num_heads == 4 and layer.conv_dim == 64 + 2 * 2 * 8
    st = layer.init_state(3, 100, dtype=torch.bfloat16)
    assert st["conv"].shape == (3, 96, 3) and st["conv"].dtype == torch.bfloat16
    assert st["ssm"].shape == (3, 4, 16, 8) and st["ssm"].dtype == torch.float32
    assert layer.state_bytes(100) == layer.state_bytes(10_000)  # fixed-size state
    assert layer(inputs(5)).shape == (2, 5, D_MODEL)


@pytest.mark.parametrize("T", [32, 21])
def test_parallel_matches_steps(T):
    layer, x = make_layer(), inputs(T)
    s_par, s_seq = layer.init_state(2, T), layer.init_state(2, T)
    y_par = layer(x, s_par)
    y_seq = run_steps(layer, x, s_seq)
    torch.testing.assert_close(y_seq, y_par, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s_seq["ssm"], s_par["ssm"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s_seq["conv"], s_par["conv"])
    assert s_par["ssm"].abs().sum() > 0
    torch.testing.assert_close(layer(x), y_par)  # no state: same outputs


@pytest.mark.parametrize("T0", [2, 19])
def test_prefill_then_steps_matches_forward(T0):
    layer, x = make_layer(), inputs(27)
    y_ref = layer(x)
    st = layer.init_state(2, 27)
    y0 = layer(x[:, :T0], st)
    y1 = run_steps(layer, x[:, T0:], st)
    torch.testing.assert_close(torch.cat([y0, y1], 1), y_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("T1", [16, 7, 2])
def test_forward_continues_from_state(T1):
    layer, x = make_layer(), inputs(40)
    st_ref = layer.init_state(2, 40)
    y_ref = layer(x, st_ref)
    st = layer.init_state(2, 40)
    y = torch.cat([layer(x[:, :T1], st), layer(x[:, T1:], st)], 1)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st["ssm"], st_ref["ssm"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st["conv"], st_ref["conv"])


def test_gradients_match_float64():
    layer32 = make_layer()
    layer64 = copy.deepcopy(layer32).double()
    x = inputs(37)
    w = torch.randn(2, 37, D_MODEL, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = []
    for layer, dtype in ((layer32, torch.float32), (layer64, torch.float64)):
        xi = x.to(dtype).detach().clone().requires_grad_()
        (layer(xi).double() * w).sum().backward()
        grads.append({"x": xi.grad, **{n: p.grad for n, p in layer.named_parameters()}})
    assert set(grads[0]) == {"x", "dt_bias", "A_log", "D", "in_proj.weight", "conv1d.weight", "conv1d.bias",
                             "norm.weight", "out_proj.weight"}
    for name in grads[0]:
        g32, g64 = grads[0][name], grads[1][name]
        assert g64.abs().sum() > 0, name
        torch.testing.assert_close(g32.double(), g64, rtol=2e-4, atol=2e-4, msg=name)


def test_reset_parameters_ranges():
    torch.manual_seed(0)
    cfg = HyloConfig(hidden_size=512, layers="m2", mamba2_head_dim=8)  # 128 heads
    layer = Mamba2(cfg, 0)
    A = torch.exp(layer.A_log)
    dt = F.softplus(layer.dt_bias)
    assert A.min() >= 1 and A.max() <= 16 and A.std() > 2
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert dt.log().std() > 0.8  # log-uniform, not uniform: spans decades
    assert torch.all(layer.D == 1) and torch.all(layer.norm.weight == 1)
    assert layer.conv1d.weight.shape == (layer.conv_dim, 1, 4) and layer.conv1d.bias.abs().sum() > 0


def test_matches_hf_mamba2_mixer():
    """Same names, shapes and outputs as transformers' Mamba2Mixer (its PyTorch fallback) given our weights."""
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    layer = make_layer()
    hc = Mamba2Config(hidden_size=D_MODEL, num_heads=4, head_dim=16, expand=2, state_size=8, n_groups=2,
                      conv_kernel=4, chunk_size=16, layer_norm_epsilon=1e-5, use_bias=False, use_conv_bias=True,
                      num_hidden_layers=1, vocab_size=64)
    hf = Mamba2Mixer(hc, 0).eval()
    hf.load_state_dict(layer.state_dict(), strict=True)
    x = inputs(37)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), hf(x), rtol=1e-4, atol=1e-4)
