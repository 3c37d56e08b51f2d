"""hylo.ops.decode_attention on the CPU: the split-KV Triton kernel under Triton's interpreter against the float32
reference (GQA groups, ragged positions, one and several splits, bf16), the ring-buffer claim that lets the
sliding-window step pass ``pos`` too, ``Attention.step`` with HYLO_DECODE_ATTN on = off, bad inputs, the split
rule, the op's fake kernel (opcheck) and the compiled step's trace (one hylo::decode_attention, no softmax)."""

import math

import pytest
import torch

import hylo.layers.attention as A
from hylo.ops import backend
from hylo import HyloConfig
from hylo.layers.attention import Attention, SlidingWindowAttention
from hylo.ops import decode_attention as DA

triton = pytest.importorskip("triton")
L = 37  # not a multiple of the interpreter's block (16)


@pytest.fixture
def spy(spy_on):
    """Shapes of the calls of the op (its callers look it up at each call); it still runs."""
    return spy_on(DA, "decode_attention")


def make(B, H, Hkv, Dh, dtype=torch.float32, cap=L, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g).to(dtype) for shape in [(B, H, 1, Dh)] + [(B, Hkv, cap, Dh)] * 2)
    return q, k, v


def mask_ref(q, k, v, pos):
    """The matmul path's own reference: attention_ref with the mask Attention.step builds."""
    valid = torch.arange(k.shape[2])[None, :] <= pos[:, None]
    return A.attention_ref(q, k, v, valid[:, None, None, :])


# ----------------------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("B,H,Hkv,Dh,splits", [
    (1, 2, 2, 32, 1), (3, 4, 2, 64, 1), (3, 8, 2, 32, 1),  # groups 1, 2, 4; one split
    (3, 8, 2, 64, 5), (3, 6, 2, 32, 5), (1, 4, 1, 32, 3),  # several splits (empty ones too); a group of 3 (padded)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(interp, monkeypatch, B, H, Hkv, Dh, splits, dtype):
    monkeypatch.setattr(DA, "MIN_SPLIT", L // splits)  # B * Hkv is small: the cache length bounds the splits
    assert DA.num_splits(L, B * Hkv) == splits
    q, k, v = make(B, H, Hkv, Dh, dtype, seed=B * H + Dh)
    pos = torch.tensor([0, L - 1, 20][:B]) if B == 3 else torch.tensor([L - 1 if splits > 1 else 0])
    out = DA.decode_attention(q, k, v, pos)
    ref = DA.decode_attention_ref(q, k, v, pos)
    assert out.dtype == dtype and out.shape == (B, H, 1, Dh)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:  # the same float32 math on the same bf16 inputs: one rounding of the output apart
        torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ref.float(), mask_ref(q, k, v, pos).float(), rtol=1e-2, atol=1e-2)
    if pos[0] == 0:  # one slot: the output is that slot's value for every query head of the group
        g = H // Hkv
        torch.testing.assert_close(out[0, :, 0].float(), v[0, :, 0].float().repeat_interleave(g, 0), rtol=1e-2,
                                   atol=1e-2)


def test_slots_past_pos_are_ignored(interp, monkeypatch):
    """Whatever the cache holds past pos (here NaN) never reaches the output, with one split or several."""
    q, k, v = make(2, 4, 2, 32)
    pos = torch.tensor([5, 30])
    ref = DA.decode_attention_ref(q, k, v, pos)
    for b, p in enumerate(pos.tolist()):
        k[b, :, p + 1:], v[b, :, p + 1:] = float("nan"), float("nan")
    for min_split in (L, 4):
        monkeypatch.setattr(DA, "MIN_SPLIT", min_split)
        torch.testing.assert_close(DA.decode_attention(q, k, v, pos), ref, rtol=1e-5, atol=1e-5)


