"""The (gated) delta rule: the recurrent core of DeltaNet, Gated DeltaNet and JetBlock.

Per head, with fla's state layout ``S: [K, V]``, decay ``alpha_t = exp(g_t)`` (``g <= 0``; ``g = None``: plain
DeltaNet, ``alpha = 1``) and write strength ``beta_t`` in (0, 1)::

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t                         (scale defaults to K^-0.5)

Layouts: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``beta, g [B, T, H]``, state ``[B, H, K, V]`` float32 --
exactly fla's ``chunk_(gated_)delta_rule``, so states move between the two paths unchanged.
q/k L2 normalisation (``x / sqrt(sum x^2 + 1e-6)``, as fla's ``use_qk_l2norm_in_kernel``) is opt-in through
``use_qk_l2norm`` in :func:`delta_rule` and :func:`delta_rule_step`; the references take normalised q/k.

Implementations:

- :func:`delta_rule_naive`: token-by-token recurrence, the ground truth for tests.
- :func:`delta_rule_chunked`: chunked form (WY/UT transform, chunk 64) in PyTorch, exact up to rounding,
  differentiable; the CPU path and the recompute-backward of the fast path.
- :func:`delta_rule_step`: one decode token, updates the state in place (static shapes, CUDA-graph friendly).
- :func:`delta_rule`: public entry; fla's chunk kernels on CUDA, :func:`delta_rule_chunked` otherwise.

Chunked form. Within a chunk with local cumulative log decay ``G_i = g_1 + ... + g_i`` and start state
``S0``, the per-token updates ``d_i = beta_i (v_i - alpha_i S_{i-1}^T k_i)`` solve the unit lower-triangular
system ``(I + M) D = diag(beta) V - diag(beta e^G) K S0`` with ``M_ij = beta_i e^(G_i-G_j) k_i.k_j`` (j < i).
So ``D = U - W S0`` with ``[U | W] = (I + M)^-1 [diag(beta) V | diag(beta e^G) K]``; then
``O = scale (diag(e^G) Q S0 + (Q K^T o decay) D)`` and
``S_end = (e^G_L I - Kd^T W) S0 + Kd^T U`` (``Kd_j = e^(G_L-G_j) k_j``). Only that last line is sequential.

Fast path. fla 0.6.0 refuses the backward of ``chunk_gated_delta_rule`` on Hopper with Triton in
[3.4, 3.7.1) (fla issue #640; the check is in ``fla.ops.common.chunk_o.chunk_bwd_dqkwg``) while its forward
and ``chunk_delta_rule``'s backward work. :func:`fla_gated_backward_supported` mirrors fla's condition.
``HYLO_GATED_BWD`` (:func:`hylo.ops.chunk_bwd.gated_bwd_mode`) picks the gated backward when one is needed:

- ``auto`` (default): fla's own op where its backward runs; where fla refuses it,
  :func:`hylo.ops.chunk_bwd.chunk_gated_delta_rule` -- fla's forward and fla's backward kernels, in fla's
  order, with hylo's Triton kernel for the one step fla gets wrong (``dqkwg``);
- ``triton`` / ``torch``: that path everywhere, with hylo's ``dqkwg`` in Triton / in PyTorch;
- ``fla``: fla's own op everywhere (fla raises on the blocked setups);
- ``recompute``: :class:`FlaGatedDeltaRule`, fla's forward and a backward that recomputes
  :func:`delta_rule_chunked` in float32 under autograd (13-30x fla's forward on H100; kept for comparison).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from hylo.ops.backend import use_fast
from hylo.ops.chunk_bwd import chunk_gated_delta_rule, gated_bwd_mode


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim in float32 (fla's ``l2norm``), cast back to ``x.dtype``."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------- references
def delta_rule_naive(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False):
    """Token-by-token recurrence in float32 (float64 for float64 inputs).

    Returns ``(o [B, T, H, V] in q.dtype, final state [B, H, K, V] | None)``.
    """
    dtype, cd = q.dtype, _compute_dtype(q)
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    q, k, v, beta = q.to(cd), k.to(cd), v.to(cd), beta.to(cd)
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(cd)
    out = []
    for t in range(T):
        if g is not None:
            S = S * torch.exp(g[:, t].to(cd))[..., None, None]
        d = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S))
        S = S + k[:, t, :, :, None] * d[:, :, None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(out, 1) if out else v.new_zeros(B, 0, H, v.shape[-1])
    return o.to(dtype), (S if output_final_state else None)


def delta_rule_chunked(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False,
                       chunk_size: int = 64):
    """Chunked delta rule in PyTorch (see the module docstring), exact up to rounding; differentiable.

    Computes in float32 (float64 for float64 inputs). ``T`` need not divide ``chunk_size``: the tail is
    padded with ``beta = 0, g = 0, k = 0``, which neither decays nor writes the state.
    Returns ``(o [B, T, H, V] in q.dtype, final state [B, H, K, V] | None)``.
    """
    dtype, cd = q.dtype, _compute_dtype(q)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    L = min(chunk_size, max(T, 1))
    pad = (-T) % L
    N = (T + pad) // L
    g = beta.new_zeros(beta.shape) if g is None else g

    def chunks(t, d=None):  # [B, T, H(, d)] -> [B, H, N, L(, d)] in the compute dtype
        t = t.to(cd)
        if d is None:
            return F.pad(t, (0, 0, 0, pad)).view(B, N, L, H).permute(0, 3, 1, 2)
        return F.pad(t, (0, 0, 0, 0, 0, pad)).view(B, N, L, H, d).permute(0, 3, 1, 2, 4)

    q, k, v, beta, g = chunks(q, K), chunks(k, K), chunks(v, V), chunks(beta), chunks(g)
    G = g.cumsum(-1)  # [B, H, N, L] local cumulative log decay
    tril = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~tril, float("-inf")))  # e^(G_i-G_j), j <= i
    eG = torch.exp(G)[..., None]

    # intra-chunk: [U | W] = (I + M)^-1 [beta V | beta e^G K], M strictly lower
    M = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    rhs = torch.cat([beta[..., None] * v, beta[..., None] * eG * k], dim=-1)
    U, W = torch.linalg.solve_triangular(M, rhs, upper=False, unitriangular=True).split([V, K], dim=-1)

    # chunk transitions S_end = A S0 + Bc, then the only sequential part: the scan over chunks
    kd = k * torch.exp(G[..., -1:] - G)[..., None]  # decayed to the chunk end
    eye = torch.eye(K, dtype=cd, device=q.device)
    A = torch.exp(G[..., -1])[..., None, None] * eye - kd.transpose(-1, -2) @ W  # [B, H, N, K, K]
    Bc = kd.transpose(-1, -2) @ U  # [B, H, N, K, V]
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(cd)
    starts = []
    for n in range(N):
        starts.append(S)
        S = torch.matmul(A[:, :, n], S) + Bc[:, :, n]
    S0 = torch.stack(starts, dim=2)  # [B, H, N, K, V] state entering each chunk

    # outputs: O = scale ((e^G Q - QK W) S0 + QK U), QK = (Q K^T) o decay (diagonal included)
    qk = (q @ k.transpose(-1, -2)) * decay
    o = scale * ((eG * q - qk @ W) @ S0 + qk @ U)  # [B, H, N, L, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * L, H, V)[:, :T]
    return o.to(dtype), (S if output_final_state else None)


def delta_rule_step(q, k, v, beta, g, state, scale=None, use_qk_l2norm: bool = False):
    """One token: ``q, k [B, H, K]``, ``v [B, H, V]``, ``beta, g [B, H]`` (``g`` may be None).

    Updates ``state [B, H, K, V]`` in place (computing in its dtype) and returns ``o [B, H, V]`` in q.dtype.
    """
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sd = state.dtype
    qs, ks, vs, bs = q.to(sd), k.to(sd), v.to(sd), beta.to(sd)
    if g is not None:
        state.mul_(torch.exp(g.to(sd))[..., None, None])
    d = bs[..., None] * (vs - torch.einsum("bhk,bhkv->bhv", ks, state))
    state.add_(ks[..., :, None] * d[..., None, :])
    return (scale * torch.einsum("bhk,bhkv->bhv", qs, state)).to(q.dtype)


# ----------------------------------------------------------------------------------------- fla fast path
@functools.lru_cache(maxsize=None)
def _fla_gated_bwd_blocked() -> bool:
    """fla's own condition for refusing the gated ``chunk_bwd_dqkwg`` Triton kernel (issue #640)."""
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    return bool(IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)


