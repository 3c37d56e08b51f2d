"""JetBlock's dynamic causal depthwise convolution: a short conv whose kernel changes with every token.

``x: [B, T, C]``, per-token kernels ``w: [B, T, C, K]`` (tap ``K-1`` multiplies the current token)::

    y_t[c] = sum_j w_t[c, j] * x_{t-K+1+j}[c]

Inputs before the sequence come from ``state: [B, C, K-1]`` (the previous ``K-1`` inputs, oldest first;
zeros when None), so a long sequence can be processed in pieces. No activation here: the layer applies it.

- :func:`dynamic_conv_ref`: vectorized PyTorch (unfold), the reference and the CPU path.
- :func:`dynamic_conv_triton`: Triton forward and backward (:class:`DynamicConvTriton`), used on CUDA.
- :func:`dynamic_conv`: the public entry, dispatching on :func:`hylo.ops.backend.use_fast`.
- :func:`dynamic_conv_step`: one decode token, updates the state in place.

All paths accumulate in float32 (the references in float64 for float64 inputs) and return ``y`` in ``x.dtype``.
"""

import functools
import os

import torch

from hylo.ops.backend import use_fast

try:
    import triton
    import triton.language as tl
except ImportError:  # CI / CPU-only installs: the reference serves
    triton = None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _new_state(x: torch.Tensor, state: torch.Tensor | None, K: int) -> torch.Tensor:
    """The last ``K-1`` inputs of ``state ++ x`` as ``[B, C, K-1]``."""
    B, T, C = x.shape
    if state is None:
        state = x.new_zeros(B, C, K - 1)
    xp = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, C, K-1+T]
    return xp[..., xp.shape[-1] - (K - 1):]


def dynamic_conv_ref(x: torch.Tensor, w: torch.Tensor, state: torch.Tensor | None = None):
    """Reference dynamic conv; returns ``(y [B, T, C], new_state [B, C, K-1])``. Differentiable."""
    B, T, C = x.shape
    K = w.shape[-1]
    if state is None:
        state = x.new_zeros(B, C, K - 1)
    xp = torch.cat([state.transpose(1, 2).to(x.dtype), x], dim=1)  # [B, K-1+T, C]
    win = xp.unfold(1, K, 1)  # [B, T, C, K]: win[b, t, c, j] = x_{t-K+1+j}[c]
    cd = _compute_dtype(x)
    y = (win.to(cd) * w.to(cd)).sum(-1).to(x.dtype)
    return y, xp[:, xp.shape[1] - (K - 1):].transpose(1, 2)


def dynamic_conv_step(x: torch.Tensor, w: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """One token ``x: [B, C]`` with kernel ``w: [B, C, K]``; updates ``state [B, C, K-1]`` in place.

    Returns ``y [B, C]``."""
    window = torch.cat([state, x.unsqueeze(-1).to(state.dtype)], dim=-1)  # [B, C, K]
    cd = _compute_dtype(x)
    y = (window.to(cd) * w.to(cd)).sum(-1)
    state.copy_(window[..., 1:])
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------- Triton
if triton is not None:

    def _dconv_fwd_kernel(x, w, s, y, T, C, K: tl.constexpr, HAS_STATE: tl.constexpr,
                          BT: tl.constexpr, BC: tl.constexpr):
        # grid: (B, cdiv(T, BT), cdiv(C, BC)); each program writes y[b, t-block, c-block]
        i_b = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1).to(tl.int64) * BT + tl.arange(0, BT)
        c = tl.program_id(2) * BC + tl.arange(0, BC)
        mt, mc = t < T, c < C
        acc = tl.full([BT, BC], 0.0, dtype=tl.float32)  # core op (tl.zeros is a jit helper)
        for j in tl.static_range(K):
            p = t - (K - 1) + j  # source position; p < 0 reads the state
            m = (mt & (p >= 0))[:, None] & mc[None, :]
            xv = tl.load(x + (i_b * T + p[:, None]) * C + c[None, :], mask=m, other=0.).to(tl.float32)
            if HAS_STATE:
                ms = (mt & (p < 0))[:, None] & mc[None, :]
                xv += tl.load(s + (i_b * C + c[None, :]) * (K - 1) + (p[:, None] + K - 1), mask=ms,
                              other=0.).to(tl.float32)
            mw = mt[:, None] & mc[None, :]
            wv = tl.load(w + ((i_b * T + t[:, None]) * C + c[None, :]) * K + j, mask=mw, other=0.)
            acc += xv * wv.to(tl.float32)
        tl.store(y + (i_b * T + t[:, None]) * C + c[None, :], acc.to(y.dtype.element_ty),
                 mask=mt[:, None] & mc[None, :])

    def _dconv_bwd_kernel(x, w, s, dy, dx, dw, T, C, K: tl.constexpr, HAS_STATE: tl.constexpr,
                          BT: tl.constexpr, BC: tl.constexpr):
        # dw[t, c, j] = dy[t, c] x_{t-K+1+j}[c];  dx[t, c] = sum_j w[t+K-1-j, c, j] dy[t+K-1-j, c]
        i_b = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1).to(tl.int64) * BT + tl.arange(0, BT)
        c = tl.program_id(2) * BC + tl.arange(0, BC)
        mt, mc = t < T, c < C
        mtc = mt[:, None] & mc[None, :]
        dyv = tl.load(dy + (i_b * T + t[:, None]) * C + c[None, :], mask=mtc, other=0.).to(tl.float32)
        accx = tl.full([BT, BC], 0.0, dtype=tl.float32)  # core op (tl.zeros is a jit helper)
        for j in tl.static_range(K):
            p = t - (K - 1) + j
            m = (mt & (p >= 0))[:, None] & mc[None, :]
            xv = tl.load(x + (i_b * T + p[:, None]) * C + c[None, :], mask=m, other=0.).to(tl.float32)
            if HAS_STATE:
                ms = (mt & (p < 0))[:, None] & mc[None, :]
                xv += tl.load(s + (i_b * C + c[None, :]) * (K - 1) + (p[:, None] + K - 1), mask=ms,
                              other=0.).to(tl.float32)
            tl.store(dw + ((i_b * T + t[:, None]) * C + c[None, :]) * K + j, (dyv * xv).to(dw.dtype.element_ty),
                     mask=mtc)
            u = t + (K - 1) - j  # the output that reads x_t through tap j
            mu = (mt & (u < T))[:, None] & mc[None, :]
            wu = tl.load(w + ((i_b * T + u[:, None]) * C + c[None, :]) * K + j, mask=mu, other=0.).to(tl.float32)
            dyu = tl.load(dy + (i_b * T + u[:, None]) * C + c[None, :], mask=mu, other=0.).to(tl.float32)
            accx += wu * dyu
        tl.store(dx + (i_b * T + t[:, None]) * C + c[None, :], accx.to(dx.dtype.element_ty), mask=mtc)


