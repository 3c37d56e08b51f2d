"""Programmatic dependent launch (PDL): a kernel may start while the kernel before it finishes.

Why: at batch 1 a decode step is ~200 small kernels, and each pays launch, ramp-up and drain on top of the bytes
it reads (``benchmarks/results/gemv-h100.json``: a 4 MB product costs 3.8 us, 1.4 us of it bytes). On Hopper and
later GPUs a kernel launched with PDL is scheduled as soon as the kernel before it signals
(``griddepcontrol.launch_dependents``); it does what does not depend on that kernel -- hylo's GEMV asks L2 for
its weights -- then waits for its writes (``griddepcontrol.wait``). Captured in a CUDA graph the overlap stays.
The rule every PDL kernel of hylo follows: nothing the previous kernel writes is read, and nothing is written,
before the wait; the signal comes after the wait.

``HYLO_PDL`` (:func:`set_pdl`, :func:`pdl_mode`), used by ``hylo.engine.kernel_step``:
- ``auto`` (default): PDL where :func:`supported`, with persistent GEMV grids (:func:`hylo.ops.gemv.max_programs`
  programs, each striding over several tiles): every program is resident from the start and prefetches the
  weights of all its tiles before it waits, so nearly the whole next matrix streams into L2 while the kernel before
  it runs (up to ``gemv.PREFETCH_BYTES``);
- ``flat``: PDL with one program per tile (only the programs resident early prefetch early);
- ``off``: plain launches.
A kernel launched without PDL ignores its wait and signal.
"""

from __future__ import annotations

import torch

from hylo.ops.backend import Choice, triton_interpreting

_PDL = Choice("programmatic dependent launch", "HYLO_PDL", ("auto", "flat", "off"), "auto")
set_pdl, get_pdl, pdl_mode = _PDL.set, _PDL.get, _PDL.use


def supported(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.0 or later, with a Triton that has ``gdc_wait``, not interpreting."""
    if device.type != "cuda" or triton_interpreting():
        return False
    try:
        from triton.language.extra import cuda
    except ImportError:
        return False
    return hasattr(cuda, "gdc_wait") and torch.cuda.get_device_capability(device)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` are launched with PDL: ``HYLO_PDL`` is not ``off`` and :func:`supported`."""
    return _PDL.value != "off" and supported(device)


def persistent() -> bool:
    """Whether PDL-launched GEMVs take persistent grids (``HYLO_PDL=auto``)."""
    return _PDL.value == "auto"
