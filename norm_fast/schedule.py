"""The reference training code's NORM loss-weight ramp by epoch (docs/design.md section 1).

    loss = ce + norm_weight(epoch, "cifar") * norm.last_loss

A piecewise-constant weight: low at the start (the FT is random), full in the middle,
lowered again at the end. Each schedule is a list of (epoch bound, weight): the weight of
the first bound the epoch is below, else the final weight.
"""
from __future__ import annotations

import math
import numbers

SCHEDULES = {
    # epoch < 10: 0.1, < 20: 0.5, < 180: 1, < 210: 0.5, after: 0.1 (240-epoch CIFAR runs)
    "cifar": ((10, 0.1), (20, 0.5), (180, 1.0), (210, 0.5), (math.inf, 0.1)),
    # epoch < 5: 0.1, < 15: 0.5, < 60: 0.9, < 80: 0.5, after: 0.1 (ImageNet runs)
    "imagenet": ((5, 0.1), (15, 0.5), (60, 0.9), (80, 0.5), (math.inf, 0.1)),
}


def norm_weight(epoch, schedule: str = "cifar") -> float:
    """The NORM loss weight for `epoch` (0-based, int or float >= 0) under `schedule`.

    schedule: "cifar" (0.1 below epoch 10, 0.5 below 20, 1.0 below 180, 0.5 below 210,
    0.1 after) or "imagenet" (0.1 below 5, 0.5 below 15, 0.9 below 60, 0.5 below 80,
    0.1 after). Returns a Python float.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {tuple(SCHEDULES)}, got {schedule!r}")
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Real):
        raise TypeError(f"epoch must be a non-negative int or float, got "
                        f"{type(epoch).__name__} {epoch!r}")
    if not epoch >= 0 or math.isinf(epoch):     # also rejects NaN
        raise ValueError(f"epoch must be a finite number >= 0, got {epoch!r}")
    return next(float(weight) for bound, weight in SCHEDULES[schedule] if epoch < bound)
