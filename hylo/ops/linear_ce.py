"""LM head + cross-entropy without the full logits: ``mean CE(h @ weight.T, targets)`` over non-ignored targets.

The plain form, ``F.cross_entropy(F.linear(h, weight).float(), targets)``, holds the logits ``[N, V]`` in bf16,
a float32 copy and a float32 gradient: ~10 GB of tensors for 32k tokens x a 32k vocabulary; on an H100 the head +
loss took 26 ms forward+backward of a ~148 ms step while its matmuls need ~7 ms (11.9 ms fused:
``benchmarks/results/train-throughput-lce-h100.json``).
The fused form walks the rows in chunks of ``chunk`` tokens and, for each, computes the logits, the loss, the
gradient of the logits (written over the logits) and from it the gradients of ``h`` and ``weight``, all inside the
forward; the backward only scales them by the incoming gradient. No ``[N, V]`` tensor ever exists: memory is one
chunk of logits plus ``dh`` and ``dweight``. This is the Liger-Kernel algorithm that fla ships as
``fla.modules.FusedLinearCrossEntropyLoss``; on CUDA this module calls fla's implementation of it
(``fused_linear_cross_entropy_fwd``: cuBLAS matmuls per chunk and fla's Triton loss / loss-gradient kernels).

Implementations (argument ``impl``, else :func:`set_impl` / :func:`use_impl` / env ``HYLO_LINEAR_CE``):

- ``auto`` (default): ``fused`` with fla's kernels where :func:`hylo.ops.backend.use_fast` takes the fast path
  (a CUDA tensor, fla importable, ``HYLO_BACKEND`` not ``ref``), ``ref`` otherwise;
- ``ref``: the plain form above (the reference);
- ``fused``: the chunked algorithm: fla's kernels on CUDA where fla imports, else the same loop in PyTorch (used by
  the CPU tests; on CUDA it saves memory; its speed there is not measured).
  Compiled, the plain form is as fast as the fused one on the H100 (inductor fuses it); the fused form then only
  saves memory.

What the fused form does differently from the reference (all checked in ``tests/test_linear_ce.py`` and, for fla's
kernels, by ``benchmarks/train_throughput.py``'s correctness check on the GPU):

- dtypes: under autocast ``h`` and ``weight`` are cast to the autocast dtype first, as ``F.linear`` would; the
  loss is computed from those logits in float32, the logits' gradient is stored in the logits' dtype (as the
  reference's cast-to-bf16 backward does) and ``dweight`` is accumulated over chunks in the weight's dtype (in bf16
  under autocast: one rounding per chunk, where the reference rounds once; fla's default,
  ``accumulate_grad_in_fp32=True``, casts both operands of the ``dweight`` matmul to float32 instead, a float32
  matmul several times slower than bf16 without TF32). Gradients reach ``weight``'s
  own graph, so a computed weight (weight normalization) and a tied embedding get theirs through autograd.
- all targets ignored: 0 with zero gradients (fla divides by ``max(count, 1)``), where the reference gives NaN.
- no gradient needed (``torch.no_grad``, evaluation): the loss alone, chunk by chunk in PyTorch, so evaluation
  neither materializes the logits nor pays for the gradient matmuls.
- ``torch.compile``: the fused form is a custom op (``hylo::fused_linear_ce``) with a fake implementation and an
  autograd formula, so the compiled graph holds it whole (no graph break: fla's own autograd.Function would be one,
  as fla wraps its entry points in ``torch.compiler.disable``); at run time the op calls fla eagerly. It is
  deterministic: every kernel works row by row or is a matmul, with no atomics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hylo.ops.backend import Choice, fla_available, use_fast

IMPLS = ("auto", "ref", "fused")
DEFAULT_CHUNK = 4096  # rows per chunk: at a 32k vocabulary, 256 MB of bf16 logits; 8 chunks at batch 16 x 2048

_IMPL = Choice("linear cross-entropy implementation", "HYLO_LINEAR_CE", IMPLS, "auto")
set_impl, get_impl, use_impl = _IMPL.set, _IMPL.get, _IMPL.use  # the default when a call passes no ``impl``


def resolve(h: torch.Tensor, impl: str | None = None) -> str:
    """The path a call on ``h`` takes: ``"ref"``, ``"fla"`` (fused, fla's kernels) or ``"torch"`` (fused, PyTorch)."""
    name = _IMPL.value if impl is None else impl
    if name not in IMPLS:
        raise ValueError(f"linear cross-entropy implementation {name!r} is invalid: use one of {IMPLS}")
    if name == "ref":
        return "ref"
    if name == "fused":
        return "fla" if h.is_cuda and fla_available() else "torch"
    return "fla" if use_fast(h) else "ref"


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk: int = DEFAULT_CHUNK, impl: str | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits ``h @ weight.T`` over the targets that are not ``ignore_index``.

    ``h: [N, D]``, ``weight: [V, D]``, ``targets: [N]`` (int64). Same value and gradients as
    ``F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=ignore_index)`` up to rounding (module
    docstring: the differences). ``chunk``: rows per chunk of the fused form (and of the no-gradient loss).
    Returns a float32 scalar."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"h must be [N, D] and weight [V, D]; got h {tuple(h.shape)}, weight {tuple(weight.shape)}")
    if targets.shape != h.shape[:1]:
        raise ValueError(f"targets must be [N] = [{h.shape[0]}], got {tuple(targets.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    path = resolve(h, impl)
    if path == "ref":
        return F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=ignore_index)
    dev = h.device.type
    if torch.is_autocast_enabled(dev):  # what F.linear would do: both operands in the autocast dtype
        dt = torch.get_autocast_dtype(dev)
        h, weight = h.to(dt), weight.to(dt)
    elif h.dtype != weight.dtype:
        raise ValueError(f"h ({h.dtype}) and weight ({weight.dtype}) must have one dtype outside autocast")
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
        return _loss_only(h, weight, targets, ignore_index, chunk)
    return fused_linear_ce(h.contiguous(), weight.contiguous(), targets.contiguous(), ignore_index, chunk, path)[0]


