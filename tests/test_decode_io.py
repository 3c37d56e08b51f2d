"""The kernel step's first and last kernels (hylo.ops.decode_io, HYLO_STEP_IO): the packed maximum against
torch.argmax, the LM head's GEMV with it, the embedding with the sums zeroed, the finish kernel, and the runner's
greedy tokens, under Triton's interpreter; the sm_90 code of the atomics and the PDL wait."""

import pytest
import torch

from hylo.engine import DecodeRunner, kernel_step
from hylo.ops import decode_attention as dattn
from hylo.ops import decode_io as dio
from hylo.ops import gemv as G

triton = pytest.importorskip("triton")


def test_packed_maximum_is_argmax_with_first_index_on_ties():
    """Packing orders (value, -index): the maximum of the packed values unpacks to torch.argmax's index (the first
    maximum), over negative values, signed zeros, infinities and ties."""
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 40, (1,), generator=g))
        v = torch.randint(-4, 4, (n,), generator=g).float() * (0.5 if trial % 2 else 1e-30)  # ties, tiny values
        v[torch.rand(n, generator=g) < 0.1] = float("-inf")
        if trial % 7 == 0:
            v = -v.abs() - 0.0  # all negative (or -0.0)
        packed = dio.pack_ref(v, torch.arange(n))
        assert int(dio.unpack_index_ref(packed.max())) == int(v.argmax())
    assert int(dio.pack_ref(torch.tensor([-0.0]), torch.tensor([0]))) < int(dio.pack_ref(torch.tensor([0.0]),
                                                                                       torch.tensor([0])))
    assert dio.EMPTY < int(dio.pack_ref(torch.tensor([float("-inf")]), torch.tensor([(1 << 32) - 1])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_gemv_argmax_matches_torch_argmax(interp, dtype):
    """The GEMV with ``argmax``: logits as without it, and each row's packed maximum unpacks to the argmax of the
    stored logits, also with the maximum tied across tiles (rows 3 and 70 of W equal) and when an earlier
    maximum is already in the slot (it stays where it is larger)."""
    g = torch.Generator().manual_seed(1)
    M, N, K = 3, 100, 24
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    w[70] = w[3] = 4 * w[5]  # the largest logit twice, in different tiles (interpreter tile: 32 rows)
    nw = (1 + 0.1 * torch.randn(K, generator=g)).to(dtype)
    best = torch.full((M,), dio.EMPTY, dtype=torch.long)
    y = G.gemv_direct(x, w, None, nw, 1e-6, argmax=best)
    torch.testing.assert_close(y, G.gemv_direct(x, w, None, nw, 1e-6, preload=False), rtol=0, atol=0)
    assert torch.equal(dio.unpack_index_ref(best), y.argmax(-1))
    assert 3 in y.argmax(-1).tolist()  # the tie mattered for some row
    big = dio.pack_ref(torch.full((M,), 1e30), torch.full((M,), 7))
    best2 = big.clone()
    G.gemv_direct(x, w, None, nw, 1e-6, argmax=best2)
    assert torch.equal(best2, big)
    with pytest.raises(ValueError, match="argmax must be int64"):
        G.gemv_direct(x, w, argmax=best.int())


def test_embed_rows_and_finish(interp):
    """embed_rows: the table's rows, the sums zeroed; finish: the greedy tokens unpacked, the slots emptied, the
    positions advanced."""
    g = torch.Generator().manual_seed(2)
    table = torch.randn(50, 40, generator=g).to(torch.bfloat16)
    tokens = torch.tensor([7, 0, 49])
    sums = torch.randn(4, 3, 40, generator=g)
    sums_ref = sums.clone()
    h = dio.embed_rows(tokens, table, sums)
    assert torch.equal(h, dio.embed_rows_ref(tokens, table, sums_ref)) and torch.equal(sums, sums_ref)
    assert not sums.any()
    assert torch.equal(dio.embed_rows(tokens[::2], table), table[tokens[::2]])  # a strided view of tokens
    with pytest.raises(ValueError, match="sums must be float32"):
        dio.embed_rows(tokens, table, torch.zeros(4, 2, 40))
    io = dio.new_io(3, "cpu")
    v = torch.tensor([0.5, -2.0, 3.0])
    io[0] = dio.pack_ref(v, torch.tensor([11, 0, 123456]))
    pos = torch.tensor([4, 9, 0])
    out = dio.finish(io, pos)
    assert out.tolist() == [11, 0, 123456] and io[1].tolist() == [11, 0, 123456]
    assert io[0].tolist() == [dio.EMPTY] * 3 and pos.tolist() == [5, 10, 1]


@pytest.mark.parametrize("io_mode", ["kernels", "torch"])
def test_runner_greedy_tokens_follow_the_logits(interp, monkeypatch, io_mode):
    """The kernel step with its own first and last kernels (or PyTorch's): logits and caches equal the usual
    step's (float32, meta tokens, rows at different positions, FFN sums on), ``step(greedy=True)`` gives the
    argmax of the same step's logits, and feeding it back decodes the usual step's greedy sequence."""
    from test_kernel_step import _attn_ffn_model

    monkeypatch.setattr(dattn, "MIN_SPLIT", 8)
    model = _attn_ffn_model("a f swa f")
    with G.gemv_mode("on"), dattn.decode_attn_mode("on"):
        with kernel_step.kernel_step_mode("off"):
            ref = DecodeRunner(model, 2, 40)
        with kernel_step.kernel_step_mode("on"), kernel_step.step_io_mode(io_mode), \
                kernel_step.step_ffn_split_mode("on"):
            runner = DecodeRunner(model, 2, 40)
        assert runner.kernel_step and (runner._io is not None) == (io_mode == "kernels")
        for r in (ref, runner):
            r.set_positions([0, 20])
        t_ref = t = torch.tensor([3, 5])
        for _ in range(6):
            lg_ref = ref.step(t_ref)
            t_ref = lg_ref.argmax(-1)
            runner_logits = runner.step(t)
            torch.testing.assert_close(runner_logits, lg_ref, rtol=1e-5, atol=1e-5)
            runner.set_positions([p - 1 for p in runner.positions()])  # the same step again, greedy this time
            t = runner.step(t, greedy=True)
            assert torch.equal(t, t_ref)
        assert runner.positions() == ref.positions()
        for st, st_ref in zip(runner.cache.states, ref.cache.states):
            for name in st:
                torch.testing.assert_close(st[name], st_ref[name], rtol=1e-5, atol=1e-5)


def test_decode_io_compiles_for_sm90():
    """The head GEMV's packed maximum is a 64-bit atomic max; the finish kernel waits on the head (PDL)."""
    pytest.importorskip("triton.backends.nvidia")
    from test_kernel_step import _ptx

    sig = {"x": "*bf16", "w": "*bf16", "b": "*bf16", "y": "*bf16", "nw": "*bf16", "r": "*bf16", "best": "*i64",
           "M": "i32", "N": "i32", "eps": "fp32", "pf_rows": "i32", "grid_cap": "i32"}
    ptx = _ptx(triton.jit(G._gemv_kernel), sig,
               dict(K=1024, XK=1024, HAS_BIAS=False, NORM=True, SWIGLU=False, RESIDUAL=False, ARGMAX=True, PDL=True,
                    INTERP=False, LINE=64, NL=16, BN=8, BK=1024))
    assert "max.s64" in ptx
    ptx = _ptx(dio._jit("finish", False), {"io": "*i64", "pos": "*i64", "B": "i32"},
               dict(BB=4, EMPTY_KEY=dio.EMPTY, PDL=True))
    assert "griddepcontrol.wait" in ptx
    ptx = _ptx(dio._jit("embed", False), {"tokens": "*i64", "table": "*bf16", "h": "*bf16", "sums": "*fp32",
                                          "D": "i32"}, dict(NS=27, BD=1024))
    assert "ld.global" in ptx
