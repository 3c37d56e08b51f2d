"""Mamba2's SSD (state space duality) core: a scalar-decay linear recurrence per head.

Per head, with ``a_t = dt_t * A`` (``A < 0``, ``dt > 0``, so ``exp(a_t)`` is in (0, 1))::

    h_t = exp(a_t) * h_{t-1} + dt_t * x_t ⊗ B_t        h: [P, N]
    y_t = h_t @ C_t                                    y: [P]

Layouts: ``x [B, T, H, P]``, ``dt [B, T, H]`` (already softplus'ed), ``A [H]``, ``B, C [B, T, G, N]`` with
``G`` groups shared by ``H // G`` consecutive heads (head ``h`` reads group ``h // (H // G)``, as in
mamba_ssm / HF Mamba2). The state is ``[B, H, P, N]`` float32 (HF Mamba2's ``ssm_states`` layout).
The skip term ``D * x`` is *not* part of the core: the layer adds it.

Implementations:

- :func:`ssd_naive`: token-by-token recurrence, the ground truth for tests.
- :func:`ssd_chunked`: chunked SSD in PyTorch (intra-chunk "attention" + inter-chunk state passing),
  differentiable by autograd; the CPU path and the recompute-backward of the fast path.
- :func:`ssd_step`: one decode token, updates the state in place (static shapes, CUDA-graph friendly).
- :func:`ssd`: the public entry, fla on CUDA (see below), :func:`ssd_chunked` otherwise.

Fast path. fla has no SSD kernel, but SSD is simple GLA with a per-head scalar log-decay:
``chunk_simple_gla(q=C, k=B, v=dt*x, g=dt*A, scale=1)``; fla's state is ``[B, H, K, V] = [B, H, N, P]``,
the transpose of ours. fla 0.6.0 refuses the *backward* of gated chunk kernels on Hopper with
Triton in [3.4, 3.7.1) (fla issue #640; the check is in ``fla.ops.common.chunk_o.chunk_bwd_dqkwg``),
while its forward is fine. :func:`fla_backward_supported` mirrors that check. ``HYLO_GATED_BWD``
(:func:`hylo.ops.chunk_bwd.gated_bwd_mode`) picks the backward when one is needed:

- ``auto`` (default): fla's own op where its backward runs; where fla refuses it,
  :func:`hylo.ops.chunk_bwd.chunk_simple_gla` -- fla's forward and fla's backward kernels, in fla's order,
  with hylo's Triton kernel for the one step fla gets wrong (``dqkwg``);
- ``triton`` / ``torch``: that path everywhere, with hylo's ``dqkwg`` in Triton / in PyTorch;
- ``fla``: fla's own op everywhere (fla raises on the blocked setups);
- ``recompute``: :class:`SSDFlaForward`, fla's forward and a backward that recomputes :func:`ssd_chunked`
  in float32 under autograd (optionally torch.compile'd: ``HYLO_SSD_COMPILE_BWD=1``), kept for comparison.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

from hylo.ops.backend import use_fast
from hylo.ops.chunk_bwd import chunk_simple_gla, gated_bwd_mode


def _heads(t: torch.Tensor, H: int) -> torch.Tensor:
    """Broadcast ``[B, T, G, N]`` groups to ``[B, T, H, N]`` heads (group g serves heads g*H/G .. (g+1)*H/G-1)."""
    G = t.shape[2]
    return t if G == H else t.repeat_interleave(H // G, dim=2)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------- references
def ssd_naive(x, dt, A, B, C, initial_state=None, output_final_state=False):
    """Token-by-token recurrence (float32, float64 for float64 inputs). Returns ``(y [B,T,H,P], state | None)``."""
    dtype, cd = x.dtype, _compute_dtype(x)
    b, T, H, P = x.shape
    x, dt, A = x.to(cd), dt.to(cd), A.to(cd)
    B, C = _heads(B, H).to(cd), _heads(C, H).to(cd)
    h = x.new_zeros(b, H, P, B.shape[-1]) if initial_state is None else initial_state.to(cd)
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)[..., None, None]  # [b, H, 1, 1]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, H, P)
    return y.to(dtype), (h if output_final_state else None)


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for ``i >= j``, ``-inf`` above the diagonal.

    Summed directly (not as a difference of cumsums) so it stays exact when the cumsum is large.
    """
    n = a.shape[-1]
    a = a[..., None, :].expand(*a.shape, n).transpose(-1, -2)  # [..., i, j] = a[i]
    strict = torch.ones(n, n, dtype=torch.bool, device=a.device).tril(-1)
    s = a.masked_fill(~strict, 0).cumsum(-2)  # [..., i, j] = sum_{j < k <= i} a[k]
    return s.masked_fill(~strict.logical_or(torch.eye(n, dtype=torch.bool, device=a.device)), float("-inf"))


