"""Every scheduled scalar as a per-iteration array, built once (testable, plottable)."""

from __future__ import annotations

import numpy as np


def lr_multipliers(iterations: int, warmup: int, warmup_ratio: float, power: float) -> np.ndarray:
    """Linear warm-up from ``warmup_ratio`` to 1 over ``warmup`` iterations, then poly decay
    ``(1 - it / iterations) ** power`` over the whole run (SPEC §7)."""
    it = np.arange(iterations, dtype=np.float64)
    poly = (1.0 - it / iterations) ** power
    if warmup > 0:
        ramp = warmup_ratio + (1.0 - warmup_ratio) * np.minimum(it / warmup, 1.0)
        poly = np.where(it < warmup, ramp * poly, poly)
    return poly


def step_weights(iterations: int, weight: float, start: int) -> np.ndarray:
    """A loss weight that is 0 before ``start`` and ``weight`` from it on (SPEC §6)."""
    w = np.zeros(iterations, dtype=np.float64)
    w[min(start, iterations):] = weight
    return w
