"""Backward of fla's gated chunk kernels with hylo's own ``dqkwg`` step (fla issue #640).

fla 0.6.0 refuses the backward of ``chunk_gated_delta_rule`` (hylo's ``gdn`` and ``jet``) and of
``chunk_simple_gla`` (Mamba2's SSD core, see :mod:`hylo.ops.ssd`) on Hopper with Triton in [3.4, 3.7.1):
a Triton codegen bug makes one kernel, ``chunk_bwd_kernel_dqkwg``, wrong there -- it transposes a
``tl.dot`` result (``ds``, in the wgmma register layout) and feeds it to another ``tl.dot``. Every other
kernel of those backwards is fine. So this module runs fla's forward and fla's backward building blocks in
fla's order, and swaps in hylo's ``dqkwg``:

- :func:`dqkwg_torch`: vectorized PyTorch over chunks, float32 (float64 for float64 inputs); also the
  reference for the kernel.
- :func:`dqkwg_triton`: hylo's Triton kernel. It never transposes a ``tl.dot`` result: ``ds^T`` comes from
  its own ``tl.dot(v, do^T)`` (one more ``[BT, BT]`` product per chunk).

What ``dqkwg`` computes, per chunk of ``BT = 64`` positions (``G`` the chunk-local cumulative log decay,
fla passes it in log2 units ``g = G / ln 2``; ``h``/``dh`` the state entering / the gradient of the state
leaving the chunk, ``[K, V]``; ``v`` the values the chunk writes (the delta rule's ``v_new = u - w h``);
``dv`` their full gradient)::

    dq = scale * (e^G * do h^T + (do v^T o D) k)          D_ij = e^(G_i - G_j), i >= j, else 0
    dk = e^(G_last - G) * v dh^T + scale * (do v^T o D)^T q
    dw = -dv h^T                                          (delta rule only)
    dG = rowsum(dq o q) - rowsum(dk o k), plus e^G_last <h, dh> + sum(dk_inter o k) at the chunk's last row

``dG`` is per position; fla's reverse chunk-cumsum turns it into the gradient of the per-step gates.

:func:`chunk_gated_delta_rule` and :func:`chunk_simple_gla` are drop-in autograd ops (fla's keyword
names) built on that; :mod:`hylo.ops.delta_rule` and :mod:`hylo.ops.ssd` pick them where fla's own
backward is refused. The choice, for both, is ``HYLO_GATED_BWD`` (see :func:`gated_bwd_mode`).
The fla internals used are pinned to fla-core 0.6.0 (:func:`fla_internals` checks them and raises a clear
error, never a wrong gradient, when they moved).

Measured on H100 (Triton 3.6, bf16; benchmarks/gated_bwd.py, results in benchmarks/results/gated-bwd-h100.json):
gated delta rule at B=1, T=8192, H=16, K=128, V=256 takes 4.4 ms forward+backward (fla's own backward with its
guard lifted: 4.3 ms; the old recompute path: 100 ms); SSD at B=1, T=8192, H=64, N=128, P=64 4.1 ms (3.8 ms;
12.8 ms). Gradients match float64 autograd to the bf16 level (relative L2 <= 4.4e-3), as fla's own do.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os

import torch
import torch.nn.functional as F

from hylo.ops.backend import triton_interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only dqkwg_torch is available
    triton = None

CHUNK = 64  # fla's chunk size for both ops (the kernels' BT)
MODES = ("auto", "fla", "triton", "torch", "recompute")


def gated_bwd_mode() -> str:
    """The backward the gated chunk ops take on the fast path, from ``HYLO_GATED_BWD`` (default ``auto``).

    - ``auto``: fla's own backward where it runs (``fla_gated_backward_supported`` /
      ``fla_backward_supported``), else fla's building blocks with hylo's Triton ``dqkwg``;
    - ``fla``: always fla's own op (on a blocked Hopper setup fla raises, as it does by itself);
    - ``triton`` / ``torch``: fla's building blocks with hylo's ``dqkwg`` (Triton kernel / PyTorch), also
      where fla's own backward would run (for comparison);
    - ``recompute``: fla's forward and a backward that recomputes hylo's chunked PyTorch reference under
      autograd (the slow path before this module).
    """
    mode = os.environ.get("HYLO_GATED_BWD", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"HYLO_GATED_BWD={mode!r} is invalid: use one of {MODES}")
    return mode


# ----------------------------------------------------------------------------------------- dqkwg in PyTorch
def _chunks(x: torch.Tensor, n: int, pad: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T, H, D]`` -> ``[B, H, NT, BT, D]`` (zero-padded tail) in ``dtype``."""
    B, T, H, D = x.shape
    x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad))
    return x.view(B, n, (T + pad) // n, H, D).permute(0, 3, 1, 2, 4)


def _unchunk(x: torch.Tensor, T: int) -> torch.Tensor:
    """``[B, H, NT, BT, D]`` -> ``[B, T, H, D]``."""
    B, H, N, L, D = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, N * L, H, D)[:, :T]


