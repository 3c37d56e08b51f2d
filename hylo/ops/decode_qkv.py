"""The decode step between the q/k/v projection and attention, as one Triton kernel: split the projection into
heads, qk-norm, RoPE at each row's position, write k and v into the cache.

Why: in the compiled, graphed Qwen3-0.6B step inductor spends three kernels per layer on this (a norm+RoPE for q,
one for k with the cache write, one for v), 0.17 ms per token over 28 layers on an H100
(``benchmarks/results/qwen3-vs-transformers-h100-run6-partial.json``); ``hylo.engine.kernel_step`` needs it as
one kernel that it can launch with PDL (:mod:`hylo.ops.pdl`).

- :func:`decode_qkv_ref`: the model's own computation (``Attention._heads`` and the cache write of
  ``Attention.step_heads``), in plain ops.
- :func:`decode_qkv`: the kernel, one program per (row, head) of q, k and v. Roundings follow the model: RMSNorm
  in float32, cast, times the weight; RoPE's cos/sin from the same float32 angles (``position * inv_freq``, the
  frequencies passed in precomputed), cast to the dtype, each product and the sum rounded as bf16 ops would.
"""

from __future__ import annotations

import functools

import torch

from hylo.ops.backend import triton_interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only the reference
    triton = None


def decode_qkv_ref(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, q_norm: torch.Tensor | None,
                   k_norm: torch.Tensor | None, eps: float, inv_freq: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, pos: torch.Tensor, ring: bool) -> torch.Tensor:
    """``qkv [B, (H + 2 Hkv) Dh]`` -> q ``[B, H, 1, Dh]``; writes k, v into ``k_cache, v_cache [B, Hkv, cap, Dh]``
    at slot ``pos`` (``pos % cap`` with ``ring``, a sliding window's ring buffer)."""
    from hylo.layers.norm import rms_norm
    from hylo.ops.rope import apply_rope_ref

    B, Dh = qkv.shape[0], k_cache.shape[-1]
    H, Hkv = num_heads, num_kv_heads
    q, k, v = qkv.view(B, 1, H + 2 * Hkv, Dh).split([H, Hkv, Hkv], dim=2)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    freqs = pos.float()[:, None, None] * inv_freq  # [B, 1, Dh/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(qkv.dtype), emb.sin().to(qkv.dtype)
    q, k = apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin)
    slot = pos % k_cache.shape[2] if ring else pos
    rows = torch.arange(B, device=qkv.device)
    k_cache[rows, :, slot] = k[:, 0]
    v_cache[rows, :, slot] = v[:, 0]
    return q.transpose(1, 2)


if triton is not None:
    # Only core ops inside the kernel (tl.sum and friends are jit helpers the interpreter cannot call when
    # TRITON_INTERPRET is set after import; see hylo.ops.decode_attention).

    def _qkv_kernel(qkv, qw, kw, inv_freq, pos, q_out, kc, vc, eps, CAP, H: tl.constexpr, HKV: tl.constexpr,
                    HALF: tl.constexpr, QK_NORM: tl.constexpr, RING: tl.constexpr, PDL: tl.constexpr):
        # One program: head j of row b; j < H a query head, then Hkv key heads, then Hkv value heads.
        b, j = tl.program_id(0), tl.program_id(1)
        if PDL:  # everything here reads the projection the kernel before wrote
            tl.extra.cuda.gdc_wait()
        D = 2 * HALF
        dt = q_out.dtype.element_ty
        i = tl.arange(0, HALF)
        src = qkv + (b * (H + 2 * HKV) + j) * D
        r1 = tl.load(src + i)
        r2 = tl.load(src + HALF + i)
        x1, x2 = r1.to(tl.float32), r2.to(tl.float32)
        if QK_NORM:  # rms_norm: float32, cast, then times the weight (a product in the dtype)
            ss = tl.reduce(x1 * x1 + x2 * x2, 0, tl.standard._sum_combine)
            rstd = 1.0 / tl.sqrt((ss / D + eps).to(tl.float32))
            is_q = j < H
            w1 = tl.where(is_q, tl.load(qw + i), tl.load(kw + i)).to(dt).to(tl.float32)
            w2 = tl.where(is_q, tl.load(qw + HALF + i), tl.load(kw + HALF + i)).to(dt).to(tl.float32)
            x1 = (w1 * (x1 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            x2 = (w2 * (x2 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        p = tl.load(pos + b)
        f = p.to(tl.float32) * tl.load(inv_freq + i)
        c = tl.cos(f).to(dt).to(tl.float32)
        s = tl.sin(f).to(dt).to(tl.float32)
        # x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype
        y1 = ((x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32)).to(dt)
        y2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
        if RING:
            p = p % CAP
        if j < H:
            dst = q_out + (b * H + j) * D
            tl.store(dst + i, y1)
            tl.store(dst + HALF + i, y2)
        elif j < H + HKV:
            dst = kc + ((b * HKV + (j - H)) * CAP + p) * D
            tl.store(dst + i, y1)
            tl.store(dst + HALF + i, y2)
        else:
            dst = vc + ((b * HKV + (j - H - HKV)) * CAP + p) * D
            tl.store(dst + i, r1)
            tl.store(dst + HALF + i, r2)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()


@functools.lru_cache(maxsize=None)
def _jit(interpret: bool):
    return triton.jit(_qkv_kernel)


def decode_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, q_norm: torch.Tensor | None,
               k_norm: torch.Tensor | None, eps: float, inv_freq: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, pos: torch.Tensor, ring: bool, pdl: bool = False) -> torch.Tensor:
    """:func:`decode_qkv_ref` as one Triton kernel (CUDA, or the CPU under Triton's interpreter). ``pdl``: launched
    with programmatic dependent launch (:mod:`hylo.ops.pdl`; ignored under the interpreter)."""
    if triton is None:
        raise RuntimeError("hylo.ops.decode_qkv needs Triton")
    B, Hkv, cap, Dh = k_cache.shape
    H = num_heads
    if qkv.shape != (B, (H + 2 * Hkv) * Dh) or Hkv != num_kv_heads or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_qkv: qkv {tuple(qkv.shape)} and caches {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)} disagree with {H} query and {num_kv_heads} key/value heads")
    if Dh < 2 or Dh & (Dh - 1):
        raise ValueError(f"decode_qkv: head size must be a power of two, got {Dh}")
    if not (qkv.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("decode_qkv needs a contiguous projection and caches")
    if k_cache.dtype != qkv.dtype or inv_freq.dtype != torch.float32 or inv_freq.shape != (Dh // 2,):
        raise ValueError(f"decode_qkv: cache dtype {k_cache.dtype} must be the projection's ({qkv.dtype}) and "
                         f"inv_freq [{Dh // 2}] float32, got {tuple(inv_freq.shape)} {inv_freq.dtype}")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("decode_qkv: pass both q_norm and k_norm, or neither")
    interp = triton_interpreting()
    q = qkv.new_empty(B, H, 1, Dh)
    qw = qkv if q_norm is None else q_norm
    kw = qkv if k_norm is None else k_norm
    launch = {} if interp else {"num_warps": 1 if Dh <= 128 else 2, **({"launch_pdl": True} if pdl else {})}
    _jit(interp)[(B, H + 2 * Hkv)](qkv, qw, kw, inv_freq, pos, q, k_cache, v_cache, float(eps), cap, H=H, HKV=Hkv,
                                   HALF=Dh // 2, QK_NORM=q_norm is not None, RING=ring, PDL=pdl and not interp,
                                   **launch)
    return q
