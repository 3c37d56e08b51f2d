"""Test-wide settings (tiny models run fastest with one intra-op thread per pytest-xdist worker) and the
fixtures of the Triton-kernel tests."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def interp(monkeypatch):
    """Triton's interpreter: hylo's kernels run on CPU tensors (read when a kernel is first wrapped)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def spy_on(monkeypatch):
    """``spy_on(module, name)``: ``module.name`` records the shape of its first argument at each call (callers look
    it up at each call) and still runs; returns the list of shapes."""
    def attach(module, name: str) -> list:
        calls, real = [], getattr(module, name)

        def wrapped(x, *args, **kwargs):
            calls.append(tuple(x.shape))
            return real(x, *args, **kwargs)
        monkeypatch.setattr(module, name, wrapped)
        return calls
    return attach
