"""The learning-rate schedule of DataComp's recipe: linear warm-up, then a cosine decay to zero at the last step.

A pure function of the step, so a resumed run needs no scheduler state to continue on exactly the same curve.
"""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup: int, total_steps: int) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total_steps``.

    Warm-up ramps ``base_lr * (step + 1) / warmup`` so the first step already moves; the cosine then runs from
    ``base_lr`` at step ``warmup`` towards 0 at step ``total_steps``.
    """
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} outside 0..{total_steps - 1}")
    if step < warmup:
        return base_lr * (step + 1) / warmup
    decay_steps = total_steps - warmup
    if decay_steps <= 0:
        return base_lr
    progress = (step - warmup) / decay_steps
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr
