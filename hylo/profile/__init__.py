"""Latency profiling: measure decode / prefill / throughput / memory on a device, build a per-operator latency
lookup table (LUT) there, and predict a model's decode latency and throughput from its config with the table.

- :mod:`.measure`: the measurements (CUDA graphs on GPUs, eager on the CPU) and :func:`build_lut`;
- :mod:`.lut`: :class:`LUT` (entries, interpolation, JSON) and the pieces' signatures;
- :mod:`.predict`: :func:`predict_decode`, :func:`predict_generate`, :func:`predict_throughput`, :func:`max_batch`;
- :mod:`.report`: one profile as a JSON document (:func:`profile_model`), its schema check;
- :mod:`.plots`: PNG plots. The command line is ``hylo profile`` (``hylo/cli_profile.py``).
"""

from .lut import LUT, LUTError, effective_context, model_pieces, signature
from .predict import (integrate_steps, max_batch, model_memory, predict_decode, predict_generate,
                      predict_max_batch, predict_throughput)

__all__ = ["LUT", "LUTError", "effective_context", "integrate_steps", "max_batch", "model_memory", "model_pieces",
           "predict_decode", "predict_generate", "predict_max_batch", "predict_throughput", "signature"]
