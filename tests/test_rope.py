"""RoPE tables: the opaque op equals the inline computation, passes torch.library's checks, and is what a compiled
parallel forward calls (inductor cannot inline it into the q/k rotation), while a decode step stays inline."""

import operator

import pytest
import torch

from hylo.ops import rope
from hylo.ops.rope import apply_rope, rope_cos_sin


def test_table_op_matches_inline_and_rotation_is_norm_preserving():
    torch.manual_seed(0)
    pos = torch.stack([torch.arange(5, 12), torch.arange(0, 7)])  # [B, T]: two offsets
    cos, sin = rope_cos_sin(pos, 16, 10000.0, torch.float32)  # through the op (T > 1)
    cos_i, sin_i = rope._tables(pos, 16, 10000.0)
    assert torch.equal(cos, cos_i) and torch.equal(sin, sin_i)
    # row 1 at position p equals the decode path (one position) at p
    cos1, sin1 = rope_cos_sin(pos[1, 3:4][None], 16, 10000.0, torch.float32)
    assert torch.equal(cos1[0, 0], cos[1, 3]) and torch.equal(sin1[0, 0], sin[1, 3])
    x = torch.randn(2, 7, 3, 16)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # a rotation
    torch.testing.assert_close(apply_rope(x[:, :1], *rope_cos_sin(torch.zeros(2, 1), 16, 1e4, torch.float32)), x[:, :1])


def test_table_op_opcheck():
    torch.library.opcheck(rope.rope_table, (torch.arange(9), 8, 500.0))
    torch.library.opcheck(rope.rope_table, (torch.arange(6).view(2, 3), 4, 10000.0))


def test_compiled_forward_calls_the_op_and_decode_stays_inline(dynamo_targets):
    def qk(q, pos):
        cos, sin = rope_cos_sin(pos, 8, 10000.0, q.dtype)
        return apply_rope(q, cos, sin)

    forward = dynamo_targets(qk, torch.randn(1, 6, 2, 8), torch.arange(6)[None])
    assert torch.ops.hylo.rope_table.default in forward
    step = dynamo_targets(qk, torch.randn(3, 1, 2, 8), torch.tensor([[4], [9], [0]]))
    assert torch.ops.hylo.rope_table.default not in step and operator.pow in step  # the inline math, traced


# ----------------------------------------------------------------------------- the Triton rotation (interpreter)
def _case(B, T, H, D, Bc, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (H + 2) * D, generator=g).to(dtype)
    x = qkv[..., : H * D].view(B, T, H, D)  # a strided view, as q after the fused projection's split
    pos = torch.arange(3, 3 + T).expand(Bc, T) + torch.arange(Bc)[:, None] * 5
    cos, sin = rope_cos_sin(pos, D, 10000.0, dtype)
    return x, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,H,D,Bc", [(2, 5, 3, 16, 1), (1, 7, 4, 12, 1), (3, 4, 2, 8, 3)])
def test_kernel_matches_reference_forward_and_backward(interp, dtype, B, T, H, D, Bc):
    x, cos, sin = _case(B, T, H, D, Bc, dtype)
    x_ref, x_k = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    y_ref, y_k = rope.apply_rope_ref(x_ref, cos, sin), rope.rope_rotate(x_k, cos, sin)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y_k, y_ref, **tol)
    assert y_k.dtype == dtype and y_k.is_contiguous()
    grad = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y_ref.backward(grad)
    y_k.backward(grad)
    torch.testing.assert_close(x_k.grad, x_ref.grad, **tol)
    if dtype == torch.float32:  # the backward is the inverse rotation (float32 tables: cos^2 + sin^2 = 1)
        back = rope.rope_rotate(rope.rope_rotate(x, cos, sin), cos, sin, True)
        torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)


def test_kernel_rejects_bad_input(interp):
    x = torch.randn(1, 4, 2, 8)
    cos, sin = rope_cos_sin(torch.arange(4)[None], 8, 1e4, torch.float32)
    with pytest.raises(ValueError, match="even Dh"):
        rope.rope_rotate(torch.randn(1, 4, 2, 7), cos, sin)
    with pytest.raises(ValueError, match="cos must be"):
        rope.rope_rotate(x, cos[:, :3], sin)
    with pytest.raises(ValueError, match="sin must be"):
        rope.rope_rotate(x, cos, sin.expand(2, 4, 8))


def test_switch_routes_parallel_forwards_only(interp, spy_on):
    calls = spy_on(rope, "rope_rotate")
    x, cos, sin = _case(1, 6, 2, 8, 1, torch.float32)
    assert rope.get_rope() == "auto"
    rope.apply_rope(x, cos, sin)
    assert calls == []  # auto: the kernel for CUDA tensors only, so not for this one even under the interpreter
    with rope.rope_mode("triton"):
        y = rope.apply_rope(x, cos, sin)
        rope.apply_rope(x[:, :1], cos[:, :1], sin[:, :1])  # one position: a decode step stays in torch
    assert calls == [(1, 6, 2, 8)]
    torch.testing.assert_close(y, rope.apply_rope_ref(x, cos, sin))
    with pytest.raises(ValueError, match="RoPE rotation .cuda. is invalid"):
        rope.set_rope("cuda")


def test_attention_layer_same_with_the_kernel(interp):
    """A Qwen3-style attention layer (GQA, qk-norm) trained one step: same output and gradients either way."""
    from hylo.config import HyloConfig
    from hylo.layers.attention import Attention

    torch.manual_seed(0)
    cfg = HyloConfig(vocab_size=64, hidden_size=32, layers=["attn"], attn_num_heads=4, attn_num_kv_heads=2,
                     attn_head_dim=8, attn_qk_norm=True)
    lay = Attention(cfg, 0)
    x = torch.randn(2, 9, 32)
    outs = []
    for mode in ("torch", "triton"):
        lay.zero_grad()
        xi = x.clone().requires_grad_()
        with rope.rope_mode(mode):
            y = lay(xi)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, lay.qkv_proj.weight.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_compiled_forward_traces_the_rotation_op(monkeypatch, dynamo_targets):
    """What torch.compile sees on a GPU, traced on the CPU without running: the op, once for q and once for k."""
    from hylo.ops import backend

    monkeypatch.setattr(backend, "triton_interpreting", lambda: True)

    def qk(q, k, pos):
        cos, sin = rope_cos_sin(pos, 8, 10000.0, q.dtype)
        return rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)

    with rope.rope_mode("triton"):
        targets = dynamo_targets(qk, torch.randn(1, 6, 4, 8), torch.randn(1, 6, 2, 8), torch.arange(6)[None])
    assert targets.count(torch.ops.hylo.rope_rotate.default) == 2
