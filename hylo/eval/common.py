"""Helpers shared by evaluations: device/dtype choice, loading a model for evaluation, a logits call that works
for hylo models and other transformers causal LMs alike, and the prefix (BOS) token."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16", "amp-bf16")


class EvalError(ValueError):
    """Bad evaluation input or setting; the message names the value at fault and what is allowed."""


@dataclass(frozen=True)
class Precision:
    """How weights are stored (``weights``) and whether the forward runs under bf16 autocast (``autocast``)."""

    name: str
    weights: torch.dtype
    autocast: bool

    def context(self, device: torch.device):
        if self.autocast and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when available, else the CPU; a CUDA device without CUDA is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EvalError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    return dev


def resolve_precision(dtype: str | None, device: torch.device) -> Precision:
    """``auto``: fp32 weights with bf16 autocast on CUDA (as the trainer computes its val loss), fp32 on the CPU.

    ``bf16``/``fp16`` cast the weights; ``amp-bf16`` keeps fp32 weights and runs the forward under autocast."""
    name = "auto" if dtype is None else str(dtype).lower()
    if name not in DTYPE_CHOICES:
        raise EvalError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    if name == "auto":
        name = "amp-bf16" if device.type == "cuda" else "fp32"
    if name == "amp-bf16":
        return Precision(name, torch.float32, device.type == "cuda")
    return Precision(name, DTYPES[name], False)


def load_for_eval(model: str, tokenizer: str | None, device: str | None, dtype: str | None,
                  fallback_tokenizer: str | None = None):
    """``(model, tokenizer, device, precision)`` from any path :func:`hylo.loading.load` opens; errors as EvalError.

    ``fallback_tokenizer`` is used when none is given and none is found with the model (e.g. the tokenizer a
    prepared data folder names)."""
    from ..data.prepare import DataError
    from ..data.tokenizer import load_tokenizer
    from ..loading import LoadError, load

    dev = resolve_device(device)
    prec = resolve_precision(dtype, dev)
    try:
        m, tok = load(model, device=dev, dtype=prec.weights, tokenizer=tokenizer,
                      need_tokenizer=fallback_tokenizer is None)
        if tok is None:
            tok = load_tokenizer(fallback_tokenizer)
    except (LoadError, DataError) as e:
        raise EvalError(str(e)) from None
    return m, tok, dev, prec


def prepare_loaded(model, tokenizer, device, dtype: str | None):
    """``(model, tokenizer, device, precision)`` for a model already in memory: moved to ``device`` if one is
    given, its weights' dtype kept (an explicit other ``dtype`` is an error), autocast only over fp32 weights;
    ``tokenizer`` is required and may be a path."""
    import os

    p = next(model.parameters())
    dev = p.device if device is None else resolve_device(device)
    if dev != p.device:
        model = model.to(dev)
    want = resolve_precision(dtype, dev)
    if dtype not in (None, "auto", "amp-bf16") and want.weights != p.dtype:
        raise EvalError(f"dtype {dtype!r} asked for, but the model's weights are {p.dtype}: cast the model "
                        "first, or pass its path to have it loaded in that dtype")
    autocast = want.autocast and p.dtype == torch.float32
    prec = Precision("amp-bf16" if autocast else str(p.dtype).removeprefix("torch."), p.dtype, autocast)
    if tokenizer is None:
        raise EvalError("a tokenizer is needed with a loaded model")
    if isinstance(tokenizer, (str, os.PathLike)):
        from ..data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    return model, tokenizer, dev, prec


def prefix_token_id(tok) -> int | None:
    """The token put before the text so its first token is scored too: BOS, else EOS (hylo's data puts EOS
    before every document but the first), else ``None``."""
    for tid in (getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return None


def vocab_rows(model) -> int:
    """Rows of the model's input embedding: token ids must stay below this."""
    return int(model.get_input_embeddings().weight.shape[0])


def check_vocab(model, ids_max: int, what: str) -> None:
    n = vocab_rows(model)
    if ids_max >= n:
        raise EvalError(f"{what} holds token id {ids_max}, but the model's embedding has {n} rows: the tokenizer "
                        "does not belong to this model (pass the right one with --tokenizer)")


def logits_last(model, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits ``[B, keep, V]`` of the last ``keep`` positions (``keep=0``: all), computing no others when the model
    supports ``logits_to_keep`` (hylo and transformers' causal LMs do), so a big vocabulary does not cost
    ``B x T x V`` memory."""
    try:
        out = model(input_ids=input_ids, logits_to_keep=keep, use_cache=False)
    except TypeError:  # an older/foreign model without logits_to_keep
        out = model(input_ids=input_ids, use_cache=False)
        return out.logits if keep == 0 else out.logits[:, -keep:]
    logits = out.logits
    return logits if keep == 0 or logits.shape[1] == keep else logits[:, -keep:]
