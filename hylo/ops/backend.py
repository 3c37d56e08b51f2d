"""Which implementation an operator runs: the pure-PyTorch reference or the fast CUDA path.

``auto`` (default) takes the fast path for CUDA tensors when its kernels are importable, the
reference otherwise. ``ref`` forces the reference everywhere (tests, debugging); ``fast`` makes a
missing fast path an error instead of a silent fallback. Set with :func:`set_backend`, the
:func:`backend` context manager, or the ``HYLO_BACKEND`` environment variable.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

_CHOICES = ("auto", "ref", "fast")
_backend = os.environ.get("HYLO_BACKEND", "auto")
if _backend not in _CHOICES:
    raise ValueError(f"HYLO_BACKEND={_backend!r} is invalid: use one of {_CHOICES}")


def set_backend(name: str) -> None:
    global _backend
    if name not in _CHOICES:
        raise ValueError(f"backend {name!r} is invalid: use one of {_CHOICES}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def backend(name: str):
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


@functools.lru_cache(maxsize=None)
def fla_available() -> bool:
    """True when flash-linear-attention's ops import (needs Triton and a CUDA build of torch)."""
    try:
        import fla.ops  # noqa: F401
    except Exception:
        return False
    return True


def use_fast(x: torch.Tensor, needs_fla: bool = True) -> bool:
    """Decide the path for an op whose input is ``x``."""
    if _backend == "ref":
        return False
    ok = x.is_cuda and (fla_available() if needs_fla else True)
    if _backend == "fast" and not ok:
        raise RuntimeError(
            "HYLO backend 'fast' was requested but the fast path is unavailable "
            f"(tensor on {x.device}, fla importable: {fla_available()}). Install hylo[cuda] on a CUDA machine.")
    return ok
