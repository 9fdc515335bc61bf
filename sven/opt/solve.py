"""Spectral solve of one step: the truncated spectrum by the chosen solver, with the float64 SVD as fallback."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from sven.cost import route_cost, warn_cost
from sven.jacobian.operator import JacobianOperator
from sven.opt.options import StepSettings
from sven.opt.pinv import resolve_mode, truncated_spectrum
from sven.opt.spectrum import Spectrum, resolved_floor


@dataclass(frozen=True)
class SolveOutcome:
    """The spectrum (None when every route failed), the solver that produced it, and a note on any fallback."""

    spectrum: Spectrum | None
    mode: str
    note: str | None = None


def smallest_damping(settings: StepSettings) -> float:
    """The smallest λ this step may filter with: the fixed λ, or the adaptive schedule's lower bound."""
    return settings.schedule.minimum if settings.adaptive else settings.fixed_damping


def lq_cost(shape: tuple[int, int], rtol: float) -> str:
    """Why "auto" left the Gram route for "lq" on an M of ``shape`` (rows, cols), what it costs and what to use."""
    rows, cols = shape
    size = min(shape)
    floor = resolved_floor(size)
    return (f"undamped rtol={rtol:g} is below what the {size} × {size} Gram matrix resolves (rtol ≥ {floor:.1e}), "
            f"so svd_mode 'auto' takes 'lq': the {rows} × {cols} Jacobian is materialised in float64 "
            f"({rows * cols * 8 / 1e6:.1f} MB) and factorised (2·{size}²·{max(shape)} flops), typically 50–200× "
            "the Gram step. "
            f"Pass damping > 0 (any rtol then stays on the Gram route) or rtol ≥ {floor:.1e}.")


def solve_spectrum(operator: JacobianOperator, settings: StepSettings, generator: torch.Generator | None
                   ) -> SolveOutcome:
    """Truncated spectrum of M (rows, cols) by ``settings.svd_mode``; an eigensolver failure falls back to "torch".

    "auto" learns the smallest λ the step may use (``smallest_damping``): with λ > 0 it stays on the Gram route,
    or solves matrix-free ("cg") when every row is kept (no rank search) and the Gram matrix exceeds
    ``gram_memory``. A route far off the fast path (``sven.cost.route_cost``) warns before it runs.
    """
    damping = smallest_damping(settings)
    smallest_k = 1 if settings.variable_k else settings.k
    mode = resolve_mode(settings.svd_mode, operator.shape, settings.rtol, damping, smallest_k, settings.gram_memory)
    cost = route_cost(mode, operator.shape, smallest_k, damping, settings.gram_memory)
    if cost is None and settings.svd_mode == "auto" and mode == "lq":
        cost = lq_cost(operator.shape, settings.rtol)
    if cost is not None:
        warn_cost(cost)

    def solve(name: str) -> Spectrum:
        return truncated_spectrum(operator, name, settings.k, settings.rtol, settings.solver_options, generator,
                                  damping)

    try:
        return SolveOutcome(solve(mode), mode)
    except torch.linalg.LinAlgError as error:
        failure = f"svd_mode {mode!r} failed ({str(error).splitlines()[0]})"
    if mode == "torch":
        return SolveOutcome(None, mode, failure)
    try:
        spectrum = solve("torch")
    except torch.linalg.LinAlgError as error:
        return SolveOutcome(None, "torch",
                            f"{failure} and its float64 SVD fallback failed too ({str(error).splitlines()[0]})")
    note = f"{failure}; fell back to the float64 SVD of M (svd_mode 'torch')"
    warnings.warn(f"Sven: {note}", RuntimeWarning, stacklevel=4)
    return SolveOutcome(spectrum, "torch", note)
