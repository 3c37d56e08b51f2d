"""RoPE tables: the opaque op equals the inline computation, passes torch.library's checks, and is what a compiled
parallel forward calls (inductor cannot inline it into the q/k rotation), while a decode step stays inline."""

import operator

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
