"""Truncated spectra of a Jacobian operator M, each applying its own (filtered) pseudoinverse.

A solver in ``sven.opt.pinv`` returns a ``Spectrum``: the kept singular values and
whatever it needs to apply M⁺ (or the Tikhonov-filtered σ/(σ² + λ)) to residuals.
The numerical floor of a route — the σ / σ_max below which its arithmetic cannot
resolve a value — enters the cut in one place, ``effective_rtol``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from sven.jacobian.operator import JacobianOperator
from sven.opt.basis import Basis, as_basis

FLOAT64_EPS = float(torch.finfo(torch.float64).eps)


def svd_floor(shape: tuple[int, int]) -> float:
    """Relative σ an SVD of M (rows, cols) resolves in float64: max(rows, cols)·ε."""
    return max(shape) * FLOAT64_EPS


def eig_floor(size: int) -> float:
    """Relative σ an eigendecomposition of a (size, size) Gram matrix resolves: √(size·ε) (it squares σ)."""
    return (max(size, 1) * FLOAT64_EPS) ** 0.5


RESOLVED_MARGIN = 10.0
"""A squared-spectrum route resolves a relative level ρ of σ/σ_max when ρ ≥ this × its floor √(n·ε) (λ to ~1 %)."""


def resolved_floor(size: int) -> float:
    """The smallest relative level of σ/σ_max that eigenpairs of a (size, size) Gram matrix resolve:
    ``RESOLVED_MARGIN``·√(size·ε)."""
    return RESOLVED_MARGIN * eig_floor(size)


def resolves(level: float, size: int) -> bool:
    """Whether eigenpairs of a (size, size) Gram matrix resolve the relative level ``level`` of σ/σ_max."""
    return level >= resolved_floor(size)


def squared_floor(size: int, damping: float, largest: float) -> float:
    """Floor of a route that squares σ (eigenpairs of M Mᵀ or Mᵀ M, size × size, largest eigenvalue ``largest``).

    ``eig_floor(size)``, or 0 when the damping λ resolves: √(λ/largest) ≥ ``RESOLVED_MARGIN``·√(size·ε). The
    step then weighs each eigenpair by 1/(σ² + λ) ≤ 1/λ in c = (M Mᵀ + λI)⁻¹ r, and an eigenvalue known
    only to size·ε·largest moves it by at most size·ε·largest/λ ≤ 1e-2 relative: no cut is needed. ``largest`` is
    read only when λ > 0 (an undamped caller need not compute it).
    """
    damped = damping > 0 and largest > 0 and resolves((damping / largest) ** 0.5, size)
    return 0.0 if damped else eig_floor(size)


def effective_rtol(rtol: float, floor: float) -> float:
    """The relative cut a route applies: the requested rtol, never below the route's floor."""
    return max(rtol, floor)


class Spectrum(ABC):
    """The kept part of M's SVD and how to apply the pseudoinverse it defines.

    ``sigma`` (r,) holds the kept singular values, descending; ``sigma_all`` every value
    the solver computed, descending; ``rtol_used`` the relative cut applied.
    """

    sigma: Tensor
    sigma_all: Tensor
    rtol_used: float

    @property
    def diagnostics(self) -> dict[str, float | int | str]:
        """What the solve reports in ``Sven.last_step`` besides the spectrum (e.g. a residual); empty by default."""
        return {}

    @property
    def sigma_max(self) -> float:
        return float(self.sigma_all[0]) if self.sigma_all.numel() else 0.0

    @property
    def rank_kept(self) -> int:
        return int(self.sigma.numel())

    @abstractmethod
    def direction(self, op: JacobianOperator, residuals: Tensor, damping: float = 0.0) -> Tensor:
        """M⁺ r for residuals r (rows,) float64, shape (cols,), in the operator's dtype.

        With ``damping`` λ > 0 each kept σ contributes σ/(σ² + λ) instead of 1/σ.
        """

    @abstractmethod
    def leading(self, rank: int) -> Spectrum:
        """The same spectrum with only its ``rank`` largest kept values."""


@dataclass
class TruncatedSpectrum(Spectrum):
    """M ≈ U diag(σ) Vᵀ on the kept triplets (float64): ``u`` (rows, r), ``v`` (cols, r) or None.

    ``v`` is None on eigen-routes that never form it; M⁺r is then Mᵀ U diag(1/(σ² + λ)) Uᵀ r, which
    stays finite for σ = 0 when damped.
    """

    u: Basis
    sigma: Tensor
    v: Basis | None
    sigma_all: Tensor
    rtol_used: float

    def direction(self, op: JacobianOperator, residuals: Tensor, damping: float = 0.0) -> Tensor:
        squared = self.sigma**2 + damping if damping else self.sigma**2
        projected = self.u.project(residuals.to(torch.float64))
        if self.v is not None:
            return self.v.combine(self.sigma / squared * projected).to(op.dtype)
        return op.rmatmul(self.u.combine(projected / squared))

    def leading(self, rank: int) -> TruncatedSpectrum:
        v = None if self.v is None else self.v.columns(rank)
        return TruncatedSpectrum(self.u.columns(rank), self.sigma[:rank], v, self.sigma_all, self.rtol_used)


