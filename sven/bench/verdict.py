"""The Levenberg–Marquardt comparison bar, computed from an ``lm`` study payload.

The bar: the best documented Sven setting reaches a final validation MSE at or below
Levenberg–Marquardt's (mean over seeds) at no more than 1.5 × Adam's training time per
epoch. Every ratio here is read from the runs of the payload.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from sven.bench.optimizers import SVEN_VARIANTS
from sven.bench.plots import group_runs
from sven.bench.results import final, seconds_per_epoch

MAX_TIME_RATIO = 1.5
BAR_TEXT = ("the best documented Sven setting reaches a final validation MSE at or below LM's on toy-1D at no more "
            f"than {MAX_TIME_RATIO:g}× Adam's time per epoch")


@dataclass
class BarScore:
    """One Sven setting against the references: its mean final validation MSE and mean seconds per epoch,
    each also as a ratio to LM's MSE and to the time reference's seconds per epoch."""

    label: str
    mse: float
    mse_ratio: float
    seconds: float
    time_ratio: float

    @property
    def meets(self) -> bool:
        return self.mse_ratio <= 1.0 and self.time_ratio <= MAX_TIME_RATIO


def _means(runs: list[dict[str, Any]]) -> tuple[float, float]:
    return statistics.fmean(final(run) for run in runs), statistics.fmean(seconds_per_epoch(run) for run in runs)


def bar_scores(payload: dict[str, Any]) -> list[BarScore]:
    """A score per Sven setting of the payload, lowest mean final validation MSE first.

    Raises ValueError when the payload lacks a run of ``lm_reference`` or of ``time_reference``.
    """
    groups = group_runs(payload["runs"])
    missing = [payload[key] for key in ("lm_reference", "time_reference") if payload[key] not in groups]
    if missing:
        raise ValueError(f"the bar needs runs labelled {' and '.join(missing)}; the payload has {', '.join(groups)}")
    lm_mse, _ = _means(groups[payload["lm_reference"]])
    _, reference_seconds = _means(groups[payload["time_reference"]])
    scores = []
    for label, runs in groups.items():
        if runs[0]["optimizer"] in SVEN_VARIANTS:
            mse, seconds = _means(runs)
            scores.append(BarScore(label, mse, mse / lm_mse, seconds, seconds / reference_seconds))
    return sorted(scores, key=lambda score: score.mse)


def bar_verdict(payload: dict[str, Any]) -> list[str]:
    """Markdown lines: the bar, a table of every Sven setting's two ratios, and the verdict on this task."""
    lm, reference = payload["lm_reference"], payload["time_reference"]
    lines = [f"**The bar**: {BAR_TEXT}. Measured here on {payload['task']}, ratios of means over seeds "
             f"against `{lm}` (final validation MSE) and `{reference}` (training seconds per epoch, same run):", "",
             "| Sven setting | final val MSE / LM's | s/epoch / Adam's | meets the bar |", "|---|---|---|---|"]
    try:
        scores = bar_scores(payload)
    except ValueError as missing:
        return [f"**The bar**: {BAR_TEXT}. Not computed: {missing}.", ""]
    lines += [f"| {s.label} | {s.mse_ratio:.3g} | {s.time_ratio:.3g} | {'yes' if s.meets else 'no'} |" for s in scores]
    meeting = [score for score in scores if score.meets]
    if meeting:
        best = meeting[0]
        verdict = (f"**Bar met** on {payload['task']} by `{best.label}`: final validation MSE {best.mse:.3g} = "
                   f"{best.mse_ratio:.3g}× LM's, at {best.seconds:.3g} s/epoch = {best.time_ratio:.3g}× Adam's.")
    elif scores:
        best = scores[0]
        verdict = (f"**Bar not met** on {payload['task']}: the Sven setting with the lowest final validation MSE, "
                   f"`{best.label}`, reaches {best.mse:.3g} = {best.mse_ratio:.3g}× LM's (the bar: ≤ 1) at "
                   f"{best.seconds:.3g} s/epoch = {best.time_ratio:.3g}× Adam's (the bar: ≤ {MAX_TIME_RATIO:g}).")
    else:
        verdict = f"**Bar not computed** on {payload['task']}: the payload has no Sven run."
    return [*lines, "", verdict, ""]
