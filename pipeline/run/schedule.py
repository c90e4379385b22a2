"""Pure learning-rate schedule: ``lr_factor(step, ...)`` in [0, 1], multiplied into every group's lr."""
from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warm-up from 0, then
    cosine/linear decay to ``min_lr_ratio`` at ``total_steps``, or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule kind {kind!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


class LrFactor:
    """Picklable callable for ``torch.optim.lr_scheduler.LambdaLR`` built from a ScheduleConfig."""

    def __init__(self, total_steps: int, warmup_steps: int, kind: str, min_lr_ratio: float):
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.kind, self.min_lr_ratio = kind, min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.warmup_steps, self.kind, self.min_lr_ratio)