def truncate(u: Tensor, sigma: Tensor, v: Tensor | None, k: int, rtol: float, floor: float,
             sigma_all: Tensor | None = None, keep_zero: bool = False) -> TruncatedSpectrum:
    """Sort descending, then ``keep_leading``: σ (n,) in any order, ``u`` (rows, n), ``v`` (cols, n) or None.

    ``sigma_all`` (≥ n,), in any order: every value the solver computed when it found vectors for the
    largest n only (default: ``sigma``).
    """
    order = torch.argsort(sigma, descending=True)
    v = None if v is None else v[:, order]
    sigma_all = None if sigma_all is None else torch.sort(sigma_all, descending=True).values
    return keep_leading(u[:, order], sigma[order], v, k, rtol, floor, sigma_all, keep_zero)


def keep_leading(u: Tensor | Basis, sigma: Tensor, v: Tensor | Basis | None, k: int, rtol: float, floor: float,
                 sigma_all: Tensor | None = None, keep_zero: bool = False) -> TruncatedSpectrum:
    """Keep at most k values with σ > effective_rtol(rtol, floor)·σ_max (and σ > 0) of a descending σ (n,).

    ``u`` (rows, n), ``v`` (cols, n) or None (tensors or ``Basis``), columns in the order of σ; ``sigma_all``
    (≥ n,) descending (default: ``sigma``). ``keep_zero`` (damped Gram routes, where each direction weighs
    1/(σ² + λ)): keep σ ≥ the cut, zeros included. The count is taken on the host from one copy of σ.
    """
    values = sigma.tolist()
    largest = values[:1] if sigma_all is None else sigma_all[:1].tolist()
    sigma_all = sigma if sigma_all is None else sigma_all
    rtol_used = effective_rtol(rtol, floor)
    cut = rtol_used * largest[0] if largest else 0.0
    kept = [value >= cut for value in values] if keep_zero else [value > cut and value > 0 for value in values]
    keep = min(sum(kept), k)
    right = None if v is None else as_basis(v).columns(keep)
    return TruncatedSpectrum(as_basis(u).columns(keep), sigma[:keep], right, sigma_all, rtol_used)