def ssd_chunked(x, dt, A, B, C, chunk_size: int = 256, initial_state=None, output_final_state=False):
    """Chunked SSD in PyTorch, exact up to rounding; differentiable. Returns ``(y [B,T,H,P], state | None)``.

    Computes in float32 (float64 for float64 inputs); ``y`` comes back in ``x.dtype``. ``T`` need not
    divide ``chunk_size``: the tail is padded with ``dt = 0``, which neither decays nor writes the state.
    Within a chunk the decay between positions is ``exp(cs_i - cs_j)`` from the chunk-local cumsum
    ``cs`` of ``a = dt*A``; chunk states are combined with an exact segment sum over chunks.
    """
    dtype, cd = x.dtype, _compute_dtype(x)
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G  # heads per group
    L = min(chunk_size, max(T, 1))
    pad = (-T) % L
    x, dt, A, B, C = x.to(cd), dt.to(cd), A.to(cd), B.to(cd), C.to(cd)
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    nc = (T + pad) // L
    # chunks: c; position in chunk: l (target) / s (source); heads split as (g, r)
    x = x.view(b, nc, L, G, R, P)
    B, C = B.view(b, nc, L, G, N), C.view(b, nc, L, G, N)
    dt = dt.view(b, nc, L, G, R)
    a = dt * A.view(G, R)
    cs = a.cumsum(2)  # [b, c, l, g, r]
    xdt = x * dt[..., None]

    # 1) intra-chunk: y_l += sum_{s<=l} (C_l . B_s) exp(cs_l - cs_s) dt_s x_s
    cb = torch.einsum("bclgn,bcsgn->bcgls", C, B)
    cs_h = cs.permute(0, 1, 3, 4, 2)  # [b, c, g, r, l]
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    seg = (cs_h[..., :, None] - cs_h[..., None, :]).masked_fill(~causal, float("-inf"))
    w = cb[:, :, :, None] * torch.exp(seg)  # [b, c, g, r, l, s]
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", w, xdt)

    # 2) each chunk's contribution to its end state, from a zero start
    to_end = torch.exp(cs[:, :, -1:] - cs)  # [b, c, s, g, r]
    states = torch.einsum("bcsgn,bcsgr,bcsgrp->bcgrpn", B, to_end, xdt)

    # 3) pass states across chunks: S_c = exp(sum a over chunk c) S_{c-1} + states_c
    h0 = x.new_zeros(b, 1, G, R, P, N) if initial_state is None else initial_state.to(cd).reshape(b, 1, G, R, P, N)
    states = torch.cat([h0, states], dim=1)  # [b, c+1, g, r, p, n]
    chunk_decay = torch.exp(_segsum(F.pad(cs[:, :, -1].permute(0, 2, 3, 1), (1, 0))))  # [b, g, r, c+1, c+1]
    states = torch.einsum("bgrij,bjgrpn->bigrpn", chunk_decay, states)  # state at the end of chunk i-1

    # 4) inter-chunk: y_l += exp(cs_l) C_l . S_{c-1}
    y = y + torch.einsum("bclgn,bcgrpn,bclgr->bclgrp", C, states[:, :-1], torch.exp(cs))
    y = y.reshape(b, nc * L, H, P)[:, :T]
    final = states[:, -1].reshape(b, H, P, N) if output_final_state else None
    return y.to(dtype), final


def ssd_step(x, dt, A, B, C, state):
    """One token: ``x [B,H,P]``, ``dt [B,H]``, ``B, C [B,G,N]``; updates ``state [B,H,P,N]`` in place.

    Returns ``y [B,H,P]`` in ``x.dtype``; only static-shape tensor ops, so it can be CUDA-graph captured.
    """
    H = x.shape[1]
    B, C = _heads(B[:, None], H)[:, 0], _heads(C[:, None], H)[:, 0]
    sd = state.dtype
    dt = dt.to(sd)
    decay = torch.exp(dt * A.to(sd))[..., None, None]
    state.mul_(decay).add_((dt[..., None] * x.to(sd))[..., None] * B.to(sd)[:, :, None, :])
    return torch.einsum("bhpn,bhn->bhp", state, C.to(sd)).to(x.dtype)


