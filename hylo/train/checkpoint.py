"""Atomic, resumable checkpoints.

A checkpoint is one ``torch.save`` file ``<out_dir>/checkpoints/step_XXXXXXXX.pt`` holding the model, optimizer
and scheduler state, the RNG states of every rank (python, numpy, torch, cuda), the data loader position, the
step and token counters, and the configs. It is written to a temp file in the same folder and renamed into
place with ``os.replace``, then ``latest`` (a one-line text file naming it) is replaced the same way, and only
then are checkpoints beyond the newest ``keep`` deleted: a crash at any point leaves the previous good
checkpoint loadable.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"
_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the run."""


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` atomically as ``step_<step>.pt``, point ``latest`` at it, prune to the newest ``keep``."""
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step_{step:08d}.pt"
    _atomic_write(path, lambda f: torch.save(state, f))
    _atomic_write(d / LATEST, lambda f: f.write(path.name.encode() + b"\n"))
    for old in list_checkpoints(d)[:-keep] if keep > 0 else []:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The file ``latest`` names, else the newest ``step_*.pt`` (``latest`` is written after the file)."""
    d = Path(ckpt_dir)
    pointer = d / LATEST
    if pointer.is_file():
        p = d / pointer.read_text().strip()
        if p.is_file():
            return p
    found = list_checkpoints(d)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint file, or the latest one in a run folder / checkpoints folder."""
    p = Path(path)
    if p.is_dir():
        d = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        found = latest_checkpoint(d)
        if found is None:
            raise CheckpointError(f"{p}: no checkpoint found")
        p = found
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint")
    try:
        return torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"{p}: cannot load checkpoint ({e})") from None


def load_model(path: str | os.PathLike, map_location="cpu"):
    """A :class:`hylo.model.HybridLM` with the weights of a training checkpoint (file or run folder)."""
    from ..config import HyloConfig
    from ..model import HybridLM

    state = load_checkpoint(path, map_location)
    cfg = dict(state["model_config"])
    cfg.pop("model_type", None)
    model = HybridLM(HyloConfig(**cfg))
    model.load_state_dict(state["model"])
    return model
