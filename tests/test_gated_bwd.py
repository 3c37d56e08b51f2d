"""hylo's backward for fla's gated chunk kernels (hylo.ops.chunk_bwd): ``dqkwg`` in PyTorch against autograd of
its definition, and -- in a Triton-interpreter subprocess, when triton and fla are installed -- hylo's ``dqkwg``
kernel and fla's against it, and the whole gated delta rule / SSD backwards against float64 autograd of hylo's
chunked references."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hylo.ops import chunk_bwd
from hylo.ops.chunk_bwd import dqkwg_torch, gated_bwd_mode

ROOT = Path(__file__).resolve().parents[1]


def chunk_loss(q, k, v, w, G, h, dh, do, dv, scale, L=64):
    """What ``dqkwg`` differentiates, chunk by chunk (natural-log gates ``G``, chunk-local cumsums):
    ``<do, o> + <dh, state leaving the chunk> + <dv, -w h>`` with ``h``, ``v``, ``dv``, ``dh``, ``do`` fixed."""
    B, T, H, K = q.shape
    HV = v.shape[2]
    q, k = q.repeat_interleave(HV // H, 2), k.repeat_interleave(HV // H, 2)
    total = 0
    for n in range(h.shape[1]):
        s, e = n * L, min(n * L + L, T)
        qn, kn, vn, Gn = q[:, s:e], k[:, s:e], v[:, s:e], G[:, s:e]
        Gh = Gn.transpose(1, 2)  # [B, HV, l]
        tril = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        D = torch.exp((Gh[..., :, None] - Gh[..., None, :]).masked_fill(~tril, -math.inf))
        att = torch.einsum("bihk,bjhk->bhij", qn, kn) * D
        o = scale * (torch.exp(Gn)[..., None] * torch.einsum("bihk,bhkv->bihv", qn, h[:, n])
                     + torch.einsum("bhij,bjhv->bihv", att, vn))
        G_last = Gn[:, -1]
        h_next = torch.exp(G_last)[..., None, None] * h[:, n] + torch.einsum(
            "bjhk,bjhv->bhkv", kn * torch.exp(G_last[:, None] - Gn)[..., None], vn)
        total = total + (do[:, s:e] * o).sum() + (dh[:, n] * h_next).sum()
        if w is not None:
            total = total - (dv[:, s:e] * torch.einsum("bjhk,bhkv->bjhv", w[:, s:e], h[:, n])).sum()
    return total


@pytest.mark.parametrize("T,H,HV,with_w", [(100, 2, 2, True), (64, 2, 2, False), (130, 1, 2, True), (7, 2, 2, True)])
def test_dqkwg_torch_is_the_gradient_of_its_definition(T, H, HV, with_w):
    gen = torch.Generator().manual_seed(T)
    K, V, L = 8, 12, 64
    NT = -(-T // L)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v, do, dv = r(1, T, H, K), r(1, T, H, K) / 3, r(1, T, HV, V), r(1, T, HV, V), r(1, T, HV, V)
    w = r(1, T, HV, K) if with_w else None
    h, dh = r(1, NT, HV, K, V), r(1, NT, HV, K, V)
    gate = -torch.rand(1, NT * L, HV, generator=gen, dtype=torch.float64) * 0.3
    G = gate.view(1, NT, L, HV).cumsum(2).view(1, NT * L, HV)[:, :T]  # chunk-local cumsum, as fla keeps it
    leaves = [t.clone().requires_grad_() for t in (q, k, G) + ((w,) if with_w else ())]
    loss = chunk_loss(leaves[0], leaves[1], v, leaves[3] if with_w else None, leaves[2], h, dh, do, dv, 0.7)
    ref = torch.autograd.grad(loss, leaves)
    dq, dk, dw, dg = dqkwg_torch(q, k, v, do, h, dh, G / math.log(2), 0.7, w=w, dv=dv if with_w else None)
    assert dg.dtype == torch.float32 and dq.dtype == torch.float64 and dq.is_contiguous()
    torch.testing.assert_close(dq, ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dk, ref[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dg.double(), ref[2], rtol=1e-5, atol=1e-5)
    if with_w:
        torch.testing.assert_close(dw, ref[3], rtol=1e-10, atol=1e-10)
    else:
        assert dw is None


def test_dqkwg_shape_errors():
    q = torch.zeros(1, 70, 2, 8)
    v = torch.zeros(1, 70, 2, 4)
    with pytest.raises(ValueError, match="h, dh"):
        dqkwg_torch(q, q, v, v, torch.zeros(1, 1, 2, 8, 4), torch.zeros(1, 1, 2, 8, 4), torch.zeros(1, 70, 2), 1.0)


def test_mode_from_env(monkeypatch):
    monkeypatch.delenv("HYLO_GATED_BWD", raising=False)
    assert gated_bwd_mode() == "auto"
    monkeypatch.setenv("HYLO_GATED_BWD", " Torch ")
    assert gated_bwd_mode() == "torch"
    monkeypatch.setenv("HYLO_GATED_BWD", "fast")
    with pytest.raises(ValueError, match="HYLO_GATED_BWD='fast'.*recompute"):
        gated_bwd_mode()


def test_missing_fla_internals_raise_clearly(monkeypatch):
    monkeypatch.setattr(chunk_bwd, "_NEEDED", {"math": {"sqrt": "x", "no_such_fn": "x", "pi": None},
                                               "json": {"dumps": "obj not_a_param"}})
    with pytest.raises(RuntimeError, match=r"math.no_such_fn is missing.*lacks parameters \['not_a_param'\]"):
        chunk_bwd.fla_internals.__wrapped__()
    monkeypatch.setattr(chunk_bwd, "_NEEDED", {"math": {"sqrt": "x", "pi": None}})
    found = chunk_bwd.fla_internals.__wrapped__()
    assert found["pi"] == math.pi


def test_bad_dqkwg_name():
    x = torch.zeros(1, 4, 1, 16)
    with pytest.raises(ValueError, match="dqkwg='cuda'"):
        chunk_bwd.chunk_gated_delta_rule(x, x, x, x[..., 0], x[..., 0], dqkwg="cuda")


# ----------------------------------------------------------------------------------------- Triton interpreter
def test_interpreter_kernels_and_backwards():
    """One subprocess under TRITON_INTERPRET=1 (tests/interp_gated_bwd.py; one test, so xdist runs it once):

    - hylo's Triton dqkwg (both variants) and fla's own kernel agree with dqkwg_torch (so the replayed step
      is fla's);
    - fla's blocks + hylo's dqkwg (float32) vs float64 autograd of the chunked references, T = 100:
      gated delta rule (q, k through the in-kernel l2norm, v, beta, g, initial state, final-state gradient) and
      SSD through simple GLA (x, dt, A, B, C, initial state; with and without the final state).
    """
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("fla") is None:
        pytest.skip("needs triton and fla-core")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("HYLO_GATED_BWD", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "interp_gated_bwd.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])

    mine = {k: v for k, v in res.items() if k.startswith("dqkwg_") and "_triton_" in k}
    fla = {k: v for k, v in res.items() if k.startswith("dqkwg_") and "_fla_" in k}
    assert len(mine) == 14 and len(fla) == 7, res  # two cases x (dq, dk, dg [, dw]); two kernel variants
    assert max(mine.values()) < 1e-5, mine
    assert max(fla.values()) < 1e-5, fla

    gdn = {k: v for k, v in res.items() if k.startswith("gdn_")}
    assert set(gdn) == {f"gdn_d{n}" for n in "q k v beta g h0".split()}, res
    assert max(gdn.values()) < 1e-4, gdn

    ssd = {k: v for k, v in res.items() if k.startswith("ssd")}
    assert set(ssd) == ({f"ssd_final_d{n}" for n in "x dt A B C h0".split()}
                        | {f"ssd_d{n}" for n in "x dt A B C".split()}), res
    assert max(ssd.values()) < 1e-4, ssd
