"""Step search: pick the update of one step from its spectrum — as solved, by adaptive λ, by greedy rank,
or by backtracking on lr.

Each search builds candidate updates with ``CandidateSteps`` (which applies and undoes
them exactly) and leaves the chosen one applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from sven.jacobian.checks import all_finite
from sven.opt.candidate import CandidateSteps
from sven.opt.damping import search_damping
from sven.opt.options import StepSettings
from sven.opt.spectrum import Spectrum
from sven.opt.variable_k import greedy_rank


@dataclass
class SearchOutcome:
    """The update left applied (None: none was), the spectrum it came from, and what the search did.

    ``failure`` says why no update was applied when that leaves the step skipped;
    ``next_damping`` is the adaptive λ for the next step (None when λ is fixed).
    """

    update: Tensor | None
    spectrum: Spectrum
    report: dict[str, Any] = field(default_factory=dict)
    next_damping: float | None = None
    failure: str | None = None


def search_step(candidates: CandidateSteps, spectrum: Spectrum, settings: StepSettings, damping: float,
                mean_loss: float) -> SearchOutcome:
    """Choose and apply the step's update; ``damping`` is the adaptive λ to start from, ``mean_loss`` the batch's."""
    if settings.adaptive:
        return adaptive_step(candidates, spectrum, settings, damping, mean_loss)
    fixed = settings.fixed_damping * (spectrum.sigma_max**2 if settings.relative else 1.0)
    if settings.variable_k:
        spectrum = greedy_spectrum(candidates, spectrum, fixed)
    update = candidates.update(spectrum, fixed)
    if not all_finite(update):
        return SearchOutcome(None, spectrum, failure="the solver returned a non-finite direction")
    if settings.line_search:
        return backtracking_step(candidates, spectrum, update, settings.max_tries, fixed, mean_loss)
    candidates.apply(update)
    return SearchOutcome(update, spectrum, {"damping": fixed, "tries": 1, "accepted": True})


def adaptive_step(candidates: CandidateSteps, spectrum: Spectrum, settings: StepSettings, damping: float,
                  mean_loss: float) -> SearchOutcome:
    """Try λ, 10λ, … from one spectrum until the batch loss falls below ``mean_loss``."""
    tried: list[Tensor] = []

    def try_step(damping: float) -> bool:
        tried.append(candidates.update(spectrum, damping))
        if all_finite(tried[-1]) and candidates.loss_after(tried[-1]) < mean_loss:
            return True
        candidates.undo()
        return False

    outcome = search_damping(settings.schedule, damping, try_step)
    report = {"damping": outcome.damping_used, "tries": outcome.tries, "accepted": outcome.accepted,
              "next_damping": outcome.next_damping}
    return SearchOutcome(tried[-1] if outcome.accepted else None, spectrum, report, outcome.next_damping)


def backtracking_step(candidates: CandidateSteps, spectrum: Spectrum, update: Tensor, max_tries: int,
                      damping: float, mean_loss: float) -> SearchOutcome:
    """Apply ``update`` (n,) scaled by 1, ½, ¼, … until the batch loss falls below ``mean_loss``; keep that one.

    After ``max_tries`` refusals nothing is applied (the step is taken with no move, ``accepted`` False).
    """
    for tries in range(1, max_tries + 1):
        scale = 0.5 ** (tries - 1)
        scaled = update * scale
        if candidates.loss_after(scaled) < mean_loss:
            return SearchOutcome(scaled, spectrum, {"damping": damping, "tries": tries, "accepted": True,
                                                    "lr_scale": scale})
        candidates.undo()
    return SearchOutcome(None, spectrum, {"damping": damping, "tries": max_tries, "accepted": False,
                                          "lr_scale": 0.0})


def greedy_spectrum(candidates: CandidateSteps, spectrum: Spectrum, damping: float) -> Spectrum:
    """``spectrum`` cut to the rank ``greedy_rank`` picks (one forward pass per rank tried)."""

    def loss_with_rank(rank: int) -> float:
        loss = candidates.loss_after(candidates.update(spectrum.leading(rank), damping))
        candidates.undo()
        return loss

    return spectrum.leading(greedy_rank(spectrum.rank_kept, loss_with_rank))
