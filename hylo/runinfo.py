"""What a result file records about the run that made it: library versions, commit, device, date.

One place for every benchmark, profile and evaluation. The commit comes from ``HYLO_COMMIT`` when set (the GPU
machine's copy of the tree has no ``.git``), else from ``git rev-parse HEAD`` beside the package.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path


def commit() -> str:
    env = os.environ.get("HYLO_COMMIT")
    if env:
        return env
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL,
                                       cwd=Path(__file__).resolve().parent, timeout=5).strip() or "unknown"
    except Exception:  # noqa: BLE001  (not a checkout, or no git)
        return "unknown"


# switches read from the environment at each use (not Choice objects), with their defaults
_ENV_SWITCHES = {"HYLO_PAD_HEADS": "1", "HYLO_SSD_PAD_V": "1", "HYLO_GATED_BWD": "auto"}


def switches() -> dict:
    """The value of every ``HYLO_*`` kernel switch in this process (``Choice`` objects and environment-only ones):
    the same code runs different kernels under different switches, so a timing means little without them."""
    from .ops import backend, decode_attention, gemv, linear_ce  # noqa: F401  (each registers its Choice)

    out = {env: c.value for env, c in sorted(backend.Choice.registry.items())}
    out.update({k: os.environ.get(k, d) for k, d in _ENV_SWITCHES.items()})
    return out


def versions() -> dict:
    """python, torch, triton, fla, transformers and hylo versions, the commit and hylo's kernel switches."""
    import torch

    import hylo

    out = {"python": platform.python_version(), "torch": torch.__version__, "hylo": hylo.__version__}
    for mod in ("triton", "fla", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f"unavailable ({type(e).__name__})"
    out["commit"] = commit()
    try:
        out["switches"] = switches()
    except Exception as e:  # noqa: BLE001  (a record must not fail for its metadata)
        out["switches"] = f"unavailable ({type(e).__name__}: {e})"
    return out


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


def metadata() -> dict:
    """Date (UTC), device and :func:`versions`, flat."""
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": device_name(),
            **versions()}
