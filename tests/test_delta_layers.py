"""DeltaNet, GatedDeltaNet and JetBlock layers: parallel vs step, prefill + decode, chunked prefill,
gradients against a float64 recurrence, initialisation and checkpoint-facing parameter names."""

import pytest
import torch

import hylo.layers.deltanet as dn_mod
import hylo.layers.gated_deltanet as gdn_mod
import hylo.layers.jetblock as jet_mod
from hylo.config import HyloConfig
from hylo.layers import layer_class
from hylo.ops.delta_rule import delta_rule_naive, l2norm

OPS = ["deltanet", "gdn", "jet"]
D = 32


def make_layer(op, dtype=torch.float32, seed=0):
    """A tiny layer with non-trivial weights (so convs, gates and the kernel generator all matter)."""
    torch.manual_seed(seed)
    cfg = HyloConfig(hidden_size=D, layers=op, attn_num_heads=2, vocab_size=16)
    layer = layer_class(op)(cfg, 0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
            elif name.endswith("w2.bias"):
                p.normal_(0, 0.5)
    return layer.to(dtype)


def inputs(T, b=2, dtype=torch.float32, seed=1):
    return torch.randn(b, T, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run_steps(layer, x, state, start=0):
    return torch.cat([layer.step(x[:, t:t + 1], state, torch.full((x.shape[0],), start + t)) for t in
                      range(x.shape[1])], 1)


def assert_states_close(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k, **tol)


TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("T", [64, 37])
@torch.no_grad()
def test_parallel_matches_steps(op, T):
    layer = make_layer(op)
    x = inputs(T)
    st_par = layer.init_state(2, T)
    y_par = layer(x, st_par)
    torch.testing.assert_close(layer(x), y_par)  # the stateless forward is the same computation
    st_step = layer.init_state(2, T)
    y_step = run_steps(layer, x, st_step)
    torch.testing.assert_close(y_step, y_par, **TOL)
    assert_states_close(st_step, st_par, **TOL)
    assert st_par["S"].dtype == torch.float32 and st_par["S"].abs().sum() > 0


@pytest.mark.parametrize("op", OPS)
@torch.no_grad()
def test_prefill_then_decode_and_chunked_prefill(op):
    layer = make_layer(op)
    x = inputs(80)
    st_full = layer.init_state(2, 80)
    y_full = layer(x, st_full)
    # prefill 50, then decode 30
    st = layer.init_state(2, 80)
    y = torch.cat([layer(x[:, :50], st), run_steps(layer, x[:, 50:], st, start=50)], 1)
    torch.testing.assert_close(y, y_full, **TOL)
    assert_states_close(st, st_full, **TOL)
    # chunked prefill: forward(x2, state after x1) == forward(x1 ++ x2)
    st = layer.init_state(2, 80)
    y = torch.cat([layer(x[:, :3], st), layer(x[:, 3:70], st, offset=3), layer(x[:, 70:], st, offset=70)], 1)
    torch.testing.assert_close(y, y_full, **TOL)
    assert_states_close(st, st_full, **TOL)


def _naive_delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False,
                      use_qk_l2norm=False):
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return delta_rule_naive(q, k, v, beta, g, scale, initial_state, output_final_state)


@pytest.mark.parametrize("op", OPS)
def test_grads_match_float64_recurrence(op, monkeypatch):
    """float32 layer on the chunked reference vs a float64 copy running the token-by-token recurrence."""
    layer = make_layer(op)
    layer64 = make_layer(op, torch.float64)
    x = inputs(70).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    w = torch.randn(2, 70, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (layer(x).double() * w).sum().backward()
    for mod in (dn_mod, gdn_mod, jet_mod):
        monkeypatch.setattr(mod, "delta_rule", _naive_delta_rule, raising=False)
    (layer64(x64) * w).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-3, atol=1e-4)
    grads64 = dict(layer64.named_parameters())
    for name, p in layer.named_parameters():
        ref = grads64[name].grad
        assert p.grad is not None and ref.abs().max() > 0, name
        torch.testing.assert_close(p.grad.double(), ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item(),
                                   msg=name)


@pytest.mark.parametrize("op", OPS)
def test_grads_flow_through_state(op, monkeypatch):
    """Training over two pieces that share a state (chunked prefill with autograd on) gives the gradients of
    one forward over the whole sequence. The naive recurrence saves its initial state for backward, so this
    also checks that the in-place state update does not corrupt what autograd saved."""
    for mod in (dn_mod, gdn_mod, jet_mod):
        monkeypatch.setattr(mod, "delta_rule", _naive_delta_rule, raising=False)
    layer = make_layer(op)
    x = inputs(20)
    grads = []
    for pieces in ([20], [7, 13]):
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        st = layer.init_state(2, 20)
        ys, start = [], 0
        for n in pieces:
            ys.append(layer(xx[:, start:start + n], st, offset=start))
            start += n
        torch.cat(ys, 1).square().sum().backward()
        grads.append([xx.grad] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


EXPECTED = {  # checkpoint-facing names and shapes (hidden 32, 2 heads)
    "deltanet": {"q_proj.weight": (32, 32), "k_proj.weight": (32, 32), "v_proj.weight": (32, 32),
                 "b_proj.weight": (2, 32), "q_conv1d.weight": (32, 1, 4), "k_conv1d.weight": (32, 1, 4),
                 "v_conv1d.weight": (32, 1, 4), "o_norm.weight": (16,), "o_proj.weight": (32, 32)},
    "gdn": {"q_proj.weight": (32, 32), "k_proj.weight": (32, 32), "v_proj.weight": (64, 32),
            "a_proj.weight": (2, 32), "b_proj.weight": (2, 32), "A_log": (2,), "dt_bias": (2,),
            "q_conv1d.weight": (32, 1, 4), "k_conv1d.weight": (32, 1, 4), "v_conv1d.weight": (64, 1, 4),
            "g_proj.weight": (64, 32), "o_norm.weight": (32,), "o_proj.weight": (32, 64)},
    "jet": {"q_proj.weight": (32, 32), "k_proj.weight": (32, 32), "v_proj.weight": (64, 32),
            "b_proj.weight": (2, 32), "a_proj.weight": (2, 32), "A_log": (2,), "dt_bias": (2,),
            "dynamic_conv1d.kernel_generator.w1.weight": (8, 32),
            "dynamic_conv1d.kernel_generator.w2.weight": (256, 8),
            "dynamic_conv1d.kernel_generator.w2.bias": (256,),
            "g_proj.weight": (64, 32), "o_norm.weight": (32,), "o_proj.weight": (32, 64)},
}
STATES = {"deltanet": {"q_conv": (32, 3), "k_conv": (32, 3), "v_conv": (32, 3), "S": (2, 16, 16)},
          "gdn": {"q_conv": (32, 3), "k_conv": (32, 3), "v_conv": (64, 3), "S": (2, 16, 32)},
          "jet": {"v_conv": (64, 3), "S": (2, 16, 32)}}


@pytest.mark.parametrize("op", OPS)
def test_parameter_names_and_state_shapes(op):
    cfg = HyloConfig(hidden_size=D, layers=op, attn_num_heads=2, vocab_size=16)
    layer = layer_class(op)(cfg, 0)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == EXPECTED[op]
    st = layer.init_state(3, 10, dtype=torch.bfloat16)
    assert {k: tuple(v.shape[1:]) for k, v in st.items()} == STATES[op]
    assert st["S"].dtype == torch.float32 and all(v.dtype == torch.bfloat16 for k, v in st.items() if k != "S")
    assert layer.state_bytes(10) == layer.state_bytes(10_000)  # fixed-size state


def test_reset_parameters():
    torch.manual_seed(0)
    cfg = HyloConfig(hidden_size=64, layers="jet f gdn", attn_num_heads=4, vocab_size=16)
    for op in ("jet", "gdn"):
        layer = layer_class(op)(cfg, 0)
        A = layer.A_log.exp()
        assert torch.isfinite(layer.A_log).all() and (A > 0).all() and (A <= 16).all()
        dt = torch.nn.functional.softplus(layer.dt_bias)
        assert (dt >= 1e-4 - 1e-7).all() and (dt <= 0.1 + 1e-6).all()
        assert (layer.o_norm.weight == 1).all()
    gen = layer_class("jet")(cfg, 0).dynamic_conv1d.kernel_generator
    assert (gen.w1.weight == 0).all() and (gen.w2.weight == 0).all()
    assert 0.01 < gen.w2.bias.std().item() < 0.03


def test_jetblock_starts_as_static_conv():
    """With the generator's weights at zero every token gets the same kernel: w2's bias."""
    cfg = HyloConfig(hidden_size=D, layers="jet", attn_num_heads=2, vocab_size=16)
    layer = layer_class("jet")(cfg, 0)
    x = inputs(5)
    kern = layer.dynamic_conv1d.kernels(x)
    assert kern.shape == (2, 5, 64, 4)
    torch.testing.assert_close(kern, layer.dynamic_conv1d.kernel_generator.w2.bias.view(64, 4).expand_as(kern))


def test_model_init_keeps_layer_specific_init():
    """HybridLM initialises every Linear, then calls reset_parameters: the generator must end at zero."""
    from hylo.model import HybridLM

    cfg = HyloConfig(hidden_size=D, layers="d f gdn f jet", attn_num_heads=2, vocab_size=16)
    model = HybridLM(cfg)
    jet = model.layers[4].mixer
    assert (jet.dynamic_conv1d.kernel_generator.w2.weight == 0).all()
    assert jet.dynamic_conv1d.kernel_generator.w2.bias.abs().sum() > 0
    ids = torch.randint(0, 16, (2, 9))
    assert torch.isfinite(model(input_ids=ids).logits).all()
