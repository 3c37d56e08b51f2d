"""One way to open a model for inference or evaluation: :func:`load` takes any path a user has.

Accepted: a Hugging Face model folder (``config.json`` + weights; a hylo model, or any transformers causal LM
for comparisons), a training run folder (``hylo train`` output: its ``model/`` export if present, else its
latest checkpoint), or a checkpoint file ``step_XXXXXXXX.pt``. The tokenizer is found next to the model, or
through the data manifest a training checkpoint names, unless one is passed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


class LoadError(RuntimeError):
    """The path is not a model hylo can open, or its tokenizer cannot be found."""


def _is_hf_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file() and any(
        (p / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))


def _tokenizer_from_manifest(train_config: dict | None):
    data = (train_config or {}).get("data")
    if not data:
        return None
    manifest = Path(data) / "manifest.json"
    if not manifest.is_file():
        return None
    tok = json.loads(manifest.read_text()).get("tokenizer", {})
    inside = str(Path(data) / tok["dir"]) if tok.get("dir") else None  # the folder's own copy first
    for spec in (inside, tok.get("path"), tok.get("name")):
        if spec and Path(spec).expanduser().exists():
            return spec
    return None


def resolve(path: str | os.PathLike) -> tuple[str, Path, str | None]:
    """``(kind, path, tokenizer_spec)`` with kind ``"hf"`` (model folder) or ``"checkpoint"`` (a .pt file or run)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LoadError(f"{p}: no such file or folder (expected a model folder, a `hylo train` run folder or a "
                        "checkpoint .pt file)")
    if _is_hf_dir(p):
        return "hf", p, str(p) if any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")) else None
    if p.is_dir() and _is_hf_dir(p / "model"):  # a run folder with its final export
        return resolve(p / "model")
    if p.is_file() and p.suffix == ".pt" or p.is_dir() and ((p / "checkpoints").is_dir() or (p / "latest").is_file()):
        return "checkpoint", p, None
    raise LoadError(f"{p}: not a model folder (config.json + weights), a run folder (no model/ or checkpoints/) "
                    "nor a checkpoint .pt file")


def load(path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         tokenizer: str | os.PathLike | None = None, need_tokenizer: bool = False):
    """``(model, tokenizer_or_None)`` in eval mode on ``device`` (default: CUDA if available) and ``dtype``.

    A hylo folder gives a :class:`hylo.HybridLM`; another model type gives the transformers model (for
    side-by-side evaluation). ``need_tokenizer=True`` raises :class:`LoadError` when none can be found.
    """
    from . import hf  # noqa: F401  (registers the Auto classes)
    from .data.tokenizer import load_tokenizer

    kind, p, tok_spec = resolve(path)
    if kind == "hf":
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
        try:
            if model_type == "hylo":
                from .model import HybridLM

                model = HybridLM.from_pretrained(str(p))
            else:
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(str(p))
        except Exception as e:
            raise LoadError(f"{p}: cannot load the model ({e})") from None
    else:
        from .train.checkpoint import CheckpointError, load_checkpoint
        from .config import HyloConfig
        from .model import HybridLM

        try:
            state = load_checkpoint(p)
        except CheckpointError as e:
            raise LoadError(str(e)) from None
        if "model_config" not in state or "model" not in state:
            raise LoadError(f"{p}: not a hylo training checkpoint (no model_config/model entries)")
        cfg = dict(state["model_config"])
        cfg.pop("model_type", None)
        model = HybridLM(HyloConfig(**cfg))
        model.load_state_dict(state["model"])
        tok_spec = _tokenizer_from_manifest(state.get("train_config"))
    if tokenizer is not None:
        tok_spec = str(tokenizer)
    tok = load_tokenizer(tok_spec) if tok_spec is not None else None
    if tok is None and need_tokenizer:
        raise LoadError(f"{p}: no tokenizer found next to the model or in its training data manifest; "
                        "pass one (--tokenizer PATH)")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), tok
