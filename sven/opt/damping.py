"""Adaptive Tikhonov damping (Levenberg–Marquardt control of λ) for Sven.

A step with damping λ filters each kept singular value as σ/(σ² + λ). The
adaptive rule tries the step, keeps it and shrinks λ when the batch loss fell,
otherwise undoes it, grows λ and tries again from the same spectrum, at most
``max_tries`` times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DampingSchedule:
    """How λ moves: ×``decrease`` after an accepted try, ×``increase`` after a rejected one, within bounds."""

    increase: float = 10.0
    decrease: float = 0.1
    minimum: float = 1e-10
    maximum: float = 1e10
    max_tries: int = 10

    def __post_init__(self) -> None:
        if not self.increase > 1:
            raise ValueError(f"damping_increase must be > 1; got {self.increase}")
        if not 0 < self.decrease < 1:
            raise ValueError(f"damping_decrease must be in (0, 1); got {self.decrease}")
        if not 0 <= self.minimum <= self.maximum:
            raise ValueError(f"damping bounds must satisfy 0 <= damping_min <= damping_max; "
                             f"got damping_min={self.minimum}, damping_max={self.maximum}")
        if not (isinstance(self.max_tries, int) and self.max_tries >= 1):
            raise ValueError(f"max_tries must be an integer >= 1; got {self.max_tries!r}")

    def clamp(self, damping: float) -> float:
        return min(max(damping, self.minimum), self.maximum)

    def decreased(self, damping: float) -> float:
        return self.clamp(damping * self.decrease)

    def increased(self, damping: float) -> float:
        return self.clamp(damping * self.increase)


@dataclass(frozen=True)
class DampingOutcome:
    """Result of one adaptive step: the λ of the last try, the λ for the next step, tries made, accepted or not."""

    damping_used: float
    next_damping: float
    tries: int
    accepted: bool


def search_damping(schedule: DampingSchedule, damping: float, try_step: Callable[[float], bool]) -> DampingOutcome:
    """Call ``try_step(λ)`` (apply the step with λ; return True if kept, else undo it) until one is kept.

    λ grows after each rejection; after an acceptance the next step starts from a smaller λ.
    """
    damping = schedule.clamp(damping)
    for tries in range(1, schedule.max_tries + 1):
        if try_step(damping):
            return DampingOutcome(damping, schedule.decreased(damping), tries, True)
        last_tried, damping = damping, schedule.increased(damping)
    return DampingOutcome(last_tried, damping, schedule.max_tries, False)
