"""The decode step between the q/k/v projection and attention: split the projection into heads, qk-norm, RoPE at
each row's position, write k and v into the cache.

:func:`decode_qkv_ref` is the model's own computation (``Attention._heads`` and the cache write of
``Attention.step_heads``) in plain ops, with RoPE's frequencies passed in precomputed
(:func:`hylo.ops.rope.inv_freq`): the reference of the fused kernel
:func:`hylo.ops.decode_attention.decode_qkv_attention`, which does this work in the attention kernel's prologue
(the kernel decode step, ``hylo.engine.kernel_step``). In the compiled, graphed Qwen3-0.6B step inductor spends
three kernels per layer on it, 0.17 ms per token over 28 layers on an H100
(``benchmarks/results/qwen3-vs-transformers-h100-run6-partial.json``).
"""

from __future__ import annotations

import torch


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