# ----------------------------------------------------------------------------------------- fla fast path
def value_pad(P: int) -> int:
    """Value columns to add to a head of size ``P`` before fla's kernels (0 unless ``P % 64``).

    On an H100 (torch 2.11, Triton 3.6, fla 0.6.0) MQAR's Mamba2 at head size 32 (state 64) died with an illegal
    memory access in its first backward, while head size 64 had always worked. fla's own fix for a Hopper
    miscompile of masked loads in its state backward (``chunk_bwd_kernel_dh``, fla PR 1262) covers only the
    specialised ``scale=1``, and a head narrower than the 64-wide value tiles its autotuner tries is a masked
    load. Padding the value (x) to a multiple of 64 with zero columns keeps every tile whole and changes nothing
    else: a zero value column has a zero state column and output, and its gradient is discarded. The cause is
    inferred, not confirmed (``benchmarks/ssd_bwd_check.py`` runs both); ``HYLO_SSD_PAD_V=0`` turns padding off.
    Forward-only calls (decoding, evaluation) are not padded: the forward kernels have run at head size 32.
    """
    if os.environ.get("HYLO_SSD_PAD_V", "1") == "0":
        return 0
    return -P % 64


def fla_forward(x, dt, A, B, C, initial_state=None, output_final_state=False, impl=None, pad_value=False):
    """SSD through fla's ``chunk_simple_gla`` (``impl`` replaces it in tests); our state layout in and out.
    ``pad_value``: heads whose size is not a multiple of 64 run with zero value columns added (:func:`value_pad`;
    for calls whose backward will run fla's state backward, the kernel suspected of faulting)."""
    if impl is None:
        from fla.ops.simple_gla import chunk_simple_gla as impl
    H, P = x.shape[2], x.shape[3]
    g = dt.float() * A.float()  # per-step log decay
    v = (x.float() * dt.float()[..., None]).to(x.dtype)
    q, k = _heads(C, H).to(x.dtype), _heads(B, H).to(x.dtype)
    h0 = None if initial_state is None else initial_state.float().transpose(-1, -2)  # fla's [.., N, P]
    pad = value_pad(P) if pad_value else 0
    if pad:
        v = F.pad(v, (0, pad))
        h0 = None if h0 is None else F.pad(h0, (0, pad))
    h0 = None if h0 is None else h0.contiguous()
    y, ht = impl(q=q, k=k, v=v, g=g, scale=1.0, initial_state=h0, output_final_state=output_final_state)
    if pad:
        y, ht = y[..., :P], (None if ht is None else ht[..., :P])
    return y.to(x.dtype), (ht.transpose(-1, -2) if ht is not None else None)


@functools.lru_cache(maxsize=None)
def fla_backward_supported(float32: bool = False) -> bool:
    """Whether fla 0.6.0 runs the backward of ``chunk_simple_gla`` here, mirroring its own check.

    fla raises in ``chunk_bwd_dqkwg`` when ``g`` is given and ``IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and
    not TRITON_ABOVE_3_7_1`` -- unless its TileLang backend takes the call first, which it does only when
    tilelang (and nvcc) is usable and enabled, backend dispatch is on, and ``h`` has q's dtype: simple GLA
    keeps ``h`` in float32, so only float32 inputs qualify. ``HYLO_SSD_FLA_BWD=0/1`` overrides.
    """
    forced = os.environ.get("HYLO_SSD_FLA_BWD")
    if forced in ("0", "1"):
        return forced == "1"
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    if not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1):
        return True
    if not float32 or os.environ.get("FLA_DISABLE_BACKEND_DISPATCH") == "1":
        return False
    try:
        from fla.ops.common.backends.tilelang import CommonTileLangBackend
        return CommonTileLangBackend.is_available() and CommonTileLangBackend().is_enabled()
    except Exception:
        return False


BWD_CHUNK = 128  # recompute chunk of SSDFlaForward: fastest measured on H100 (eager and compiled)
_compile_failed = False


