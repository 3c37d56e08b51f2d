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


@pytest.fixture
def dynamo_targets():
    """``dynamo_targets(fn, *args)``: the ``call_function`` targets of the one graph dynamo captures from
    ``fn(*args)`` (``fullgraph``, not compiled, not run: the capture stops there), under ``no_grad``. What
    torch.compile would hand inductor on a GPU, checked on the CPU."""
    class Captured(Exception):
        pass

    def run(fn, *args) -> list:
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            raise Captured

        torch._dynamo.reset()
        try:
            with torch.no_grad(), pytest.raises(Exception) as e:
                torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)(*args)
        finally:
            torch._dynamo.reset()
        assert len(graphs) == 1, e.value
        return [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    return run
