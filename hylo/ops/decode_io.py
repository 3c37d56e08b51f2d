"""The kernel decode step's first and last kernels (``hylo.engine.kernel_step``, ``HYLO_STEP_IO=kernels``): the
embedding lookup that also zeroes the step's float32 sums, and, after the LM head, the greedy token and the
position advance.

Why: around its layers the step spent ~25 us per token on PyTorch kernels (H100, Qwen3-0.6B shape, batch 1,
``benchmarks/results/attn-out-h100-run5.json``): the embedding (4.7 us), zeroing the sums (2.8), the position
increment (1.8) and, in every greedy loop, ``logits.argmax(-1)`` (11.2 us for 151,936 logits, and a 3.5-us memset
that went with it). Here that is two small kernels and a few atomics in the LM head's GEMV (0.710 against 0.735
ms/token, ``attn-out-h100-run6-io.json``):

- :func:`embed_rows`: ``h[b] = table[tokens[b]]`` and ``sums[:] = 0`` in one launch;
- the LM head's GEMV (:func:`hylo.ops.gemv.gemv_direct` with ``argmax``) takes each tile's largest logit (as
  stored, in the output dtype) and its index, packed into one int64 by :func:`pack_ref` so that a larger value
  wins and a tie goes to the lower index, as ``torch.argmax`` returns the first maximum, and keeps the larger
  in the row's slot with ``atomic_max``;
- :func:`finish`: after the head (PDL wait), each row's greedy token unpacked from its slot, the slot reset for
  the next step, and the row's position advanced.

NaN logits are not ranked (``torch.argmax`` would return a NaN's index).
"""

from __future__ import annotations

import functools

import torch

from hylo.ops.backend import triton_interpreting

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

EMPTY = -(1 << 63)  # an unset slot: below every packed value


def pack_ref(value: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(value float32, index int64)`` -> int64, ordered as ``(value, -index)``: the float's bits as an int32
    whose order is the float's (negative floats: the low 31 bits flipped) in the high half, ``2**32 - 1 - index``
    in the low half."""
    bits = value.float().contiguous().view(torch.int32).long()
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (key << 32) | ((1 << 32) - 1 - index.long())


def unpack_index_ref(packed: torch.Tensor) -> torch.Tensor:
    """The index of a :func:`pack_ref` value."""
    return (1 << 32) - 1 - (packed & 0xFFFFFFFF)


def embed_rows_ref(tokens: torch.Tensor, table: torch.Tensor, sums: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`embed_rows` in PyTorch."""
    if sums is not None:
        sums.zero_()
    return table[tokens.view(-1)]


if triton is not None:

    def _embed_kernel(tokens, table, h, sums, D, NS: tl.constexpr, BD: tl.constexpr):
        # program (b, c): columns c*BD.. of row b, copied from the token's row of the table; it also zeroes the
        # same columns of row b in each of the NS [B, D] float32 sums ([NS, B, D] contiguous)
        b, c = tl.program_id(0), tl.program_id(1)
        B = tl.num_programs(0)
        cols = c * BD + tl.arange(0, BD)
        m = cols < D
        tok = tl.load(tokens + b)
        tl.store(h + b * D + cols, tl.load(table + tok * D + cols, mask=m), mask=m)
        for i in tl.static_range(NS):
            tl.store(sums + (i * B + b) * D + cols, tl.full([BD], 0.0, tl.float32), mask=m)

    def _finish_kernel(io, pos, B, BB: tl.constexpr, EMPTY_KEY: tl.constexpr, PDL: tl.constexpr):
        # one program: io [2, B] int64 holds the packed maxima (row 0) and the greedy tokens (row 1)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        r = tl.arange(0, BB)
        m = r < B
        packed = tl.load(io + r, mask=m, other=0)
        low = packed - ((packed >> 32) << 32)  # the low half, in int64 arithmetic (no uint32 literals)
        tl.store(io + B + r, tl.full([BB], 4294967295, tl.int64) - low, mask=m)
        tl.store(io + r, tl.full([BB], EMPTY_KEY, tl.int64), mask=m)
        tl.store(pos + r, tl.load(pos + r, mask=m) + 1, mask=m)


@functools.lru_cache(maxsize=None)
def _jit(name: str, interpret: bool):
    return triton.jit({"embed": _embed_kernel, "finish": _finish_kernel}[name])


def embed_rows(tokens: torch.Tensor, table: torch.Tensor, sums: torch.Tensor | None = None) -> torch.Tensor:
    """``table[tokens]`` for ``tokens [B]`` (int64) -> ``[B, D]``; with ``sums`` (float32 ``[n, B, D]``
    contiguous) zeroes it in the same launch."""
    B, D = tokens.numel(), table.shape[1]
    if sums is not None and (sums.dtype != torch.float32 or sums.shape[1:] != (B, D) or not sums.is_contiguous()):
        raise ValueError(f"embed_rows: sums must be float32 [n, {B}, {D}] contiguous, got {tuple(sums.shape)} "
                         f"{sums.dtype}")
    if not table.is_contiguous():
        raise ValueError("embed_rows: the table must be contiguous")
    h = table.new_empty(B, D)
    bd = min(1024, triton.next_power_of_2(D))
    _jit("embed", triton_interpreting())[(B, triton.cdiv(D, bd))](
        tokens.reshape(-1).contiguous(), table, h, h if sums is None else sums, D,
        NS=0 if sums is None else sums.shape[0], BD=bd)
    return h


def new_io(batch_size: int, device) -> torch.Tensor:
    """The ``io [2, B]`` int64 buffer of :func:`finish`: empty slots (row 0) and tokens (row 1)."""
    io = torch.zeros(2, batch_size, dtype=torch.long, device=device)
    io[0].fill_(EMPTY)
    return io


def finish(io: torch.Tensor, pos: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """After a head GEMV that packed each row's maximum into ``io[0]``: ``io[1] =`` the greedy tokens, ``io[0]``
    emptied, ``pos += 1``. Returns ``io[1]``."""
    B = pos.numel()
    if io.shape != (2, B) or io.dtype != torch.long or not io.is_contiguous() or pos.dtype != torch.long:
        raise ValueError(f"finish: io must be int64 [2, {B}] contiguous and pos int64, got {tuple(io.shape)} "
                         f"{io.dtype} and {pos.dtype}")
    interp = triton_interpreting()
    launch = {"launch_pdl": True} if pdl and not interp else {}
    _jit("finish", interp)[(1,)](io, pos, B, BB=triton.next_power_of_2(B), EMPTY_KEY=EMPTY,
                                  PDL=pdl and not interp, **launch)
    return io[1]