@functools.lru_cache(maxsize=1)
def _compiled_chunked():
    return torch.compile(ssd_chunked, dynamic=False)


def _chunked_grads(fn, leaves, dy, dht, chunk_size):
    """Gradients of ``(y, ht)`` w.r.t. the leaves that require grad, by autograd through ``fn``."""
    with torch.enable_grad():
        y, ht = fn(*leaves[:5], chunk_size=chunk_size, initial_state=leaves[5], output_final_state=dht is not None)
        outs, grads_out = ([y, ht], [dy, dht]) if dht is not None else ([y], [dy])
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        return torch.autograd.grad(outs, wrt, grads_out, allow_unused=True) if wrt else ()


class SSDFlaForward(torch.autograd.Function):
    """fla's forward, hylo's backward: recompute :func:`ssd_chunked` in float32 under autograd
    (``HYLO_GATED_BWD=recompute``; slow, kept for comparison).

    The recompute costs one more forward and keeps ``[chunk, chunk]`` decay matrices per head alive
    during the backward. ``HYLO_SSD_COMPILE_BWD=1`` torch.compiles it (about 2x faster on H100; the first
    call per shape compiles for seconds; inductor has crashed on some chunk sizes, so any failure warns
    once and falls back to eager).
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, initial_state, output_final_state, bwd_chunk_size, fwd):
        y, ht = fwd(x, dt, A, B, C, initial_state, output_final_state)
        ctx.save_for_backward(x, dt, A, B, C, initial_state)
        ctx.bwd_chunk_size = bwd_chunk_size
        return y, ht

    @staticmethod
    def backward(ctx, dy, dht):
        global _compile_failed
        inputs = ctx.saved_tensors
        leaves = [None if t is None else t.detach().float().requires_grad_(need)
                  for t, need in zip(inputs, ctx.needs_input_grad)]
        grads = None
        if os.environ.get("HYLO_SSD_COMPILE_BWD") == "1" and not _compile_failed:
            try:
                grads = _chunked_grads(_compiled_chunked(), leaves, dy, dht, ctx.bwd_chunk_size)
            except Exception as e:  # autograd.grad has no side effects: safe to redo eagerly
                _compile_failed = True
                warnings.warn(f"hylo: compiled SSD backward failed, using eager ({type(e).__name__}: {e})")
        if grads is None:
            grads = _chunked_grads(ssd_chunked, leaves, dy, dht, ctx.bwd_chunk_size)
        grads = iter(grads)
        out = [None if leaf is None or not leaf.requires_grad else next(grads) for leaf in leaves]
        out = [None if g is None else g.to(t.dtype) for g, t in zip(out, inputs)]
        return (*out, None, None, None)


def ssd(x, dt, A, B, C, chunk_size: int = 256, initial_state=None, output_final_state: bool = False):
    """SSD over a sequence; returns ``(y [B,T,H,P] in x.dtype, final state [B,H,P,N] float32 | None)``.

    CUDA with fla: fla's chunk kernel (its own chunk size, 64); when a backward is needed, the path
    ``HYLO_GATED_BWD`` picks (module docstring; by default fla's own where it runs, else fla's kernels with
    hylo's ``dqkwg``; ``recompute``: :class:`SSDFlaForward` with chunk ``BWD_CHUNK``). Otherwise
    :func:`ssd_chunked` with ``chunk_size``; the chunk size changes only rounding, never the result.
    """
    if not use_fast(x):
        return ssd_chunked(x, dt, A, B, C, chunk_size, initial_state, output_final_state)
    tensors = (x, dt, A, B, C) + (() if initial_state is None else (initial_state,))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    mode = gated_bwd_mode() if needs_grad else "fla"
    if mode == "fla" or (mode == "auto" and fla_backward_supported(x.dtype == torch.float32)):
        return fla_forward(x, dt, A, B, C, initial_state, output_final_state, pad_value=needs_grad)
    if mode == "recompute":
        return SSDFlaForward.apply(x, dt, A, B, C, initial_state, output_final_state, BWD_CHUNK, fla_forward)
    impl = functools.partial(chunk_simple_gla, dqkwg="torch" if mode == "torch" else "triton")
    return fla_forward(x, dt, A, B, C, initial_state, output_final_state, impl=impl, pad_value=True)