def _check_shapes(q, k, v, do, h, dh, g, chunk_size):
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    NT = -(-T // chunk_size)
    if k.shape != q.shape or do.shape != v.shape or v.shape[:2] != (B, T) or HV % H:
        raise ValueError(f"dqkwg: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, do "
                         f"{tuple(do.shape)} do not fit [B, T, H, K] / [B, T, HV, V] with HV % H == 0")
    if h.shape != (B, NT, HV, K, V) or dh.shape != h.shape or g.shape != (B, T, HV):
        raise ValueError(f"dqkwg: h {tuple(h.shape)}, dh {tuple(dh.shape)}, g {tuple(g.shape)}; expected "
                         f"h, dh {(B, NT, HV, K, V)} (chunk {chunk_size}) and g {(B, T, HV)}")
    return B, T, H, K, HV, V, NT


def dqkwg_torch(q, k, v, do, h, dh, g, scale, w=None, dv=None, chunk_size: int = CHUNK):
    """fla's ``chunk_bwd_dqkwg`` (gated, ``[K, V]`` state layout) in PyTorch; see the module docstring.

    ``q, k [B, T, H, K]``, ``v, do, dv [B, T, HV, V]``, ``h, dh [B, NT, HV, K, V]``, ``g [B, T, HV]``
    (chunk-local cumsum of the log decay in log2 units, as fla stores it). Returns ``(dq, dk, dw, dg)``:
    ``dq, dk [B, T, H, K]`` in q's/k's dtype, ``dw`` in w's dtype (None without ``w``/``dv``), ``dg [B, T, HV]``
    float32 (per position, before the reverse cumsum).
    """
    B, T, H, K, HV, V, NT = _check_shapes(q, k, v, do, h, dh, g, chunk_size)
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    L = chunk_size
    pad = NT * L - T
    if HV != H:  # grouped values: q/k head i serves value heads i*HV/H ..; gradients summed back below
        q, k = q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)
    qc, kc = _chunks(q, NT, pad, cd), _chunks(k, NT, pad, cd)
    vc, doc = _chunks(v, NT, pad, cd), _chunks(do, NT, pad, cd)
    # the tail repeats the last gate, so the last chunk's "last row" value sits at index -1 as in full chunks
    gp = torch.cat([g, g[:, -1:].expand(B, pad, HV)], 1) if pad else g
    gc = gp.to(cd).view(B, NT, L, HV).permute(0, 3, 1, 2)  # [B, HV, NT, L]
    hc = h.to(cd).transpose(1, 2)  # [B, HV, NT, K, V]
    dhc = dh.to(cd).transpose(1, 2)
    g_last = gc[..., -1:]  # [B, HV, NT, 1]

    dq = (doc @ hc.transpose(-1, -2)) * (torch.exp2(gc) * scale)[..., None]
    dk = (vc @ dhc.transpose(-1, -2)) * torch.exp2(g_last - gc)[..., None]
    dg_last = (hc * dhc).sum((-2, -1)) * torch.exp2(g_last[..., 0]) + (dk * kc).sum((-2, -1))  # [B, HV, NT]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp2((gc[..., :, None] - gc[..., None, :]).masked_fill(~causal, float("-inf")))
    ds = (doc @ vc.transpose(-1, -2)) * decay * scale  # [B, HV, NT, L, L]
    dq = dq + ds @ kc
    dk = dk + ds.transpose(-1, -2) @ qc
    dg = (dq * qc).sum(-1) - (dk * kc).sum(-1)  # [B, HV, NT, L]
    dg = dg.permute(0, 2, 3, 1).reshape(B, NT * L, HV)
    last = (torch.arange(1, NT + 1, device=q.device) * L).clamp(max=T) - 1  # last valid row of each chunk
    dg = dg.index_add(1, last, dg_last.permute(0, 2, 1))[:, :T].float()

    dq, dk = _unchunk(dq, T), _unchunk(dk, T)
    if HV != H:
        dq, dk = dq.view(B, T, H, HV // H, K).sum(3), dk.view(B, T, H, HV // H, K).sum(3)
    dw = None
    if w is not None and dv is not None:
        dw = _unchunk(-(_chunks(dv, NT, pad, cd) @ hc.transpose(-1, -2)), T).to(w.dtype).contiguous()
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dw, dg.contiguous()


# ----------------------------------------------------------------------------------------- dqkwg in Triton
_interp_two_pass = False  # the variant the interpreter runs (it cannot autotune); tests cover both


if triton is not None:
    @triton.jit
    def _dqkwg_kernel(q, k, v, g, h, do, dh, dv, dq, dk, dw, dg, scale, B, T, NT,
                      H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, USE_DW: tl.constexpr,
                      TWO_PASS: tl.constexpr):
        # One program: chunk i_t of one (batch, value head), key columns i_k*BK ..; loops over value blocks.
        # ds = do v^T feeds dq; its transpose feeds dk. The transpose is never taken of a tl.dot result (the
        # pattern Triton 3.4-3.7.0 miscompiles on Hopper): ds^T = v do^T is its own product, accumulated in the
        # same value loop (TWO_PASS=False) or in a second loop once dq is stored (fewer live registers).
        i_kt, i_bh = tl.program_id(0), tl.program_id(1)
        i_k, i_t = i_kt % NK, i_kt // NK
        i_b, i_h = i_bh // HV, i_bh % HV
        i_hq = i_h // (HV // H)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        row = (i_b * T + o_t).to(tl.int64)  # global time index
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        h_off = ((i_b * NT + i_t) * HV + i_h).to(tl.int64) * K * V

        acc_ds = tl.zeros([BT, BT], dtype=tl.float32)   # ds[i, j] = do_i . v_j
        acc_dsT = tl.zeros([BT, BT], dtype=tl.float32)  # dsT[j, i] = v_j . do_i
        acc_dq = tl.zeros([BT, BK], dtype=tl.float32)
        acc_dk = tl.zeros([BT, BK], dtype=tl.float32)
        acc_dw = tl.zeros([BT, BK], dtype=tl.float32)
        hdh = tl.zeros([BK], dtype=tl.float32)  # <h, dh> per key column
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            m_tv = m_t[:, None] & m_v[None, :]
            p_tv = (row * HV + i_h)[:, None] * V + o_v[None, :]
            b_v = tl.load(v + p_tv, mask=m_tv, other=0.0)
            b_do = tl.load(do + p_tv, mask=m_tv, other=0.0)
            # h, dh are [K, V] row-major: read the [BV, BK] tiles of their transposes
            p_hT = h_off + o_k[None, :] * V + o_v[:, None]
            m_vk = m_v[:, None] & m_k[None, :]
            b_hT = tl.load(h + p_hT, mask=m_vk, other=0.0)
            b_dhT = tl.load(dh + p_hT, mask=m_vk, other=0.0)
            hdh += tl.sum(b_hT.to(tl.float32) * b_dhT.to(tl.float32), axis=0)
            acc_ds = tl.dot(b_do, tl.trans(b_v), acc_ds)
            if not TWO_PASS:
                acc_dsT = tl.dot(b_v, tl.trans(b_do), acc_dsT)
            acc_dq = tl.dot(b_do, b_hT.to(b_do.dtype), acc_dq)
            acc_dk = tl.dot(b_v, b_dhT.to(b_v.dtype), acc_dk)
            if USE_DW:
                b_dv = tl.load(dv + p_tv, mask=m_tv, other=0.0)
                acc_dw = tl.dot(b_dv.to(b_v.dtype), b_hT.to(b_v.dtype), acc_dw)

        p_out = (row * HV + i_h)[:, None] * K + o_k[None, :]
        if USE_DW:
            tl.store(dw + p_out, (-acc_dw).to(dw.dtype.element_ty), mask=m_tk)
        b_g = tl.load(g + row * HV + i_h, mask=m_t, other=0.0).to(tl.float32)
        t_last = tl.minimum(i_t * BT + BT, T) - 1
        g_last = tl.load(g + (i_b * T + t_last).to(tl.int64) * HV + i_h).to(tl.float32)
        p_qk = (row * H + i_hq)[:, None] * K + o_k[None, :]
        b_q = tl.load(q + p_qk, mask=m_tk, other=0.0)
        b_k = tl.load(k + p_qk, mask=m_tk, other=0.0)
        causal = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]

        # dq = scale (e^G do h^T + (ds o D) k), D_ij = e^(G_i - G_j) for i >= j
        b_dq = acc_dq * (tl.exp2(b_g) * scale)[:, None]
        b_ds = tl.where(causal, acc_ds * tl.exp2(tl.where(causal, b_g[:, None] - b_g[None, :], 0.0)), 0.0)
        b_dq = tl.dot((b_ds * scale).to(b_k.dtype), b_k, b_dq)
        tl.store(dq + p_out, b_dq.to(dq.dtype.element_ty), mask=m_tk)
        b_dg = tl.sum(b_dq * b_q.to(tl.float32), axis=1)

        # dk = e^(G_last - G) v dh^T + scale (ds o D)^T q
        b_dk = acc_dk * tl.where(m_t, tl.exp2(g_last - b_g), 0.0)[:, None]
        dg_last = tl.sum(hdh, axis=0) * tl.exp2(g_last) + tl.sum(tl.sum(b_dk * b_k.to(tl.float32), axis=1), axis=0)
        if TWO_PASS:
            for i_v in range(tl.cdiv(V, BV)):
                o_v = i_v * BV + tl.arange(0, BV)
                m_tv = m_t[:, None] & (o_v < V)[None, :]
                p_tv = (row * HV + i_h)[:, None] * V + o_v[None, :]
                b_v = tl.load(v + p_tv, mask=m_tv, other=0.0)
                b_do = tl.load(do + p_tv, mask=m_tv, other=0.0)
                acc_dsT = tl.dot(b_v, tl.trans(b_do), acc_dsT)
        causal_T = (o_t[None, :] >= o_t[:, None]) & m_t[:, None] & m_t[None, :]
        b_dsT = tl.where(causal_T, acc_dsT * tl.exp2(tl.where(causal_T, b_g[None, :] - b_g[:, None], 0.0)), 0.0)
        b_dk = tl.dot((b_dsT * scale).to(b_q.dtype), b_q, b_dk)
        tl.store(dk + p_out, b_dk.to(dk.dtype.element_ty), mask=m_tk)

        # dG = rowsum(dq o q) - rowsum(dk o k), plus the chunk-end terms at the last row
        b_dg = b_dg - tl.sum(b_dk * b_k.to(tl.float32), axis=1)
        b_dg = tl.where(o_t == t_last, b_dg + dg_last, b_dg)
        tl.store(dg + i_k.to(tl.int64) * B * T * HV + row * HV + i_h, b_dg, mask=m_t)

    _dqkwg_tuned = triton.autotune(
        configs=[triton.Config({"BV": bv, "TWO_PASS": tp}, num_warps=nw, num_stages=ns)
                 for bv, tp, nw, ns in ((64, False, 4, 2), (64, False, 8, 2), (64, True, 4, 2), (64, True, 8, 2),
                                        (32, False, 4, 2), (128, True, 8, 1))],
        key=["H", "HV", "K", "V", "BT", "BK", "USE_DW"],
    )(_dqkwg_kernel)


