"""Time to target: training-clock seconds until a run's validation loss first reaches a given level."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def validation_curve(run: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(training seconds, validation loss) of a run: its trace, or its per-epoch history when it has none.

    A diverged run's curve stops at its last finite value.
    """
    source = run.get("trace") or run["history"]
    points = []
    for seconds, value in zip(source["wall_time"], source["val_loss"]):
        if value is None or not math.isfinite(value):
            break
        points.append((seconds, value))
    return [seconds for seconds, _ in points], [value for _, value in points]


def seconds_to_reach(seconds: list[float], values: list[float], target: float) -> float | None:
    """The first ``seconds[i]`` with ``values[i] <= target``; None when no value reaches it."""
    return next((when for when, value in zip(seconds, values) if value <= target), None)


def time_to_target(run: dict[str, Any], target: float) -> float | None:
    """Training-clock seconds until ``run``'s validation loss first reaches ``target`` (None: never)."""
    return seconds_to_reach(*validation_curve(run), target)


def final_val_loss(run: dict[str, Any]) -> float:
    """The last finite validation loss of the run's curve (inf when it has none)."""
    _, values = validation_curve(run)
    return values[-1] if values and not run["diverged"] else math.inf


@dataclass
class Race:
    """``runner`` against ``reference`` on the levels the reference reaches: every new best validation loss of the
    reference's curve, with the seconds each needed for it (``runner_seconds`` None: never reached)."""

    levels: list[float]
    reference_seconds: list[float]
    runner_seconds: list[float | None]

    @property
    def levels_first(self) -> int:
        """How many levels the runner reaches no later than the reference."""
        return sum(mine is not None and mine <= theirs
                   for mine, theirs in zip(self.runner_seconds, self.reference_seconds))

    @property
    def worst_ratio(self) -> float:
        """The largest runner/reference time ratio over the levels (inf when a level is never reached)."""
        ratios = [math.inf if mine is None else mine / max(theirs, 1e-12)
                  for mine, theirs in zip(self.runner_seconds, self.reference_seconds)]
        return max(ratios, default=math.nan)


def race(runner: dict[str, Any], reference: dict[str, Any]) -> Race:
    """Time each run needs for every new best validation loss the ``reference`` run reaches after its start."""
    seconds, values = validation_curve(reference)
    runner_curve = validation_curve(runner)
    levels: list[float] = []
    reference_seconds: list[float] = []
    for when, value in zip(seconds[1:], values[1:]):
        if value < (levels[-1] if levels else values[0]):
            levels.append(value)
            reference_seconds.append(when)
    return Race(levels, reference_seconds, [seconds_to_reach(*runner_curve, level) for level in levels])