def test_positions_past_the_cache_attend_to_every_slot(interp):
    """pos >= L (a ring buffer after it wrapped) reads all L slots, like pos = L - 1."""
    q, k, v = make(2, 4, 2, 16)
    out = DA.decode_attention(q, k, v, torch.tensor([L - 1, 5 * L + 3]))
    torch.testing.assert_close(out[1:], DA.decode_attention(q[1:], k[1:], v[1:], torch.tensor([L - 1])))
    torch.testing.assert_close(out, DA.decode_attention_ref(q, k, v, torch.tensor([L - 1, L - 1])), rtol=1e-5,
                               atol=1e-5)


def test_ring_buffer_mask_is_s_le_pos():
    """The sliding-window step's mask (slot s holds position pos - ((pos - s) mod R), valid if >= 0) is s <= pos
    for every pos, before and after the ring wraps: so the kernel can take pos for both kinds of layer."""
    for R in (1, 5, 8):
        s = torch.arange(R)
        pos = torch.arange(3 * R + 1)
        ring = (pos[:, None] - torch.remainder(pos[:, None] - s[None, :], R)) >= 0
        assert torch.equal(ring, s[None, :] <= pos[:, None]), R


def test_op_rejects_bad_input():
    q, k, v = make(2, 4, 2, 32)
    pos = torch.tensor([1, 2])
    cases = [
        ((q[:, :, :0], k, v, pos), r"q \[B, H, 1, Dh\]"),  # not one query
        ((q, k, v[:, :, :-1], pos), r"k, v \[B, Hkv, L, Dh\]"),
        ((q[:, :3], k, v, pos), "multiple of Hkv"),
        ((q[:1], k, v, pos[:1]), "disagree"),
        ((q[..., :24], k[..., :24].contiguous(), v[..., :24].contiguous(), pos), "power of two in 16..256"),
        ((q.repeat(1, 1, 1, 2)[..., :8], k[..., :8], v[..., :8], pos), "power of two"),
        ((q.half(), k, v, pos), "one dtype"),
        ((q.double(), k.double(), v.double(), pos), "one dtype"),
        ((q, k, v, pos.float()), "pos must be"),
        ((q, k, v, pos[:1]), "pos must be"),
        ((q, k.transpose(2, 3).contiguous().transpose(2, 3), v, pos), "contiguous"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            DA.decode_attention(*args)


def test_num_splits_rule():
    """The documented examples: long caches of one row fill the GPU; big batches and short caches do not split."""
    assert DA.num_splits(32768, 1 * 8) == 64 and DA.num_splits(512, 8) == 32 and DA.num_splits(80, 8) == 5
    assert DA.num_splits(4096, 4 * 8) == 17  # ceil(528 / 32)
    assert DA.num_splits(32768, 66 * 8) == 1 and DA.num_splits(31, 1) == 1 and DA.num_splits(32, 1) == 2


def test_switch():
    assert (DA._SWITCH.env, DA._SWITCH.choices, DA._SWITCH.value) == ("HYLO_DECODE_ATTN", ("off", "on"), "off")
    with pytest.raises(ValueError, match="invalid"):
        DA.set_decode_attn("auto")
    with DA.decode_attn_mode("on"):
        assert DA.get_decode_attn() == "on"
    assert DA.get_decode_attn() == "off"


def test_use_kernel(interp, monkeypatch):
    from hylo.ops.backend import backend

    q, k, _ = make(1, 4, 2, 16)
    assert not DA.use_kernel(q, k)  # off by default
    with DA.decode_attn_mode("on"):
        assert DA.use_kernel(q, k) and not DA.use_kernel(q, k.double())
        assert not DA.use_kernel(q.requires_grad_(), k) and DA.use_kernel(q.detach(), k)
        with backend("ref"):
            assert not DA.use_kernel(q.detach(), k)
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU tensor without the interpreter
        assert not DA.use_kernel(q.detach(), k) and not DA.supported(torch.device("cpu"))


def test_opcheck_schema(interp):
    """The op's registration: its schema holds (it mutates nothing, returns a fresh tensor)."""
    q, k, v = make(2, 4, 2, 16, cap=9)
    torch.library.opcheck(torch.ops.hylo.decode_attention.default, (q, k, v, torch.tensor([3, 8])),
                          test_utils="test_schema")


def test_fake_kernel(monkeypatch):
    """The op under fake tensors (what torch.compile propagates; opcheck's own fake test would launch the
    interpreter on fake tensors): shape and dtype of the output, and the input checks still raise."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(DA, "triton_interpreting", lambda: True)
    monkeypatch.setattr(backend, "triton_interpreting", lambda: True)  # supported(cpu), via triton_supported
    monkeypatch.setattr(DA, "kernels", lambda: (triton.jit(DA._split_kernel), triton.jit(DA._combine_kernel)))
    monkeypatch.setattr(DA, "MIN_SPLIT", 4)  # the split-and-combine launch too
    for splits in (1, 9):
        with FakeTensorMode() as mode:
            q, k, v = (mode.from_tensor(t) for t in make(3, 8, 2, 32, torch.bfloat16, cap=4 * splits))
            out = torch.ops.hylo.decode_attention(q, k, v, mode.from_tensor(torch.tensor([0, 1, 2])))
            assert DA.num_splits(k.shape[2], 6) == splits and out.shape == (3, 8, 1, 32)
            assert out.dtype == torch.bfloat16
            with pytest.raises(ValueError, match="pos must be"):
                torch.ops.hylo.decode_attention(q, k, v, mode.from_tensor(torch.tensor([0, 1])))


# ----------------------------------------------------------------------------------------- Attention.step
def layer(window=None, seed=0):
    torch.manual_seed(seed)
    cfg = HyloConfig(hidden_size=64, attn_num_heads=4, attn_num_kv_heads=2, layers="a", swa_window=window or 8,
                     attn_qk_norm=True)  # head size 16, groups of 2
    lay = (SlidingWindowAttention if window else Attention)(cfg, 0)
    for p in lay.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    return lay


@pytest.mark.parametrize("window", [None, 5])
def test_step_with_kernel_equals_without(interp, spy, window):
    """Rows at different positions step through the kernel (the ring buffer wraps for swa) with the outputs of the
    matmul path; the step does not build the mask then."""
    lay = layer(window)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1))
    outs = {}
    with torch.no_grad():
        for mode in ("off", "on"):
            st = lay.init_state(2, 12)
            with DA.decode_attn_mode(mode):
                outs[mode] = [lay.step(x[:, t:t + 1], st, torch.tensor([t, t + 3])) for t in range(9)]
    assert spy == [(2, 4, 1, 16)] * 9
    for a, b in zip(outs["on"], outs["off"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_step_traces_the_op(monkeypatch, dynamo_targets):
    """What torch.compile sees on a GPU, traced on the CPU (the interpreter cannot run inside a trace): pretend the
    kernel can run, capture dynamo's graph of a step without running it: the op, and no softmax or mask."""
    monkeypatch.setattr(DA, "triton_interpreting", lambda: True)
    monkeypatch.setattr(backend, "triton_interpreting", lambda: True)  # supported(cpu), via triton_supported
    monkeypatch.setattr(DA, "kernels", lambda: (triton.jit(DA._split_kernel), triton.jit(DA._combine_kernel)))
    lay = layer()
    st = lay.init_state(1, 8)
    with DA.decode_attn_mode("on"):
        targets = dynamo_targets(lambda x, pos: lay.step(x, st, pos), torch.randn(1, 1, 64), torch.tensor([3]))
    assert targets.count(torch.ops.hylo.decode_attention.default) == 1
    assert not any("softmax" in str(t) for t in targets)


def test_reference_scale_and_groups():
    """The reference itself: head h reads KV head h // g, scores scaled by 1/sqrt(Dh) (checked by hand)."""
    q, k, v = make(1, 4, 2, 16, cap=3)
    pos = torch.tensor([2])
    out = DA.decode_attention_ref(q, k, v, pos)
    for h in range(4):
        p = (k[0, h // 2] @ q[0, h, 0] / math.sqrt(16)).softmax(0)
        torch.testing.assert_close(out[0, h, 0], p @ v[0, h // 2], rtol=1e-5, atol=1e-6)