def dqkwg_triton(q, k, v, do, h, dh, g, scale, w=None, dv=None, chunk_size: int = CHUNK):
    """:func:`dqkwg_torch` as one Triton kernel (same arguments and results); inputs must share a device."""
    if triton is None:
        raise RuntimeError("dqkwg_triton needs Triton; use dqkwg_torch (HYLO_GATED_BWD=torch)")
    B, T, H, K, HV, V, NT = _check_shapes(q, k, v, do, h, dh, g, chunk_size)
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"dqkwg_triton: chunk_size must be 16, 32 or 64, got {chunk_size}")
    q, k, v, do, h, dh, g = (t.contiguous() for t in (q, k, v, do, h, dh, g))
    use_dw = w is not None and dv is not None
    BK = min(max(triton.next_power_of_2(K), 16), 128)
    NK = triton.cdiv(K, BK)
    dq = torch.empty(B, T, HV, K, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, T, HV, K, dtype=k.dtype, device=k.device)
    dg = torch.empty(NK, B, T, HV, dtype=torch.float32, device=q.device)
    dw = torch.empty(B, T, HV, K, dtype=w.dtype, device=w.device) if use_dw else dq
    dvc = dv.contiguous() if use_dw else v
    args = (q, k, v, g, h, do, dh, dvc, dq, dk, dw, dg, float(scale), B, T, NT)
    meta = dict(H=H, HV=HV, K=K, V=V, BT=chunk_size, BK=BK, NK=NK, USE_DW=use_dw)
    grid = (NK * NT, B * HV)
    with _device(q):
        if triton_interpreting():  # the interpreter cannot autotune (no driver); one fixed config
            _dqkwg_kernel[grid](*args, BV=min(max(triton.next_power_of_2(V), 16), 64),
                                TWO_PASS=_interp_two_pass, **meta)
        else:
            _dqkwg_tuned[grid](*args, **meta)
    if HV != H:
        dq, dk = dq.view(B, T, H, HV // H, K).sum(3), dk.view(B, T, H, HV // H, K).sum(3)
    return dq, dk, (dw if use_dw else None), (dg[0] if NK == 1 else dg.sum(0))


DQKWG = {"torch": dqkwg_torch, "triton": dqkwg_triton}


def _device(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------- fla internals
_NEEDED = {  # module -> {name: keyword parameters hylo passes (None: a constant)}
    "fla.ops.gated_delta_rule.chunk": {
        "chunk_gated_delta_rule_fwd": "q k v g beta scale initial_state output_final_state chunk_size"},
    "fla.ops.gated_delta_rule.wy_fast": {
        "recompute_w_u_fwd": "k v beta A g",
        "prepare_wy_repr_bwd": "k v beta A dw du g"},
    "fla.ops.common.chunk_delta_h": {
        "chunk_gated_delta_rule_fwd_h": "k w u g initial_state output_final_state chunk_size",
        "chunk_gated_delta_rule_bwd_dhu": "q k w g h0 dht do dv scale chunk_size"},
    "fla.ops.common.chunk_o": {
        "chunk_bwd_dv_local": "q k g do scale chunk_size",
        "chunk_bwd_dv": "q k g do dh scale chunk_size"},
    "fla.ops.common.chunk_h": {
        "chunk_fwd_h": "k v g h0 output_final_state chunk_size states_in_fp32",
        "chunk_bwd_dh": "q k v g do h0 dht scale chunk_size states_in_fp32"},
    "fla.ops.simple_gla.chunk": {
        "chunk_simple_gla_fwd": "q k v g scale initial_state output_final_state chunk_size"},
    "fla.ops.utils": {"chunk_local_cumsum": "g chunk_size reverse scale"},
    "fla.modules.norm.l2norm": {"l2norm_fwd": "x", "l2norm_bwd": "y rstd dy"},
    "fla.ops.utils.constant": {"RCP_LN2": None},  # 1/ln 2, fla's log2 scaling of the gate cumsum
}


@functools.lru_cache(maxsize=None)
def fla_internals() -> dict:
    """fla's building blocks used here, by name; raises RuntimeError when one is missing or changed.

    Pinned to fla-core 0.6.0: the backwards below replay fla's ``chunk_gated_delta_rule_bwd`` and
    ``chunk_simple_gla_bwd`` step by step, so a different fla may need a different replay.
    """
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    found, problems = {}, []
    try:
        have = version("fla-core")
    except PackageNotFoundError:  # fla from a source tree: only the checks below
        have = "?"
    if have != "?" and not have.startswith("0.6."):
        problems.append(f"fla-core is {have}, not 0.6.x")
    for mod_name, funcs in _NEEDED.items():
        try:
            mod = importlib.import_module(mod_name)
        except Exception as e:  # noqa: BLE001
            problems.append(f"import {mod_name}: {type(e).__name__}: {e}")
            continue
        for name, params in funcs.items():
            fn = getattr(mod, name, None)
            if fn is None:
                problems.append(f"{mod_name}.{name} is missing")
                continue
            found[name] = fn
            if params is None:  # a constant
                continue
            try:
                have = set(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                have = set(params.split())
            missing = set(params.split()) - have
            if missing:
                problems.append(f"{mod_name}.{name} lacks parameters {sorted(missing)}")
    if problems:
        raise RuntimeError(
            f"hylo's gated backward replays fla-core 0.6.0's internals, which this fla-core ({have}) does not "
            "have: " + "; ".join(problems)
            + ". Install fla-core==0.6.0, or set HYLO_GATED_BWD=recompute (slow) or =fla (fla's own backward).")
    return found


# ----------------------------------------------------------------------------------------- gated delta rule
class ChunkGatedDeltaRule(torch.autograd.Function):
    """fla's ``chunk_gated_delta_rule`` forward; fla's backward blocks with hylo's ``dqkwg``."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, dqkwg):
        fi = fla_internals()
        q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
        if initial_state is not None:
            initial_state = initial_state.contiguous()
        q_rstd = k_rstd = None
        with _device(q):
            if use_qk_l2norm:
                q, q_rstd = fi["l2norm_fwd"](q)
                k, k_rstd = fi["l2norm_fwd"](k)
            gc, o, A, final_state, _, _ = fi["chunk_gated_delta_rule_fwd"](
                q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, chunk_size=CHUNK)
        ctx.save_for_backward(q, q_rstd, k, k_rstd, v, gc, beta, A, initial_state)
        ctx.scale, ctx.use_qk_l2norm, ctx.dqkwg, ctx.g_dtype = scale, use_qk_l2norm, dqkwg, g.dtype
        return o.to(q.dtype), final_state

    @staticmethod
    def backward(ctx, do, dht):
        fi = fla_internals()
        q, q_rstd, k, k_rstd, v, gc, beta, A, h0 = ctx.saved_tensors
        scale = ctx.scale
        do = do.contiguous()
        dht = None if dht is None else dht.contiguous()
        with _device(q):
            # fla's chunk_gated_delta_rule_bwd, step by step, with hylo's dqkwg
            w, u = fi["recompute_w_u_fwd"](k=k, v=v, beta=beta, A=A, g=gc)
            h, v_new, _ = fi["chunk_gated_delta_rule_fwd_h"](k=k, w=w, u=u, g=gc, initial_state=h0,
                                                             output_final_state=False, chunk_size=CHUNK)
            dv = fi["chunk_bwd_dv_local"](q=q, k=k, g=gc, do=do, scale=scale, chunk_size=CHUNK)
            dh, dh0, dv = fi["chunk_gated_delta_rule_bwd_dhu"](q=q, k=k, w=w, g=gc, h0=h0, dht=dht, do=do, dv=dv,
                                                               scale=scale, chunk_size=CHUNK)
            dq, dk, dw, dg = DQKWG[ctx.dqkwg](q, k, v_new, do, h, dh, gc, scale, w=w, dv=dv, chunk_size=CHUNK)
            dk2, dv, db, dg2 = fi["prepare_wy_repr_bwd"](k=k, v=v, beta=beta, A=A, dw=dw, du=dv, g=gc)
            dk = dk + dk2
            dg = fi["chunk_local_cumsum"](dg + dg2, chunk_size=CHUNK, reverse=True)
            if ctx.use_qk_l2norm:
                dq = fi["l2norm_bwd"](q, q_rstd, dq)
                dk = fi["l2norm_bwd"](k, k_rstd, dk)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(ctx.g_dtype), db.to(beta.dtype), None,
                dh0, None, None, None)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, dqkwg: str = "triton"):
    """fla's ``chunk_gated_delta_rule`` (same keywords, ``[K, V]`` state, chunk 64) with hylo's ``dqkwg``
    (``"triton"`` or ``"torch"``) in its backward. Returns ``(o, final_state | None)``."""
    if dqkwg not in DQKWG:
        raise ValueError(f"dqkwg={dqkwg!r} is invalid: use one of {tuple(DQKWG)}")
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    return ChunkGatedDeltaRule.apply(q, k, v, g, beta, scale, initial_state, output_final_state,
                                     use_qk_l2norm_in_kernel, dqkwg)


# ----------------------------------------------------------------------------------------- simple GLA
class ChunkSimpleGLA(torch.autograd.Function):
    """fla's ``chunk_simple_gla`` forward (scalar gate per head); fla's backward blocks with hylo's ``dqkwg``."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, dqkwg):
        fi = fla_internals()
        q, k, v, g = (t.contiguous() for t in (q, k, v, g))
        if initial_state is not None:
            initial_state = initial_state.contiguous()
        with _device(q):
            gc = fi["chunk_local_cumsum"](g, chunk_size=CHUNK, scale=fi["RCP_LN2"])  # log2 units, as fla
            o, ht = fi["chunk_simple_gla_fwd"](q=q, k=k, v=v, g=gc, scale=scale, initial_state=initial_state,
                                               output_final_state=output_final_state, chunk_size=CHUNK)[:2]
        ctx.save_for_backward(q, k, v, gc, initial_state)
        ctx.scale, ctx.dqkwg, ctx.g_dtype = scale, dqkwg, g.dtype
        return o.to(q.dtype), ht

    @staticmethod
    def backward(ctx, do, dht):
        fi = fla_internals()
        q, k, v, gc, h0 = ctx.saved_tensors
        scale = ctx.scale
        do = do.contiguous()
        dht = None if dht is None else dht.contiguous()
        with _device(q):
            # fla's chunk_simple_gla_bwd, step by step, with hylo's dqkwg (states in float32, as fla's)
            h, _ = fi["chunk_fwd_h"](k=k, v=v, g=gc, h0=h0, output_final_state=False, chunk_size=CHUNK,
                                     states_in_fp32=True)
            dh, dh0 = fi["chunk_bwd_dh"](q=q, k=k, v=v, g=gc, do=do, h0=h0, dht=dht, scale=scale, chunk_size=CHUNK,
                                         states_in_fp32=True)
            dq, dk, _, dg = DQKWG[ctx.dqkwg](q, k, v, do, h, dh, gc, scale, chunk_size=CHUNK)
            dv = fi["chunk_bwd_dv"](q=q, k=k, g=gc, do=do, dh=dh, scale=scale, chunk_size=CHUNK)
            dg = fi["chunk_local_cumsum"](dg, chunk_size=CHUNK, reverse=True)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(ctx.g_dtype), None, dh0, None, None


def chunk_simple_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, dqkwg: str = "triton"):
    """fla's ``chunk_simple_gla`` with a per-step scalar gate ``g [B, T, H]`` (same keywords, chunk 64) and
    hylo's ``dqkwg`` (``"triton"`` or ``"torch"``) in its backward. Returns ``(o, final_state | None)``."""
    if dqkwg not in DQKWG:
        raise ValueError(f"dqkwg={dqkwg!r} is invalid: use one of {tuple(DQKWG)}")
    if g is None:
        raise ValueError("chunk_simple_gla here needs the gate g; fla's own op serves g=None")
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    return ChunkSimpleGLA.apply(q, k, v, g, scale, initial_state, output_final_state, dqkwg)


__all__ = ["gated_bwd_mode", "dqkwg_torch", "dqkwg_triton", "fla_internals", "chunk_gated_delta_rule",
           "chunk_simple_gla", "ChunkGatedDeltaRule", "ChunkSimpleGLA"]