def _loss_only(h, weight, targets, ignore_index: int, chunk: int) -> torch.Tensor:
    """The loss without gradients, chunk by chunk (no [N, V] logits)."""
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        logits = F.linear(h[s:s + chunk], weight).float()
        total = total + F.cross_entropy(logits, targets[s:s + chunk], ignore_index=ignore_index, reduction="sum")
    return total / targets.ne(ignore_index).sum().clamp_min(1)


# ------------------------------------------------------------------------------------------------- the fused op
@torch.library.custom_op("hylo::fused_linear_ce", mutates_args=())
def fused_linear_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk: int,
                    kernel: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, dloss/dh, dloss/dweight)`` for a loss gradient of 1; ``kernel``: ``"fla"`` or ``"torch"``.
    Inputs contiguous and of one dtype (:func:`linear_cross_entropy` sees to both)."""
    with torch.autocast(h.device.type, enabled=False):
        if kernel == "fla":
            from fla.modules.fused_linear_cross_entropy.ops import fused_linear_cross_entropy_fwd

            n = h.shape[0]
            loss, dh, dw, _ = fused_linear_cross_entropy_fwd(
                x=h, target=targets, weight=weight, ignore_index=ignore_index, num_chunks=-(-n // chunk),
                reduction="mean", accumulate_grad_in_fp32=False)
            return loss, dh, dw
        if kernel == "torch":
            return _fused_torch(h, weight, targets, ignore_index, chunk)
    raise ValueError(f"kernel {kernel!r} is invalid: use 'fla' or 'torch'")


@fused_linear_ce.register_fake
def _(h, weight, targets, ignore_index, chunk, kernel):
    return h.new_empty((), dtype=torch.float32), torch.empty_like(h), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, dloss, _dh, _dw):
    dh, dw = ctx.saved_tensors
    return (dh.float() * dloss).to(dh.dtype), (dw.float() * dloss).to(dw.dtype), None, None, None, None


fused_linear_ce.register_autograd(_backward, setup_context=_setup)


def _fused_torch(h, weight, targets, ignore_index: int, chunk: int):
    """fla's algorithm in PyTorch: per chunk, logits -> float32 loss and softmax gradient -> dh, dweight."""
    n = h.shape[0]
    valid_all = targets.ne(ignore_index)
    scale = 1.0 / valid_all.sum().clamp_min(1).float()
    loss = h.new_zeros((), dtype=torch.float32)
    dh = torch.empty_like(h)
    dw = torch.zeros_like(weight)
    for s in range(0, n, chunk):
        x, t, valid = h[s:s + chunk], targets[s:s + chunk], valid_all[s:s + chunk]
        logits = F.linear(x, weight)
        lf = logits.float()
        lse = lf.logsumexp(-1)
        tgt = torch.where(valid, t, 0)
        rows = torch.arange(len(t), device=t.device)
        loss = loss + torch.where(valid, lse - lf[rows, tgt], 0.0).sum()
        g = (lf - lse[:, None]).exp_()
        g[rows, tgt] -= 1.0
        g = (g * (valid.float() * scale)[:, None]).to(logits.dtype)
        dh[s:s + chunk] = g @ weight
        dw.addmm_(g.t(), x)
    return loss * scale, dh, dw
