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


def versions() -> dict:
    """python, torch, triton, fla, transformers and hylo versions, and the commit."""
    import torch

    import hylo

    out = {"python": platform.python_version(), "torch": torch.__version__, "hylo": hylo.__version__}
    for mod in ("triton", "fla", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f"unavailable ({type(e).__name__})"
    out["commit"] = commit()
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