@functools.lru_cache(maxsize=None)
def _jit(interpret: bool):
    return triton.jit(_dconv_fwd_kernel), triton.jit(_dconv_bwd_kernel)


def _kernels():
    """The kernels, JIT-wrapped on first use and keyed on TRITON_INTERPRET (read by ``triton.jit`` when it
    wraps), so tests can set it and run them on CPU tensors whatever was imported before."""
    return _jit(os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"))


def _launch_args(x: torch.Tensor, BT: int = 64, BC: int = 64):
    B, T, C = x.shape
    BC = min(BC, triton.next_power_of_2(C))
    BT = min(BT, triton.next_power_of_2(max(T, 1)))
    return (B, triton.cdiv(T, BT), triton.cdiv(C, BC)), BT, BC


class DynamicConvTriton(torch.autograd.Function):
    """Triton dynamic conv; gradients for ``x``, ``w`` and the incoming ``state``."""

    @staticmethod
    def forward(ctx, x, w, state):
        x, w = x.contiguous(), w.contiguous()
        B, T, C = x.shape
        K = w.shape[-1]
        has_state = state is not None and K > 1
        s = state.to(x.dtype).contiguous() if has_state else x  # dummy pointer when unused
        fwd, _ = _kernels()
        y = torch.empty_like(x)
        grid, BT, BC = _launch_args(x)
        fwd[grid](x, w, s, y, T, C, K=K, HAS_STATE=has_state, BT=BT, BC=BC)
        ctx.save_for_backward(x, w, s if has_state else None)
        ctx.has_state, ctx.state_dtype = has_state, None if state is None else state.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, s = ctx.saved_tensors
        dy = dy.contiguous()
        B, T, C = x.shape
        K = w.shape[-1]
        _, bwd = _kernels()
        dx, dw = torch.empty_like(x), torch.empty_like(w)
        grid, BT, BC = _launch_args(x)
        bwd[grid](x, w, s if ctx.has_state else x, dy, dx, dw, T, C, K=K, HAS_STATE=ctx.has_state, BT=BT, BC=BC)
        ds = None
        if ctx.has_state and ctx.needs_input_grad[2]:
            # state slot i holds x_{i-K+1}; outputs t = i-j (0 <= t < T) read it through tap j
            ds = torch.zeros(B, C, K - 1, dtype=torch.float32, device=x.device)
            for i in range(K - 1):
                for j in range(max(0, i - T + 1), i + 1):
                    ds[:, :, i] += w[:, i - j, :, j].float() * dy[:, i - j].float()
            ds = ds.to(ctx.state_dtype)
        return dx, dw, ds


def dynamic_conv_triton(x: torch.Tensor, w: torch.Tensor, state: torch.Tensor | None = None):
    """Triton dynamic conv; returns ``(y, new_state)`` like :func:`dynamic_conv_ref`."""
    return DynamicConvTriton.apply(x, w, state), _new_state(x, state, w.shape[-1])


def dynamic_conv(x: torch.Tensor, w: torch.Tensor, state: torch.Tensor | None = None):
    """Dynamic causal depthwise conv; returns ``(y [B, T, C] in x.dtype, new_state [B, C, K-1])``.

    Triton on CUDA (when Triton imports), :func:`dynamic_conv_ref` otherwise.
    """
    if triton is not None and use_fast(x, needs_fla=False):
        return dynamic_conv_triton(x, w, state)
    return dynamic_conv_ref(x, w, state)
