"""Softmax attention: full causal (`attn`) and sliding-window (`swa`), GQA, RoPE, optional qk-norm / qkv bias.

Decode state:
- `attn`: ``k, v: [B, H_kv, max_len, Dh]``, written at each row's position.
- `swa`: a ring buffer ``k, v: [B, H_kv, R, Dh]`` with ``R = min(window, max_len)``; position ``p`` lives in
  slot ``p % R``. Keys are stored after RoPE, so the slot order does not matter to softmax.

Paths: the reference computes softmax(QKᵀ)V explicitly in float32 (CPU, tests). The fast path uses
``scaled_dot_product_attention`` (flash kernel for causal attention unless ``HYLO_SDPA`` picks another: see
:func:`causal_sdpa`; a lower-right causal bias when a prefill
continues a cache, so no per-length compilation) and flex attention with a sliding-window block mask for `swa`
prefill/training. The decode step's core is two grouped matrix products (:func:`decode_attention`), or with
``HYLO_DECODE_ATTN=on`` one split-KV Triton kernel that reads each row's cache only up to its position
(:mod:`hylo.ops.decode_attention`).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import HyloConfig
from ..ops import decode_attention as split_kv
from ..ops.backend import get_sdpa, use_fast
from ..ops.rope import apply_rope, rope_cos_sin
from .base import Layer, State, fuse_projection_keys
from .norm import RMSNorm


# ----------------------------------------------------------------------------- attention cores
def attention_ref(q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """Reference softmax attention in float32. ``q: [B,H,Tq,D]``, ``k,v: [B,Hkv,Tk,D]``, mask bool (True = keep)."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1).float()
    v = v.repeat_interleave(rep, dim=1).float()
    s = (q.float() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v).to(q.dtype)


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool mask ``[Tq, Tk]``: causal, and within ``window`` keys (the query itself included) when given."""
    d = q_pos[:, None] - k_pos[None, :]
    m = d >= 0
    if window is not None:
        m = m & (d < window)
    return m


FLEX_MIN_LEN = 128  # windowed self-attention shorter than this uses SDPA with an explicit mask, not flex


@functools.lru_cache(maxsize=32)
def _swa_block_mask(window: int, q_len: int, kv_len: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = kv_len - q_len

    def mask_mod(b, h, q_idx, kv_idx):
        d = q_idx + offset - kv_idx
        return (d >= 0) & (d < window)

    return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


_SDPA_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # HYLO_SDPA names
_SDPA_NATIVE_GQA = ("flash", "math")  # kernels that take fewer KV heads than query heads (enable_gqa)


def causal_sdpa(q, k, v) -> torch.Tensor:
    """Causal self-attention (``Tq = Tk``) through SDPA, in the kernel picked by ``HYLO_SDPA``
    (:func:`hylo.ops.backend.set_sdpa`), read at each call so a benchmark can switch it per run.

    ``auto`` lets PyTorch choose (FlashAttention-2 on an H100). A named kernel runs under
    ``torch.nn.attention.sdpa_kernel``, which raises if that kernel cannot take the inputs: the switch exists to
    measure one kernel against another (cuDNN attention is reported faster than FA2 on Hopper), so no silent
    fallback. cuDNN and the efficient kernel accept grouped K/V only in some torch versions, so for them K/V are
    expanded to the query heads first (a copy: the measured time includes it; none for MHA)."""
    name = get_sdpa()
    if name == "auto":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    g = q.shape[1] // k.shape[1]
    if g > 1 and name not in _SDPA_NATIVE_GQA:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    with sdpa_kernel(_SDPA_KERNELS[name]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def attention(q, k, v, window: int | None, q_offset: int) -> torch.Tensor:
    """Causal (optionally windowed) attention of ``Tq`` queries at positions ``q_offset + i`` over ``Tk`` keys at
    positions ``0..Tk-1`` (``Tk = q_offset + Tq``). Dispatches to the reference or the fast path."""
    Tq, Tk = q.shape[2], k.shape[2]
    if not use_fast(q, needs_fla=False):
        pos_q = torch.arange(q_offset, q_offset + Tq, device=q.device)
        return attention_ref(q, k, v, window_mask(pos_q, torch.arange(Tk, device=q.device), window))
    full_window = window is None or window >= Tk
    if full_window and Tq == Tk:
        return causal_sdpa(q, k, v)
    if full_window and Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    if full_window:  # cached prefill (meta tokens, chunks): the causal diagonal sits at the lower right
        from torch.nn.attention.bias import causal_lower_right

        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Tq, Tk), enable_gqa=True)
    if Tq != Tk or Tq < FLEX_MIN_LEN:
        # cached prefill of a windowed layer (compiled flex attention would recompile for every (Tq, Tk)), or a
        # short sequence (below one flex block nothing is skipped; and on H100, torch 2.11, inductor failed to
        # lower flex attention at Tq = Tk = 76 with NoValidChoicesError): an explicit mask; K/V expanded to the
        # query heads, so SDPA keeps a fused kernel with the mask
        pos_q = torch.arange(q_offset, q_offset + Tq, device=q.device)
        mask = window_mask(pos_q, torch.arange(Tk, device=q.device), window)
        g = q.shape[1] // k.shape[1]
        if g > 1:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # windowed self-attention (Tq = Tk) through compiled flex attention, right-padded to a power of two: the
    # compile and the block mask are per shape, and a prompt of a new length must not compile again (padding is
    # exact: a real query only sees keys at or before it, and the padded queries are dropped)
    T = 1 << (Tq - 1).bit_length()
    if T != Tq:
        pad = (0, 0, 0, T - Tq)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
    block_mask = _swa_block_mask(window, T, T, str(q.device))
    return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=True)[:, :, :Tq]


def decode_attention(q, k, v, mask) -> torch.Tensor:
    """One query per row over a static cache: ``q [B, H, 1, Dh]``, ``k, v [B, Hkv, L, Dh]``, ``mask [B, 1, 1, L]``.

    Two grouped matrix products that read K and V once, without expanding them to ``H`` heads (SDPA with a mask
    and GQA falls back to its math kernel, which copies the whole cache per step); softmax in float32.
    """
    B, H, _, Dh = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, Dh)  # query heads of a KV group are adjacent (as enable_gqa assumes)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(Dh))  # [B, Hkv, g, L]
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(p.to(v.dtype), v).reshape(B, H, 1, Dh)


# ----------------------------------------------------------------------------- the layer
class Attention(Layer):
    """Multi-head attention with GQA and RoPE; ``window`` makes it sliding-window attention (`swa`)."""

    def __init__(self, config: HyloConfig, layer_idx: int, window: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.attn_num_heads
        self.num_kv_heads = config.attn_num_kv_heads
        self.head_dim = config.attn_head_dim
        self.rope_theta = config.rope_theta
        self.window = window
        D, H, Hkv, Dh = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        # q, k and v as one matrix (rows: q, k, v): one matrix product; Llama/Qwen checkpoints' separate
        # q_proj/k_proj/v_proj load into it
        self.qkv_proj = nn.Linear(D, (H + 2 * Hkv) * Dh, bias=config.attn_qkv_bias)
        self._register_load_state_dict_pre_hook(
            lambda sd, prefix, *_: fuse_projection_keys(sd, prefix, ("q_proj", "k_proj", "v_proj"), "qkv_proj"))
        self.o_proj = nn.Linear(H * Dh, D, bias=config.attn_o_bias)
        self.qk_norm = config.attn_qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(Dh, config.norm_eps)
            self.k_norm = RMSNorm(Dh, config.norm_eps)

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """Project, qk-norm, rotate. ``positions: [T]`` or ``[B, T]``. Returns q, k, v as ``[B, H, T, Dh]``."""
        return self._heads(self.qkv_proj(x), positions)

    def _heads(self, qkv: torch.Tensor, positions: torch.Tensor):
        """Split the projection ``qkv [B, T, (H + 2 Hkv) Dh]`` into heads, qk-norm, rotate."""
        B, T, _ = qkv.shape
        H, Hkv, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
        q, k, v = q.view(B, T, H, Dh), k.view(B, T, Hkv, Dh), v.view(B, T, Hkv, Dh)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_cos_sin(positions if positions.dim() == 2 else positions[None], self.head_dim,
                                self.rope_theta, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    @staticmethod
    def _merge(o: torch.Tensor) -> torch.Tensor:
        B, H, T, Dh = o.shape
        return o.transpose(1, 2).reshape(B, T, H * Dh)

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self._merge(o))

    def forward(self, x: torch.Tensor, state: State | None = None, offset: int = 0) -> torch.Tensor:
        T = x.shape[1]
        q, k, v = self._qkv(x, torch.arange(offset, offset + T, device=x.device))
        if state is None:
            if offset:
                raise ValueError("attention forward with offset > 0 needs the state holding the earlier keys")
            return self._out(attention(q, k, v, self.window, 0))
        cap = state["k"].shape[2]
        if self.window is None:
            if offset + T > cap:
                raise ValueError(f"KV cache of layer {self.layer_idx} holds {cap} positions; "
                                 f"{offset}+{T} tokens do not fit (allocate a larger max_len)")
            state["k"][:, :, offset:offset + T] = k
            state["v"][:, :, offset:offset + T] = v
            o = attention(q, state["k"][:, :, :offset + T], state["v"][:, :, :offset + T], None, offset)
            return self._out(o)
        # sliding window: earlier keys come from the ring buffer (positions max(0, offset-R) .. offset-1)
        start = max(0, offset - cap)
        slots = torch.arange(start, offset, device=x.device) % cap
        k_all = torch.cat([state["k"][:, :, slots], k], dim=2)
        v_all = torch.cat([state["v"][:, :, slots], v], dim=2)
        o = attention(q, k_all, v_all, self.window, offset - start)
        keep = min(T, cap)
        new_slots = torch.arange(offset + T - keep, offset + T, device=x.device) % cap
        state["k"][:, :, new_slots] = k[:, :, T - keep:]
        state["v"][:, :, new_slots] = v[:, :, T - keep:]
        return self._out(o)

    def step(self, x: torch.Tensor, state: State, pos: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.step_heads(self.qkv_proj(x), state, pos))

    def step_heads(self, qkv: torch.Tensor, state: State, pos: torch.Tensor) -> torch.Tensor:
        """The decode step between the two projections: ``qkv [B, 1, (H + 2 Hkv) Dh]`` (``qkv_proj``'s output) ->
        the heads' output ``[B, 1, H Dh]`` (``o_proj``'s input), updating the cache. A fused decode step
        (``hylo.engine.fused``) computes the projections itself."""
        B = qkv.shape[0]
        q, k, v = self._heads(qkv, pos[:, None])  # [B, H, 1, Dh]
        cap = state["k"].shape[2]
        slot = pos % cap if self.window is not None else pos
        rows = torch.arange(B, device=qkv.device)
        # an indexed assignment (index_put_), not scatter_: torch.compile updates the cache in place only for
        # index_put_; a scatter_ compiles to copy cache -> scatter -> copy back, two copies of the cache per step
        state["k"][rows, :, slot] = k[:, :, 0]
        state["v"][rows, :, slot] = v[:, :, 0]
        if split_kv.use_kernel(q, state["k"]):  # HYLO_DECODE_ATTN=on: one Triton kernel, reading slots s <= pos
            # (for a ring buffer too: below pos < cap only slots 0..pos are written, then every slot is valid)
            return self._merge(split_kv.decode_attention(q, state["k"], state["v"], pos))
        s = torch.arange(cap, device=qkv.device)
        if self.window is None:
            valid = s[None, :] <= pos[:, None]
        else:  # position held by each slot, for the current pos: pos - ((pos - s) mod R)
            valid = (pos[:, None] - torch.remainder(pos[:, None] - s[None, :], cap)) >= 0
        mask = valid[:, None, None, :]  # [B, 1, 1, cap]
        if use_fast(qkv, needs_fla=False):
            o = decode_attention(q, state["k"], state["v"], mask)
        else:
            o = attention_ref(q, state["k"], state["v"], mask)
        return self._merge(o)

    def init_state(self, batch_size: int, max_len: int, device=None, dtype=None) -> State:
        cap = max_len if self.window is None else min(self.window, max_len)
        shape = (batch_size, self.num_kv_heads, cap, self.head_dim)
        return {"k": torch.zeros(shape, device=device, dtype=dtype), "v": torch.zeros(shape, device=device, dtype=dtype)}

    def copy_state(self, src: State, dst: State, length: int) -> None:
        """Copy a state holding ``length`` positions into a (larger, possibly batched) state."""
        if self.window is None:
            dst["k"][:, :, :length] = src["k"][:, :, :length]
            dst["v"][:, :, :length] = src["v"][:, :, :length]
            return
        rs, rd = src["k"].shape[2], dst["k"].shape[2]
        p = torch.arange(max(0, length - min(rs, rd)), length, device=dst["k"].device)
        dst["k"][:, :, p % rd] = src["k"][:, :, p % rs]
        dst["v"][:, :, p % rd] = src["v"][:, :, p % rs]


class SlidingWindowAttention(Attention):
    def __init__(self, config: HyloConfig, layer_idx: int):
        super().__init__(config, layer_idx, window=config.swa_window)