def _fla_dispatch_disabled() -> bool:
    import fla.backends
    return bool(getattr(fla.backends, "_DISPATCH_DISABLED", os.environ.get("FLA_DISABLE_BACKEND_DISPATCH") == "1"))


def fla_gated_backward_supported(q, k, v, g, beta) -> bool:
    """Whether fla 0.6.0 can run the backward of ``chunk_gated_delta_rule`` for these inputs, mirroring fla.

    fla raises in ``chunk_bwd_dqkwg`` when ``g`` is given and ``IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and
    not TRITON_ABOVE_3_7_1`` -- unless backend dispatch (off under ``FLA_DISABLE_BACKEND_DISPATCH=1``) hands
    the call to another backend first: FlashQLA replaces the whole op (fwd and bwd) when ``flash_qla`` is
    installed, enabled and its verifier accepts the inputs (16-bit, K = V = 128, ...); TileLang replaces
    ``chunk_bwd_dqkwg`` when tilelang and nvcc are usable and it is enabled (its verifier needs
    ``h.dtype == q.dtype``, which holds here: the delta rule stores ``h`` in k's dtype).
    ``HYLO_DELTA_FLA_BWD=0/1`` overrides the detection.
    """
    forced = os.environ.get("HYLO_DELTA_FLA_BWD")
    if forced in ("0", "1"):
        return forced == "1"
    if not _fla_gated_bwd_blocked():
        return True
    if _fla_dispatch_disabled():
        return False
    try:
        from fla.ops.gated_delta_rule.backends.flash_qla import FlashQLABackend
        qla = FlashQLABackend()
        if qla.is_available() and qla.is_enabled() and qla.chunk_gated_delta_rule_verifier(q, k, v, g, beta)[0]:
            return True
    except Exception:
        pass
    try:
        from fla.ops.common.backends.tilelang import CommonTileLangBackend
        return bool(CommonTileLangBackend.is_available() and CommonTileLangBackend().is_enabled())
    except Exception:
        return False


