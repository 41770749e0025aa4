"""Learning-rate schedules as pure functions of the iteration: linear warm-up, then step or cosine decay.

A schedule that is a function of the iteration alone needs no state of its own in a checkpoint: resuming
at iteration ``k`` gives the same learning rate as the uninterrupted run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduleConfig:
    """base_lr: the learning rate after warm-up.
    iterations: total number of iterations.
    warmup_iters: iterations of linear warm-up from ``warmup_factor * base_lr`` to ``base_lr``.
    kind: ``"step"`` (multiply by ``gamma`` at each of ``steps``), ``"cosine"`` (half a cosine from
        ``base_lr`` to ``min_lr_factor * base_lr`` over the iterations after warm-up) or ``"constant"``.
    """

    base_lr: float = 0.01
    iterations: int = 1000
    warmup_iters: int = 0
    warmup_factor: float = 0.1
    kind: str = "cosine"
    steps: tuple[int, ...] = ()
    gamma: float = 0.1
    min_lr_factor: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        if self.kind not in ("step", "cosine", "constant"):
            raise ValueError(f"schedule: kind must be step, cosine or constant, got {self.kind!r}")
        if self.base_lr <= 0 or self.iterations < 1 or self.warmup_iters < 0:
            raise ValueError("schedule: base_lr must be > 0, iterations >= 1, warmup_iters >= 0")
        if not 0.0 <= self.warmup_factor <= 1.0:
            raise ValueError(f"schedule: warmup_factor must be in [0, 1], got {self.warmup_factor}")


def learning_rate(config: ScheduleConfig, iteration: int) -> float:
    """The learning rate of (0-based) ``iteration``."""
    lr = config.base_lr
    if config.kind == "step":
        lr *= config.gamma ** sum(1 for s in config.steps if iteration >= s)
    elif config.kind == "cosine":
        span = max(1, config.iterations - config.warmup_iters)
        progress = min(1.0, max(0.0, (iteration - config.warmup_iters) / span))
        floor = config.min_lr_factor
        lr *= floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if iteration < config.warmup_iters:
        alpha = iteration / config.warmup_iters
        lr *= config.warmup_factor * (1.0 - alpha) + alpha
    return lr
