"""Programmatic dependent launch (PDL): a kernel may start while the kernel before it finishes.

Why: at batch 1 a decode step is ~200 small kernels, and each pays launch, ramp-up and drain on top of the bytes
it reads (``benchmarks/results/gemv-h100.json``: a 4 MB product costs 3.8 us, 1.4 us of it bytes). On Hopper and
later GPUs a kernel launched with PDL is scheduled as soon as the kernel before it signals
(``griddepcontrol.launch_dependents``); it does what does not depend on that kernel -- hylo's GEMV asks L2 for
its weights -- then waits for its writes (``griddepcontrol.wait``). Captured in a CUDA graph the overlap stays.
The rule every PDL kernel of hylo follows: nothing the previous kernel writes is read, and nothing is written,
before the wait; the signal comes after the wait.

``HYLO_PDL`` (:func:`set_pdl`, :func:`pdl_mode`), used by ``hylo.engine.kernel_step``:
- ``on`` (default): PDL where :func:`supported`, one GEMV program per tile (the programs resident early prefetch
  early);
- ``persistent``: PDL with persistent GEMV grids (:func:`hylo.ops.gemv.max_programs` programs, each striding over
  several tiles): every program is resident from the start and prefetches the weights of all its tiles before it
  waits, so nearly the whole next matrix could stream into L2 while the kernel before it runs (up to
  ``gemv.PREFETCH_BYTES``);
- ``off``: plain launches.
A kernel launched without PDL ignores its wait and signal.

Measured (H100, Qwen3-0.6B shape, batch 1, ``benchmarks/results/decode-timeline-h100.json``; the GPU's time per
step from the profiler's trace of graph replays): with a cache of 80 slots, ``on`` 0.919 ms, ``off`` 0.984,
``persistent`` 0.994; with 2048 slots 0.965, 1.036 and 0.984 (attention split per 16 slots in all six). The
persistent grid lost most where attention ran in one split (1.157 ms): its programs fill every SM, so the next
kernel's cannot be resident early. The gain is small because the GPU is busy ~93% of the step either way: the
kernels' own ramp-up and drain, not the gaps between them, are what PDL cannot hide.
"""

from __future__ import annotations

import torch

from hylo.ops.backend import Choice, triton_interpreting

_PDL = Choice("programmatic dependent launch", "HYLO_PDL", ("on", "persistent", "off"), "on")
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
    """Whether PDL-launched GEMVs take persistent grids (``HYLO_PDL=persistent``)."""
    return _PDL.value == "persistent"