def fla_forward(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False,
                use_qk_l2norm: bool = False):
    """fla's chunk kernels (gated or not); gates and beta passed by keyword. Returns ``(o, final state)``."""
    if g is None:
        from fla.ops.delta_rule import chunk_delta_rule
        return chunk_delta_rule(q=q, k=k, v=v, beta=beta, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    return chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                                  output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm)


class FlaGatedDeltaRule(torch.autograd.Function):
    """fla's forward, hylo's backward: recompute :func:`delta_rule_chunked` in float32 under autograd
    (``HYLO_GATED_BWD=recompute``; slow, kept for comparison).

    ``fwd(q, k, v, beta, g, scale, initial_state, output_final_state) -> (o, ht)`` is the fast forward
    (fla's kernel; tests pass the reference). The recompute costs one more (PyTorch) forward; gradients
    reach ``initial_state`` and flow from the final state.
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, scale, output_final_state, fwd):
        o, ht = fwd(q, k, v, beta, g, scale, initial_state, output_final_state)
        ctx.save_for_backward(q, k, v, beta, g, initial_state)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        inputs = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().float().requires_grad_(need)
                      for t, need in zip(inputs, ctx.needs_input_grad)]
            o, ht = delta_rule_chunked(*leaves[:5], scale=ctx.scale, initial_state=leaves[5],
                                       output_final_state=dht is not None)
            outs, grads_out = [o], [do]
            if dht is not None:
                outs.append(ht)
                grads_out.append(dht)
            wrt = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(outs, wrt, grads_out, allow_unused=True)) if wrt else iter(())
        out = []
        for t, leaf in zip(inputs, leaves):
            gr = next(grads) if leaf is not None and leaf.requires_grad else None
            out.append(None if gr is None else gr.to(t.dtype))
        return (*out, None, None, None)


def _fla_fwd_positional(q, k, v, beta, g, scale, initial_state, output_final_state):
    return fla_forward(q, k, v, beta, g, scale, initial_state, output_final_state)


def head_pad(n: int) -> int:
    """Zero channels to add to a key or value head of size ``n`` before fla's gated backward (0 unless ``n % 64``).

    Why: on an H100 (torch 2.11, Triton 3.6, fla 0.6.0) MQAR's ``gdn gdn`` at width 64 (key heads of 32
    channels, value heads of 64) died with an illegal memory access in its first training step, while ``gdn a``
    of the same layer shape had trained (``benchmarks/results/mqar-h100-w64``). Mamba2's SSD had the same fault at
    head size 32, located in fla's ``chunk_bwd_kernel_dv`` and cured by padding to 64 (:func:`hylo.ops.ssd.
    value_pad`); the gated delta rule goes through the same fla backward kernels, so its heads are padded the
    same way. The cause here is inferred, not confirmed. Padding is exact: zero query/key channels add nothing to
    any dot product (nor to an L2 norm) and leave their state rows at zero; zero value channels have zero state
    columns and outputs; the padded gradients are dropped. ``HYLO_PAD_HEADS=0`` turns it off."""
    if os.environ.get("HYLO_PAD_HEADS", "1") == "0":
        return 0
    return -n % 64


def _padded(fn, q, k, v, initial_state, pk: int, pv: int):
    """``fn(q, k, v, initial_state) -> (o, state)`` with ``pk`` zero key/query channels and ``pv`` zero value
    channels added, the padding cut from the results (see :func:`head_pad`)."""
    K, V = k.shape[-1], v.shape[-1]
    q, k, v = F.pad(q, (0, pk)), F.pad(k, (0, pk)), F.pad(v, (0, pv))
    if initial_state is not None:
        initial_state = F.pad(initial_state, (0, pv, 0, pk))
    o, state = fn(q, k, v, initial_state)
    return o[..., :V], (None if state is None else state[..., :K, :V])


def delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state: bool = False,
               use_qk_l2norm: bool = False):
    """The (gated) delta rule over a sequence; returns ``(o [B, T, H, V] in q.dtype, final state float32 | None)``.

    CUDA with fla: ``chunk_delta_rule`` (g None) or ``chunk_gated_delta_rule``; when a gated backward is
    needed, the path ``HYLO_GATED_BWD`` picks (module docstring; by default fla's own where it runs, else
    fla's kernels with hylo's ``dqkwg``). fla's ``chunk_delta_rule`` rejects float32, so float32 without
    gates takes the reference. Otherwise :func:`delta_rule_chunked`.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if initial_state is not None:
        initial_state = initial_state.float()
    fast = use_fast(q) and not (g is None and q.dtype == torch.float32)
    if fast:
        tensors = (q, k, v, beta) + tuple(t for t in (g, initial_state) if t is not None)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        pk, pv = (head_pad(k.shape[-1]), head_pad(v.shape[-1])) if g is not None and needs_grad else (0, 0)
        if pk or pv:  # narrow heads, a backward to come: run padded (head_pad); the call below then pads nothing
            return _padded(lambda q, k, v, s: delta_rule(q, k, v, beta, g, scale, s, output_final_state,
                                                         use_qk_l2norm), q, k, v, initial_state, pk, pv)
        mode = gated_bwd_mode() if g is not None and needs_grad else "fla"
        if mode == "fla" or (mode == "auto" and fla_gated_backward_supported(q, k, v, g, beta)):
            return fla_forward(q, k, v, beta, g, scale, initial_state, output_final_state, use_qk_l2norm)
        if mode != "recompute":
            return chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                          output_final_state=output_final_state,
                                          use_qk_l2norm_in_kernel=use_qk_l2norm,
                                          dqkwg="torch" if mode == "torch" else "triton")
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if fast:
        return FlaGatedDeltaRule.apply(q, k, v, beta, g, initial_state, scale, output_final_state,
                                       _fla_fwd_positional)
    return delta_rule_chunked(q, k, v, beta, g, scale, initial_state, output_final_state)
