"""Evaluation: perplexity / bits per byte (:mod:`.ppl`), passkey retrieval (:mod:`.retrieval`), MQAR, harness;
result files and tables (:mod:`.report`). Names are imported lazily, so ``import hylo.eval`` stays cheap."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "perplexity": ".ppl", "sliding_window_nll": ".ppl", "load_tokens": ".ppl",
    "passkey_retrieval": ".retrieval", "plot_heatmap": ".retrieval",
    "write_result": ".report", "print_table": ".report", "EvalError": ".common",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