def gram_eigh(gram: Tensor, k: int, rtol: float, floor: float | None = None) -> TruncatedSpectrum:
    """The truncated spectrum of M from ``eigh`` of its Gram matrix G = M Mᵀ (rows, rows) float64: σ = √λ.

    ``floor``: the relative cut's lower bound (default ``eig_floor(rows)``).
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    floor = eig_floor(gram.shape[0]) if floor is None else floor
    return keep_leading(eigenvectors.flip(1), eigenvalues.flip(0).clamp(min=0).sqrt(), None, k, rtol, floor)


@dataclass(frozen=True)
class GramCertificate:
    """Proof that every eigenvalue of a Gram matrix G exceeds ``shift``: the Cholesky factor (n, n) of G − shift·I.

    ``factor`` None: nothing to prove (no cut, every step damped): each solve factorises G + λI itself.
    """

    shift: float
    factor: Tensor | None


REFINEMENT_TOLERANCE = 1e-12
"""A refined solve stops once its last correction is below this fraction of the solution."""
MAX_REFINEMENTS = 6
SLOW_CONTRACTION = 0.1
"""Refinement gives up (and factorises) when a correction is not below this fraction of the previous one."""
REFINEMENT_REACH = REFINEMENT_TOLERANCE ** (1 / MAX_REFINEMENTS)
"""The largest contraction per correction with which ``MAX_REFINEMENTS`` corrections reach ``REFINEMENT_TOLERANCE``."""
DIRECT_SOLVE_SIZE = 128
"""Up to this size a damped solve factorises G + λI at once: there one Cholesky costs no more than about three
refinement steps (docs/GRAM_ENGINE.md, "Small models"), and the adaptive λ often stalls refinement."""


def cholesky_solve_vector(factor: Tensor, vector: Tensor) -> Tensor:
    """A⁻¹ v for v (n,) from the lower Cholesky factor (n, n) of A; returns (n,)."""
    return torch.cholesky_solve(vector.unsqueeze(1), factor).squeeze(1)


def _identity_like(square: Tensor) -> Tensor:
    return torch.eye(square.shape[0], dtype=square.dtype, device=square.device)


def certify_nothing_cut(gram: Tensor, rtol_used: float, trace: float | None = None) -> GramCertificate | None:
    """A proof that every eigenvalue of the Gram matrix G (n, n) exceeds (rtol_used·σ_max)², or None.

    λ_max ≤ U = min(‖G‖_∞, ‖G‖_F), inflated to cover the rounding of these sums. A Cholesky
    factorisation of G − τI with τ = rtol_used²·U + s·tr(G), s = 4(n + 2)ε, that succeeds in
    floating point proves G − rtol_used²·U·I positive definite: the extra s·tr(G) exceeds the
    factorisation's backward error (Rump, BIT 2006) and the error of an eigh of G, so the eigh
    route would keep every value too. None proves nothing: the caller takes eigh. ``rtol_used`` = 0 (a
    damped step that cuts nothing) needs no proof: when G − τI has no factor, the certificate holds none.
    ``trace``: tr(G) when the caller has it (default: computed here).
    """
    slack = 4 * (gram.shape[0] + 2) * FLOAT64_EPS
    row_sums = float(gram.abs().sum(dim=1).max())
    upper = min(row_sums, float(torch.linalg.matrix_norm(gram))) * (1 + slack)
    trace = float(gram.diagonal().sum()) if trace is None else trace
    shift = rtol_used**2 * upper + slack * trace
    factor, info = torch.linalg.cholesky_ex(gram - shift * _identity_like(gram))
    if int(info) == 0:
        return GramCertificate(shift, factor)
    return GramCertificate(0.0, None) if rtol_used == 0 else None


class CertifiedGramSpectrum(Spectrum):
    """M Mᵀ proved to have every σ above the cut: nothing is truncated and M⁺r = Mᵀ (M Mᵀ)⁻¹ r.

    The step solves with the certificate's Cholesky factor (rows × rows, float64). The
    eigenvalues — the very values the eigh route returns — are computed by one eigh only
    when something reads ``sigma`` or ``sigma_all`` (diagnostics) or cuts the spectrum.
    ``sven.opt.sides`` derives the same for Mᵀ M when rows > cols.
    """

    def __init__(self, gram: Tensor, certificate: GramCertificate, rtol: float, floor: float) -> None:
        self.gram = gram
        self.certificate = certificate
        self.rtol = rtol
        self.floor = floor
        self.rtol_used = effective_rtol(rtol, floor)

    @cached_property
    def eigen(self) -> TruncatedSpectrum:
        """The eigh route's spectrum of the same Gram matrix."""
        return gram_eigh(self.gram, self.gram.shape[0], self.rtol, self.floor)

    @property
    def sigma(self) -> Tensor:
        return self.eigen.sigma

    @property
    def sigma_all(self) -> Tensor:
        return self.eigen.sigma_all

    @property
    def rank_kept(self) -> int:
        return self.gram.shape[0]

    def leading(self, rank: int) -> Spectrum:
        return self.eigen.leading(rank)

    def direction(self, op: JacobianOperator, residuals: Tensor, damping: float = 0.0) -> Tensor:
        return op.rmatmul(self.solve(residuals.to(torch.float64), damping))

    @cached_property
    def smallest_pivot(self) -> float:
        """min_i L_ii² of the certificate's factor L of S = G − τI: an upper bound on λ_min(S).

        L_ii² is the last pivot of S's leading i × i block, 1/((S_1:i,1:i)⁻¹)_ii ≥ λ_min(S_1:i,1:i) ≥ λ_min(S).
        """
        return float(self.certificate.factor.diagonal().min()) ** 2

    def refinement_pays(self, damping: float) -> bool:
        """Whether to solve G + damping·I by refinement on the certificate's factor (see ``solve``)."""
        if damping == 0:
            return True
        return (self.gram.shape[0] > DIRECT_SOLVE_SIZE
                and self.certificate.shift + damping < REFINEMENT_REACH * self.smallest_pivot)

    def solve(self, residuals: Tensor, damping: float = 0.0) -> Tensor:
        """c = (G + damping·I)⁻¹ r for r (n,) float64, G the Gram matrix; returns (n,) float64.

        Iterative refinement on the certificate's factor of S = G − τI: each correction
        S⁻¹(r − (G + damping·I) c) shrinks the error by (τ + damping)/λ_min(S), tiny when
        the spectrum sits well above the cut. When the corrections do not fall below
        ``REFINEMENT_TOLERANCE`` of c within ``MAX_REFINEMENTS``, or shrink by less than
        ``SLOW_CONTRACTION`` per step, G + damping·I is factorised instead. A damped solve factorises at once
        up to ``DIRECT_SOLVE_SIZE``, and beyond it when the contraction (τ + damping)/λ_min(S) is at least
        (τ + damping)/min_i L_ii² ≥ ``REFINEMENT_REACH`` (``smallest_pivot``), which no refinement within
        ``MAX_REFINEMENTS`` survives.
        """
        system = self.gram if damping == 0 else self.gram + damping * _identity_like(self.gram)
        shifted = self.certificate.factor
        if shifted is None or not self.refinement_pays(damping):
            return cholesky_solve_vector(torch.linalg.cholesky(system), residuals)
        solution = cholesky_solve_vector(shifted, residuals)
        previous = float("inf")
        for _ in range(MAX_REFINEMENTS):
            correction = cholesky_solve_vector(shifted, residuals - system @ solution)
            solution = solution + correction
            size = float(correction.norm())
            if size <= REFINEMENT_TOLERANCE * float(solution.norm()):
                return solution
            if size > SLOW_CONTRACTION * previous:
                break
            previous = size
        return cholesky_solve_vector(torch.linalg.cholesky(system), residuals)
