"""hylo's inference engine: static caches, CUDA-graphed decode steps, ragged batches, sampling, streaming.

- :class:`DecodeRunner` (``runner.py``): one decode step for a fixed batch size over a preallocated cache,
  captured as a CUDA graph on GPUs (the engine and the profiler build on it).
- :class:`Engine` (``engine.py``): prompts in, tokens / text out; :class:`SamplingParams`,
  :class:`GenerationOutput`.
"""

from .engine import Engine, GenerationOutput, IncrementalDetokenizer, SamplingParams
from .runner import DecodeRunner, reset_cache, row_view
from .sampling import sample

__all__ = ["DecodeRunner", "Engine", "GenerationOutput", "IncrementalDetokenizer", "SamplingParams", "reset_cache",
           "row_view", "sample"]
