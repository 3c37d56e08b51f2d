"""Which implementation an operator runs: the pure-PyTorch reference or the fast CUDA path.

``auto`` (default) takes the fast path for CUDA tensors when its kernels are importable, the
reference otherwise. ``ref`` forces the reference everywhere (tests, debugging); ``fast`` makes a
missing fast path an error instead of a silent fallback. Set with :func:`set_backend`, the
:func:`backend` context manager, or the ``HYLO_BACKEND`` environment variable.

``HYLO_SDPA`` (:func:`set_sdpa`, :func:`sdpa`) picks PyTorch's SDPA kernel for causal full attention on the fast
path (training, prefill): ``auto`` lets PyTorch choose (FlashAttention-2 on an H100); ``flash``, ``cudnn``,
``efficient`` or ``math`` force one, so a benchmark can compare them (cuDNN attention is reported faster than
FA2 on Hopper).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

class Choice:
    """A process-wide choice among fixed names: read from an environment variable at import, then settable
    (:meth:`set`) or scoped (:meth:`use`). Every such switch of hylo's ops is one of these; :data:`registry`
    holds each (by environment variable), so result files can record them (:func:`hylo.runinfo.switches`)."""

    registry: dict[str, "Choice"] = {}

    def __init__(self, what: str, env: str, choices: tuple[str, ...], default: str):
        self.what, self.env, self.choices = what, env, choices
        self.value = default
        name = os.environ.get(env, default)
        if name not in choices:
            raise ValueError(f"{env}={name!r} is invalid: use one of {choices}")
        self.value = name
        Choice.registry[env] = self

    def set(self, name: str) -> None:
        if name not in self.choices:
            raise ValueError(f"{self.what} {name!r} is invalid: use one of {self.choices}")
        self.value = name

    def get(self) -> str:
        return self.value

    @contextlib.contextmanager
    def use(self, name: str):
        old = self.value
        self.set(name)
        try:
            yield
        finally:
            self.value = old


_BACKEND = Choice("backend", "HYLO_BACKEND", ("auto", "ref", "fast"), "auto")
set_backend, get_backend, backend = _BACKEND.set, _BACKEND.get, _BACKEND.use

SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
_SDPA = Choice("SDPA backend", "HYLO_SDPA", SDPA_BACKENDS, "auto")
set_sdpa, get_sdpa, sdpa = _SDPA.set, _SDPA.get, _SDPA.use  # read at each call of layers.attention.causal_sdpa


def triton_interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` is on: hylo's own Triton kernels then run on CPU tensors (tests), with fixed
    block configs (the interpreter cannot autotune)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_supported(device: torch.device) -> bool:
    """Whether hylo's own Triton kernels can run on ``device``: CUDA with Triton, or the CPU under
    :func:`triton_interpreting`."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())


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
    if _BACKEND.value == "ref":
        return False
    ok = x.is_cuda and (fla_available() if needs_fla else True)
    if _BACKEND.value == "fast" and not ok:
        raise RuntimeError(
            "HYLO backend 'fast' was requested but the fast path is unavailable "
            f"(tensor on {x.device}, fla importable: {fla_available()}). Install hylo[cuda] on a CUDA machine.")
    return ok
