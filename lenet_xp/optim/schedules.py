"""Learning-rate schedules as pure functions of the global step.

A schedule is called with the 0-based step about to be taken and returns that step's
learning rate (a Python float), so the only state a trainer checkpoints is the step count:
``optimizer.lr = schedule(step); optimizer.step()``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass


def _positive_int(name: str, value: int) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"{name} must be > 0, got {number}")
    return number


def _non_negative(name: str, value: float) -> None:
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_step(step: int) -> int:
    step = operator.index(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step


@dataclass(frozen=True)
class ConstantLR:
    """``base_lr`` at every step."""

    base_lr: float

    def __post_init__(self) -> None:
        _non_negative("base_lr", self.base_lr)

    def __call__(self, step: int) -> float:
        _check_step(step)
        return float(self.base_lr)


@dataclass(frozen=True)
class StepLR:
    """``base_lr * gamma ** (step // step_size)``: ``torch.optim.lr_scheduler.StepLR``
    counted in optimizer steps rather than epochs."""

    base_lr: float
    step_size: int
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _non_negative("base_lr", self.base_lr)
        _positive_int("step_size", self.step_size)
        if not self.gamma > 0.0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")

    def __call__(self, step: int) -> float:
        return float(self.base_lr * self.gamma ** (_check_step(step) // self.step_size))


@dataclass(frozen=True)
class CosineLR:
    """Linear warm-up over ``warmup_steps`` (``base_lr * (step + 1) / warmup_steps``), then
    half a cosine from ``base_lr`` down to ``min_lr`` at ``total_steps`` (and after).

    With ``warmup_steps=0`` this is ``torch.optim.lr_scheduler.CosineAnnealingLR`` with
    ``T_max=total_steps`` and ``eta_min=min_lr``.
    """

    base_lr: float
    total_steps: int
    min_lr: float = 0.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _non_negative("base_lr", self.base_lr)
        _non_negative("min_lr", self.min_lr)
        _positive_int("total_steps", self.total_steps)
        if self.min_lr > self.base_lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= base_lr ({self.base_lr})")
        warmup = operator.index(self.warmup_steps)
        if not 0 <= warmup < self.total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={self.total_steps}), got {warmup}"
            )

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        if step < self.warmup_steps:
            return float(self.base_lr * (step + 1) / self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return float(
            self.min_lr + (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0
        )


@dataclass(frozen=True)
class OneCycleLR:
    """``torch.optim.lr_scheduler.OneCycleLR`` (``anneal_strategy="cos"``, two phases).

    Cosine from ``max_lr / div_factor`` up to ``max_lr`` until step
    ``pct_start * total_steps - 1``, then cosine down to
    ``max_lr / div_factor / final_div_factor`` at step ``total_steps - 1`` (held after it).
    """

    max_lr: float
    total_steps: int
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4

    def __post_init__(self) -> None:
        _non_negative("max_lr", self.max_lr)
        _positive_int("total_steps", self.total_steps)
        if not 0.0 <= self.pct_start < 1.0:
            raise ValueError(f"pct_start must be in [0, 1), got {self.pct_start}")
        for name in ("div_factor", "final_div_factor"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def __call__(self, step: int) -> float:
        step = min(_check_step(step), self.total_steps - 1)
        initial_lr = self.max_lr / self.div_factor
        min_lr = initial_lr / self.final_div_factor
        peak_step = float(self.pct_start * self.total_steps) - 1  # torch's phase boundary
        if step <= peak_step:
            start_step, end_step, start_lr, end_lr = 0.0, peak_step, initial_lr, self.max_lr
        else:
            start_step, end_step = peak_step, float(self.total_steps - 1)
            start_lr, end_lr = self.max_lr, min_lr
        span = end_step - start_step
        pct = (step - start_step) / span if span > 0 else 1.0  # torch divides by zero here
        return float(end_lr + (start_lr - end_lr) / 2.0 * (math.cos(math.pi * pct) + 1.0))


Schedule = ConstantLR | StepLR | CosineLR | OneCycleLR
SCHEDULES = ("constant", "step", "cosine", "onecycle")


def make_schedule(name: str, base_lr: float, total_steps: int, steps_per_epoch: int) -> Schedule:
    """Build a schedule by name over ``total_steps`` optimizer steps:

    - ``constant``: ``base_lr`` throughout;
    - ``step``: ``base_lr`` times 0.1 after each third of training
      (``StepLR`` with ``step_size = max(1, total_steps // 3)``);
    - ``cosine``: cosine decay from ``base_lr`` to 0, no warm-up;
    - ``onecycle``: ``OneCycleLR`` peaking at ``max_lr = base_lr`` after 30% of training.

    ``steps_per_epoch`` is checked (> 0) but no schedule depends on it yet.
    """
    total_steps = _positive_int("total_steps", total_steps)
    _positive_int("steps_per_epoch", steps_per_epoch)
    key = name.strip().lower()
    if key == "constant":
        return ConstantLR(base_lr)
    if key == "step":
        return StepLR(base_lr, step_size=max(1, total_steps // 3), gamma=0.1)
    if key == "cosine":
        return CosineLR(base_lr, total_steps)
    if key == "onecycle":
        return OneCycleLR(base_lr, total_steps)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
