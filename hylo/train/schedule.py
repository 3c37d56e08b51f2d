"""Learning-rate schedules as multipliers of the peak lr, for ``torch.optim.lr_scheduler.LambdaLR``.

``step`` is the index of the optimizer update about to be made (0-based). All schedules warm up linearly
from ``1/warmup`` to 1 over ``warmup`` steps, then:

- ``cosine``: cosine decay from 1 to ``min_lr_ratio`` at the last step;
- ``wsd`` (warmup-stable-decay): constant 1, then a linear decay to ``min_lr_ratio`` over the last
  ``decay_fraction`` of the run;
- ``constant``: 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Schedule:
    """Picklable lr multiplier (LambdaLR saves its ``__dict__`` in ``state_dict``)."""

    kind: str
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        last = max(self.total_steps - 1, 1)
        if self.kind == "cosine":
            span = max(last - self.warmup_steps, 1)
            progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "wsd":
            decay = max(int(round(self.decay_fraction * self.total_steps)), 1)
            start = max(self.total_steps - decay, self.warmup_steps)
            if step < start:
                return 1.0
            progress = min((step - start + 1) / max(self.total_steps - start, 1), 1.0)
            return 1.0 - (1.0 - self.min_lr_ratio) * progress
        raise ValueError(f"unknown schedule kind {self.kind!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
