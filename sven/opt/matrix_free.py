"""Large batches: the full damped step c = (M Mᵀ + λI)⁻¹ r without an eigendecomposition (svd_mode "cg").

Nothing is cut: the step is d = Mᵀ c with every direction filtered by σ/(σ² + λ) — the Gram route's step
whenever no σ falls below rtol·σ_max. The route therefore refuses k < rows, and an undamped step with
rtol > 0 (finding that cut needs the spectrum); a damped step ignores rtol (the filter bounds every
direction's weight by 1/(2√λ)).

- Three (rows × rows) float64 matrices (G, G + λI, its Cholesky factor) fit in ``gram_memory`` (``gram_fits``):
  G is assembled in row blocks (``GramJacobian``), G + λI = L Lᵀ, one step of iterative refinement.
- Otherwise conjugate gradients on G v = M (Mᵀ v) from the blocks' factors (``JacobianOperator.gram_matmul``,
  float64), preconditioned by a randomized Nyström approximation Ĝ = U Λ̂ Uᵀ of rank l built from one
  sketch G Ω (Frangella, Tropp & Udell, 2023): P⁻¹ = (λ̂_l + λ) U (Λ̂ + λI)⁻¹ Uᵀ + (I − U Uᵀ). Memory:
  O(activations + rows·l); no (rows × rows) tensor. CG stops at a relative residual of ``CG_TOLERANCE``.

Either way the relative residual ‖(M Mᵀ + λI) c − r‖ / ‖r‖ of the normal equations is recomputed in
float64 and reported (``Sven.last_step["normal_equation_residual"]``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import cached_property

import torch
from torch import Tensor

from sven.cost import gram_fits
from sven.jacobian.operator import JacobianOperator
from sven.opt.eigen import START_SEED, SolverOptions, nystrom_from_sketch
from sven.opt.spectrum import FLOAT64_EPS, Spectrum, cholesky_solve_vector

CG_TOLERANCE = 1e-10
"""CG stops once its recursive residual is below this fraction of ‖r‖; the reported true residual stays below
``RESIDUAL_TOLERANCE`` unless rounding in the products drifts it by more than 100×."""
RESIDUAL_TOLERANCE = 1e-8
"""A solve whose recomputed relative residual exceeds this warns (RuntimeWarning)."""
MAX_CG_ITERATIONS = 1000
PRECONDITIONER_RANK = 128
"""Columns l of the Nyström sketch (at most rows): l Gram-vector products, rows·l float64 memory."""


def conjugate_gradients(apply: Callable[[Tensor], Tensor], rhs: Tensor, precondition: Callable[[Tensor], Tensor],
                        tolerance: float, max_iterations: int) -> tuple[Tensor, int]:
    """x (n,) with ‖apply(x) − rhs‖ ≤ tolerance·‖rhs‖ by preconditioned CG (A symmetric positive definite).

    Returns x and the iterations taken (``max_iterations`` when not converged). float64 throughout.
    """
    solution = torch.zeros_like(rhs)
    residual = rhs.clone()
    target = tolerance * float(rhs.norm())
    if float(residual.norm()) <= target:
        return solution, 0
    preconditioned = precondition(residual)
    search = preconditioned.clone()
    inner = float(residual @ preconditioned)
    for iteration in range(1, max_iterations + 1):
        product = apply(search)
        step = inner / float(search @ product)
        solution += step * search
        residual -= step * product
        if float(residual.norm()) <= target:
            return solution, iteration
        preconditioned = precondition(residual)
        inner, previous = float(residual @ preconditioned), inner
        search = preconditioned + (inner / previous) * search
    return solution, max_iterations


class NystromPreconditioner:
    """P⁻¹ for G + λI from the rank-l Nyström approximation U Λ̂ Uᵀ of G: ``apply(v, λ)`` for v (n,).

    Eigenvalues (l,) at or below the sketch's rounding level, 10·n·``roundoff``·λ̂_max, are dropped: as λ̂_l
    they would make P⁻¹ G singular when λ = 0.
    """

    def __init__(self, values: Tensor, vectors: Tensor, roundoff: float) -> None:
        level = 10 * vectors.shape[0] * roundoff * float(values.max()) if values.numel() else 0.0
        resolved = values > level
        self.values, self.vectors = values[resolved], vectors[:, resolved]

    def apply(self, v: Tensor, damping: float) -> Tensor:
        if not self.values.numel():
            return v
        projected = self.vectors.T @ v
        scale = (float(self.values.min()) + damping) / (self.values + damping)
        return v + self.vectors @ ((scale - 1) * projected)


class NormalEquationSpectrum(Spectrum):
    """The uncut step M⁺_λ r = Mᵀ (M Mᵀ + λI)⁻¹ r: by Cholesky when ``gram_fits``, else Nyström-preconditioned CG.

    ``sigma`` / ``sigma_all`` are estimates (the Nyström sketch's l largest, descending), for diagnostics and
    a relative damping's σ_max²; ``rank_kept`` is every row. ``diagnostics`` holds the route, the largest
    normal-equation residual of this step's solves and the CG iterations.
    """

    rtol_used = 0.0

    def __init__(self, op: JacobianOperator, options: SolverOptions) -> None:
        self.op = op
        self.rows = op.shape[0]
        self.route = "cholesky" if gram_fits(self.rows, options.gram_memory) else "pcg"
        self.residual = 0.0
        self.iterations = 0

    @property
    def diagnostics(self) -> dict[str, float | int | str]:
        return {"normal_equation_route": self.route, "normal_equation_residual": self.residual,
                "cg_iterations": self.iterations}

    @cached_property
    def nystrom(self) -> NystromPreconditioner:
        """The rank-l Nyström approximation of G from the sketch G Ω (Ω orthonormal Gaussian, a fixed seed).

        Matrix-free, the sketch's products run in the operator's dtype: a preconditioner needs no more.
        """
        width = min(self.rows, PRECONDITIONER_RANK)
        generator = torch.Generator(device=self.op.device).manual_seed(START_SEED)
        gaussian = torch.randn(self.rows, width, dtype=torch.float64, device=self.op.device, generator=generator)
        omega = torch.linalg.qr(gaussian).Q
        if self.route == "cholesky":
            return NystromPreconditioner(*nystrom_from_sketch(omega, self.op.gram() @ omega), FLOAT64_EPS)
        roundoff = float(torch.finfo(self.op.dtype).eps)
        sketch = self.op.gram_matmul(omega, self.op.dtype)
        return NystromPreconditioner(*nystrom_from_sketch(omega, sketch, roundoff), roundoff)

    @property
    def sigma_all(self) -> Tensor:
        return self.nystrom.values.sqrt().flip(0)

    @property
    def sigma(self) -> Tensor:
        return self.sigma_all

    @property
    def rank_kept(self) -> int:
        return self.rows

    def leading(self, rank: int) -> Spectrum:
        if rank >= self.rows:
            return self
        raise ValueError(f"svd_mode 'cg' keeps all {self.rows} rows (no spectrum to cut); got rank {rank}")

    def direction(self, op: JacobianOperator, residuals: Tensor, damping: float = 0.0) -> Tensor:
        return op.rmatmul(self.solve(residuals.to(torch.float64), damping))

    def solve(self, residuals: Tensor, damping: float = 0.0) -> Tensor:
        """c = (G + λI)⁻¹ r for r (rows,) float64; records the relative residual of the normal equations."""
        factor = self._cholesky(damping) if self.route == "cholesky" else None
        apply = self._system(damping)
        if factor is not None:
            solution = cholesky_solve_vector(factor, residuals)
            solution = solution + cholesky_solve_vector(factor, residuals - apply(solution))
        else:
            solution, iterations = conjugate_gradients(apply, residuals, lambda v: self.nystrom.apply(v, damping),
                                                       CG_TOLERANCE, MAX_CG_ITERATIONS)
            self.iterations += iterations
        relative = float((apply(solution) - residuals).norm() / residuals.norm().clamp(min=1e-300))
        self.residual = max(self.residual, relative)
        if relative > RESIDUAL_TOLERANCE:
            warnings.warn(f"Sven: the normal equations (M Mᵀ + {damping:g} I) c = r were solved only to a relative "
                          f"residual of {relative:.2e} (> {RESIDUAL_TOLERANCE:g}) on the {self.route} route",
                          RuntimeWarning, stacklevel=2)
        return solution

    def _cholesky(self, damping: float) -> Tensor | None:
        """The Cholesky factor of G + λI (rows, rows); None, and the CG route from then on, when it fails."""
        system = self.op.gram() + damping * torch.eye(self.rows, dtype=torch.float64, device=self.op.device)
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info) == 0:
            return factor
        self.route = "pcg"
        return None

    def _system(self, damping: float) -> Callable[[Tensor], Tensor]:
        """v ↦ (G + λI) v, float64: with the assembled G on the Cholesky route, else from M's factors."""
        product = self.op.gram().__matmul__ if self.route == "cholesky" else self.op.gram_matmul
        return lambda v: product(v) + damping * v


def normal_equation_solver(op: JacobianOperator, k: int, rtol: float, options: SolverOptions,
                           generator: torch.Generator | None, damping: float) -> Spectrum:
    """The uncut (damped) step: refuses a rank cut (k < rows) and an undamped rtol cut, which need the spectrum."""
    rows = op.shape[0]
    if k < rows:
        raise ValueError(f"svd_mode 'cg' solves the full system and cannot keep only k = {k} of {rows} rows; "
                         "use k >= rows, or svd_mode 'gram' / 'randomized' for a rank cut")
    if damping == 0 and rtol > 0:
        raise ValueError(f"svd_mode 'cg' cannot cut at rtol = {rtol:g} without the spectrum: use damping > 0 "
                         "(the filter σ/(σ² + λ) replaces the cut) or rtol = 0, or svd_mode 'gram'")
    return NormalEquationSpectrum(op, options)
