"""Rotary position embedding (RoPE): the cos/sin tables and the rotation (rotate-half convention, as Llama/Qwen).

Why the tables are a custom op: under ``torch.compile`` inductor inlines their computation (``theta ** (2i/Dh)``,
``cos``, ``sin``) into the kernels that rotate q and k, so that math runs once per element of q and k (every head,
and again in the backward) instead of once per (position, frequency). In an H100 training step of a 125M attention
model at sequence 2048 those kernels took 17 of the step's 79 ms of kernel time
(``benchmarks/results/train-throughput-sdpa-h100.json``; after: ``train-throughput-rope-h100.json``). Behind
``hylo::rope_table`` the tables are computed once per call and the rotation only reads them. A decode step (one
position per row) keeps the inline form: there the tables are tiny, and an opaque op would add its own kernels to
every layer of the graphed step.

The rotation has two paths, chosen by ``HYLO_ROPE`` (:func:`set_rope`, :func:`rope_mode`):
- ``torch``: :func:`apply_rope_ref`, plain tensor ops that inductor fuses with their neighbours. With the tables
  fixed, an H100 profile of the same step shows the rotation's backward, fused with the gradient's concatenation
  into the q/k/v projection, at 7.2 ms per step for 12 layers: about six times its memory traffic.
- ``triton``: :func:`rope_rotate`, one Triton kernel per direction (the op ``hylo::rope_rotate`` with its backward
  registered, so torch.compile keeps it whole), for a parallel forward (more than one position) on CUDA, or on
  the CPU under Triton's interpreter (tests).
- ``auto`` (default): ``triton`` for CUDA tensors where Triton imports, ``torch`` otherwise. In the same H100
  run (``benchmarks/results/train-throughput-rope-triton-h100.json``) the kernel took the step's kernel time
  from 69.3 to 62.8 ms and the 125M attention model from 435,780 to 464,289 tokens/s (36.0 -> 38.3% MFU).
"""

from __future__ import annotations

import functools

import torch

from hylo.ops.backend import Choice, triton_interpreting, triton_supported

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the rotation is always apply_rope_ref
    triton = None

_ROPE = Choice("RoPE rotation", "HYLO_ROPE", ("auto", "torch", "triton"), "auto")
set_rope, get_rope, rope_mode = _ROPE.set, _ROPE.get, _ROPE.use


def inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """RoPE's frequencies ``theta ** (-2i / head_dim)``, ``[head_dim // 2]`` float32 (the decode kernels take them
    precomputed, so their angles ``position * inv_freq`` round exactly as the model's)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def _tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[..., head_dim]`` in float32 for ``positions`` (any shape)."""
    freqs = positions.float().unsqueeze(-1) * inv_freq(head_dim, theta, positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


@torch.library.custom_op("hylo::rope_table", mutates_args=())
def rope_table(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_tables` as an op that inductor cannot inline into its consumers."""
    return _tables(positions, head_dim, theta)


@rope_table.register_fake
def _(positions, head_dim, theta):
    shape = (*positions.shape, head_dim)
    return positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin for ``positions`` (any shape), computed in float32 and cast to ``dtype``. Returns ``[..., head_dim]``.

    More than one position in the last dimension (a parallel forward) goes through :func:`rope_table`; one
    (a decode step) is computed inline.
    """
    if positions.shape[-1] > 1:
        cos, sin = rope_table(positions, head_dim, float(theta))
    else:
        cos, sin = _tables(positions, head_dim, theta)
    return cos.to(dtype), sin.to(dtype)


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x: [B, T, H, Dh]`` by cos/sin ``[B or 1, T, Dh]`` (rotate-half convention), in plain tensor ops."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x: [B, T, H, Dh]`` by cos/sin ``[B or 1, T, Dh]``: :func:`rope_rotate` when ``HYLO_ROPE`` is
    ``triton`` (or ``auto`` and ``x`` on CUDA), ``x`` holds more than one position and the kernel can run on its
    device, else :func:`apply_rope_ref`. The decision reads only the switch and static tensor properties, so a
    compiled model specialises on it."""
    mode = _ROPE.value
    kernel = mode == "triton" or (mode == "auto" and x.is_cuda)
    if kernel and x.shape[1] > 1 and triton is not None and triton_supported(x.device):
        return rope_rotate(x, cos, sin)
    return apply_rope_ref(x, cos, sin)


# ----------------------------------------------------------------------------------------- Triton
if triton is not None:

    def _rope_kernel(x, cos, sin, y, T, H, sxb, sxt, sxh, scb, HALF: tl.constexpr, BD: tl.constexpr,
                     BH: tl.constexpr, BACKWARD: tl.constexpr):
        # One program: BH heads of one (b, t) row. x1/x2 are the two halves of each head; float32 arithmetic.
        # forward  (x * cos + cat(-x2, x1) * sin):  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2
        # backward (its transpose, g -> dx):        y1 = x1 c1 + x2 s2,  y2 = x2 c2 - x1 s1
        row, hb = tl.program_id(0), tl.program_id(1)
        b, t = row // T, row % T
        d = tl.arange(0, BD)
        m_d = d < HALF
        h = hb * BH + tl.arange(0, BH)
        m = (h < H)[:, None] & m_d[None, :]
        c = b.to(tl.int64) * scb + t.to(tl.int64) * (2 * HALF)  # cos/sin are [Bc, T, 2 * HALF], contiguous
        c1 = tl.load(cos + c + d, mask=m_d, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(cos + c + HALF + d, mask=m_d, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(sin + c + d, mask=m_d, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(sin + c + HALF + d, mask=m_d, other=0.0).to(tl.float32)[None, :]
        xo = b.to(tl.int64) * sxb + t.to(tl.int64) * sxt + h[:, None].to(tl.int64) * sxh + d[None, :]
        x1 = tl.load(x + xo, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(x + xo + HALF, mask=m, other=0.0).to(tl.float32)
        if BACKWARD:
            y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
        else:
            y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
        yo = row.to(tl.int64) * H * (2 * HALF) + h[:, None] * (2 * HALF) + d[None, :]  # y is contiguous
        tl.store(y + yo, y1.to(y.dtype.element_ty), mask=m)
        tl.store(y + yo + HALF, y2.to(y.dtype.element_ty), mask=m)


@functools.lru_cache(maxsize=None)
def _jit(interpret: bool):
    return triton.jit(_rope_kernel)


def kernel():
    """The kernel, JIT-wrapped on first use and keyed on TRITON_INTERPRET (read by ``triton.jit`` when it wraps)."""
    if triton is None:
        raise RuntimeError("hylo.ops.rope's kernel needs Triton (HYLO_ROPE=triton on a machine without it)")
    return _jit(triton_interpreting())


@torch.library.triton_op("hylo::rope_rotate", mutates_args=())
def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """:func:`apply_rope_ref` as one Triton kernel: ``x [B, T, H, Dh]`` (any strides with a unit last one),
    cos/sin ``[B or 1, T, Dh]``; float32 arithmetic, a contiguous output in ``x.dtype``. ``backward=True``
    applies the transposed rotation (the gradient of the forward's input)."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rope_rotate takes x [B, T, H, Dh] with an even Dh; got {tuple(x.shape)}")
    B, T, H, D = x.shape
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1:] != (T, D):
            raise ValueError(f"rope_rotate: {name} must be [1 or {B}, {T}, {D}], got {tuple(t.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    y = x.new_empty(B, T, H, D)
    half = D // 2
    bd = triton.next_power_of_2(half)
    bh = min(triton.next_power_of_2(H), max(1, 2048 // bd))
    launch = {} if triton_interpreting() else {"num_warps": 4 if bh * bd <= 1024 else 8}
    torch.library.wrap_triton(kernel())[(B * T, triton.cdiv(H, bh))](
        x, cos, sin, y, T, H, x.stride(0), x.stride(1), x.stride(2), 0 if cos.shape[0] == 1 else T * D,
        HALF=half, BD=bd, BH=bh, BACKWARD=backward, **launch)
    return y


def _setup(ctx, inputs, output):
    _, cos, sin, backward = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backward = backward


def _backward(ctx, grad):
    cos, sin = ctx.saved_tensors
    return rope_rotate(grad, cos, sin, not ctx.backward), None, None, None


rope_rotate.register_autograd(_backward, setup_context=_setup)
