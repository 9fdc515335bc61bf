"""Truncated pseudoinverse solvers, one per ``svd_mode``, behind one signature.

Every solver takes a Jacobian operator M (rows × cols) and returns a truncated
spectrum: the top singular triplets with at most ``k`` values and only those
with σ > max(rtol, floor) · σ_max, where ``floor`` is the route's numerical zero
(an SVD of M resolves σ down to about max(rows, cols)·ε·σ_max; an eigen-
decomposition of M Mᵀ only to about √(rows·ε)·σ_max, since it squares σ).
``pinv_direction`` then applies M⁺ (or its Tikhonov-filtered version) to the
residuals. All small dense algebra runs in float64.

Modes: "torch" (full SVD of M, the reference), "gram" (eigh of M Mᵀ, exact and
cheap when rows ≤ cols), "randomized" (range finder + SVD of the projection),
"randomized_v2" (range finder + eigh of the sketch's Gram matrix), "scipy"
(``scipy.sparse.linalg.svds``), "lobpcg" (``torch.lobpcg`` on the smaller of
MᵀM and MMᵀ) and "auto" (the cheapest exact route for the shape: "gram" when
rows ≤ cols and rtol ≥ 1e-6, else "torch"; equal to "torch" up to round-off).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from sven.jacobian.operator import JacobianOperator

FLOAT64_EPS = float(torch.finfo(torch.float64).eps)
GRAM_RTOL_LIMIT = 1e-6
"""Below this rtol the Gram route cannot resolve the cut; "auto" then takes an SVD of M."""


@dataclass(frozen=True)
class SolverOptions:
    """Options of the randomized solvers (ignored by the others)."""

    oversampling: int = 5
    power_iterations: int = 1


@dataclass
class Spectrum:
    """A truncated singular value decomposition M ≈ U diag(σ) Vᵀ (float64).

    ``u`` (rows, r) and ``sigma`` (r,) descending are the kept triplets; ``v``
    (cols, r) is None on eigen-routes that never form it (M⁺r is then Mᵀc);
    ``sigma_all`` holds every singular value the solver computed, descending.
    """

    u: Tensor
    sigma: Tensor
    v: Tensor | None
    sigma_all: Tensor
    rtol_used: float

    @property
    def sigma_max(self) -> float:
        return float(self.sigma_all[0]) if self.sigma_all.numel() else 0.0

    @property
    def rank_kept(self) -> int:
        return int(self.sigma.numel())


Solver = Callable[[JacobianOperator, int, float, SolverOptions], Spectrum]
SOLVERS: dict[str, Solver] = {}


def _solver(name: str) -> Callable[[Solver], Solver]:
    def register(fn: Solver) -> Solver:
        SOLVERS[name] = fn
        return fn

    return register


def _truncate(u: Tensor, sigma: Tensor, v: Tensor | None, k: int, rtol: float, floor: float) -> Spectrum:
    """Sort descending, then keep at most k values with σ > max(rtol, floor)·σ_max (and σ > 0)."""
    order = torch.argsort(sigma, descending=True)
    sigma, u = sigma[order], u[:, order]
    v = None if v is None else v[:, order]
    rtol_used = max(rtol, floor)
    cut = rtol_used * float(sigma[0]) if sigma.numel() else 0.0
    keep = int(((sigma > cut) & (sigma > 0)).sum().clamp(max=k))
    return Spectrum(u[:, :keep], sigma[:keep], None if v is None else v[:, :keep], sigma, rtol_used)


def _svd_floor(op: JacobianOperator) -> float:
    return max(op.shape) * FLOAT64_EPS


def _eig_floor(size: int) -> float:
    return (max(size, 1) * FLOAT64_EPS) ** 0.5


def _gram_eigh(gram: Tensor) -> tuple[Tensor, Tensor, float]:
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    return eigenvectors, eigenvalues.clamp(min=0).sqrt(), _eig_floor(gram.shape[0])


@dataclass(frozen=True)
class GramCertificate:
    """Proof that every eigenvalue of a Gram matrix G exceeds ``shift``: the Cholesky factor (n, n) of G − shift·I."""

    shift: float
    factor: Tensor


REFINEMENT_TOLERANCE = 1e-12
"""A refined solve stops once its last correction is below this fraction of the solution."""
MAX_REFINEMENTS = 6
SLOW_CONTRACTION = 0.1
"""Refinement gives up (and factorises) when a correction is not below this fraction of the previous one."""


class CertifiedGramSpectrum(Spectrum):
    """M Mᵀ proved to have every σ above the cut: nothing is truncated and M⁺r = Mᵀ (M Mᵀ)⁻¹ r.

    The step solves with the certificate's Cholesky factor (rows × rows, float64);
    ``u``, ``sigma`` and ``sigma_all`` — the very values the eigh route returns — are
    computed by one eigh only when something reads them (diagnostics).
    """

    def __init__(self, gram: Tensor, certificate: GramCertificate, rtol_used: float) -> None:
        self.gram = gram
        self.certificate = certificate
        self.v = None
        self.rtol_used = rtol_used

    @cached_property
    def _eigen(self) -> Spectrum:
        u, sigma, _ = _gram_eigh(self.gram)
        return _truncate(u, sigma, None, self.gram.shape[0], self.rtol_used, 0.0)

    @property
    def u(self) -> Tensor:
        return self._eigen.u

    @property
    def sigma(self) -> Tensor:
        return self._eigen.sigma

    @property
    def sigma_all(self) -> Tensor:
        return self._eigen.sigma_all

    @property
    def rank_kept(self) -> int:
        return self.gram.shape[0]

    def solve(self, residuals: Tensor, damping: float = 0.0) -> Tensor:
        """c = (G + damping·I)⁻¹ r for r (rows,) float64, G = M Mᵀ; returns (rows,) float64.

        Iterative refinement on the certificate's factor of S = G − τI: each correction
        S⁻¹(r − (G + damping·I) c) shrinks the error by (τ + damping)/λ_min(S), tiny when
        the spectrum sits well above the cut. When the corrections do not fall below
        ``REFINEMENT_TOLERANCE`` of c within ``MAX_REFINEMENTS``, or shrink by less than
        ``SLOW_CONTRACTION`` per step, G + damping·I is factorised instead.
        """
        system = self.gram if damping == 0 else self.gram + damping * _identity_like(self.gram)
        solve_shifted = lambda v: torch.cholesky_solve(v.unsqueeze(1), self.certificate.factor).squeeze(1)  # noqa: E731
        solution = solve_shifted(residuals)
        previous = float("inf")
        for _ in range(MAX_REFINEMENTS):
            correction = solve_shifted(residuals - system @ solution)
            solution = solution + correction
            size = float(correction.norm())
            if size <= REFINEMENT_TOLERANCE * float(solution.norm()):
                return solution
            if size > SLOW_CONTRACTION * previous:
                break
            previous = size
        return torch.cholesky_solve(residuals.unsqueeze(1), torch.linalg.cholesky(system)).squeeze(1)


def _identity_like(square: Tensor) -> Tensor:
    return torch.eye(square.shape[0], dtype=square.dtype, device=square.device)


def certify_nothing_cut(gram: Tensor, rtol_used: float) -> GramCertificate | None:
    """A proof that every eigenvalue of the Gram matrix G (n, n) exceeds (rtol_used·σ_max)², or None.

    λ_max ≤ U = min(‖G‖_∞, ‖G‖_F), inflated to cover the rounding of these sums. A Cholesky
    factorisation of G − τI with τ = rtol_used²·U + s·tr(G), s = 4(n + 2)ε, that succeeds in
    floating point proves G − rtol_used²·U·I positive definite: the extra s·tr(G) exceeds the
    factorisation's backward error (Rump, BIT 2006) and the error of an eigh of G, so the eigh
    route would keep every value too. None proves nothing: the caller takes eigh.
    """
    slack = 4 * (gram.shape[0] + 2) * FLOAT64_EPS
    row_sums = float(gram.abs().sum(dim=1).max())
    upper = min(row_sums, float(torch.linalg.matrix_norm(gram))) * (1 + slack)
    shift = rtol_used**2 * upper + slack * float(gram.diagonal().sum())
    factor, info = torch.linalg.cholesky_ex(gram - shift * _identity_like(gram))
    return GramCertificate(shift, factor) if int(info) == 0 else None


@_solver("gram")
def gram_solver(op: JacobianOperator, k: int, rtol: float, options: SolverOptions) -> Spectrum:
    """M Mᵀ (rows × rows, float64); λ = σ²; V is never formed.

    When k ≥ rows and ``certify_nothing_cut`` proves that no σ falls below the cut, the
    step needs no eigendecomposition (``CertifiedGramSpectrum``); otherwise eigh.
    """
    gram = op.gram()
    rtol_used = max(rtol, _eig_floor(gram.shape[0]))
    certificate = certify_nothing_cut(gram, rtol_used) if k >= gram.shape[0] else None
    if certificate is not None:
        return CertifiedGramSpectrum(gram, certificate, rtol_used)
    u, sigma, floor = _gram_eigh(gram)
    return _truncate(u, sigma, None, k, rtol, floor)


@_solver("torch")
def torch_solver(op: JacobianOperator, k: int, rtol: float, options: SolverOptions) -> Spectrum:
    """Full thin SVD of the materialised M in float64 (the reference path)."""
    u, sigma, vh = torch.linalg.svd(op.dense().to(torch.float64), full_matrices=False)
    return _truncate(u, sigma, vh.T, k, rtol, _svd_floor(op))


def _range_finder(op: JacobianOperator, width: int, power_iterations: int) -> Tensor:
    """Orthonormal Q (rows, width) approximately spanning the range of M."""
    omega = torch.randn(op.shape[1], width, dtype=op.dtype, device=op.device)
    q = torch.linalg.qr(op.matmul(omega).to(torch.float64)).Q
    for _ in range(power_iterations):
        z = torch.linalg.qr(op.rmatmul(q).to(torch.float64)).Q
        q = torch.linalg.qr(op.matmul(z).to(torch.float64)).Q
    return q


def _sketch(op: JacobianOperator, k: int, options: SolverOptions) -> tuple[Tensor, Tensor]:
    """(Q, Qᵀ M) with Q (rows, l), l = min(k + oversampling, rows, cols)."""
    width = min(k + options.oversampling, *op.shape)
    q = _range_finder(op, width, options.power_iterations)
    return q, op.rmatmul(q).to(torch.float64).T


@_solver("randomized")
def randomized_solver(op: JacobianOperator, k: int, rtol: float, options: SolverOptions) -> Spectrum:
    """Randomized SVD: range finder with power iterations, then SVD of Qᵀ M."""
    q, projected = _sketch(op, k, options)
    u_small, sigma, vh = torch.linalg.svd(projected, full_matrices=False)
    return _truncate(q @ u_small, sigma, vh.T, k, rtol, _svd_floor(op))


@_solver("randomized_v2")
def randomized_eig_solver(op: JacobianOperator, k: int, rtol: float, options: SolverOptions) -> Spectrum:
    """Randomized range finder, then eigh of the sketch's small Gram matrix (Qᵀ M)(Qᵀ M)ᵀ."""
    q, projected = _sketch(op, k, options)
    w, sigma, floor = _gram_eigh(projected @ projected.T)
    spectrum = _truncate(w, sigma, None, k, rtol, floor)
    v = projected.T @ spectrum.u / spectrum.sigma
    return Spectrum(q @ spectrum.u, spectrum.sigma, v, spectrum.sigma_all, spectrum.rtol_used)


@_solver("scipy")
def scipy_solver(op: JacobianOperator, k: int, rtol: float, options: SolverOptions) -> Spectrum:
    """``scipy.sparse.linalg.svds`` (ARPACK, tol=0) for k < min(rows, cols); full LAPACK SVD otherwise."""
    import scipy.linalg
    import scipy.sparse.linalg

    matrix = op.dense().to(torch.float64).cpu().numpy()
    if k >= min(matrix.shape) - 1:
        u, sigma, vh = scipy.linalg.svd(matrix, full_matrices=False)
    else:
        u, sigma, vh = scipy.sparse.linalg.svds(matrix, k=k, tol=0, random_state=np.random.default_rng(0))
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(op.device)  # noqa: E731
    return _truncate(as_tensor(u), as_tensor(sigma), as_tensor(vh.T), k, rtol, _svd_floor(op))


@_solver("lobpcg")
def lobpcg_solver(op: JacobianOperator, k: int, rtol: float, options: SolverOptions) -> Spectrum:
    """``torch.lobpcg`` for the top k eigenpairs of the smaller of MMᵀ and MᵀM.

    LOBPCG needs the matrix size to be at least 3·k; smaller problems use eigh.
    """
    rows, cols = op.shape
    use_gram = rows <= cols
    dense64 = None if use_gram else op.dense().to(torch.float64)
    matrix = op.gram() if use_gram else dense64.T @ dense64
    size = matrix.shape[0]
    wanted = min(k, size)
    if size < 3 * wanted:
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    else:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)
        start = torch.randn(size, wanted, dtype=torch.float64, device=matrix.device)
        torch.random.set_rng_state(generator_state)
        eigenvalues, eigenvectors = torch.lobpcg(matrix, k=wanted, X=start, largest=True, tol=1e-13, niter=2000)
    sigma = eigenvalues.clamp(min=0).sqrt()
    if use_gram:
        return _truncate(eigenvectors, sigma, None, k, rtol, _eig_floor(size))
    spectrum = _truncate(eigenvectors, sigma, None, k, rtol, _eig_floor(size))
    u = dense64 @ spectrum.u / spectrum.sigma
    return Spectrum(u, spectrum.sigma, spectrum.u, spectrum.sigma_all, spectrum.rtol_used)


SVD_MODES = ("auto", *SOLVERS)


def resolve_mode(mode: str, shape: tuple[int, int], rtol: float) -> str:
    """The solver "auto" stands for on this shape; other modes are returned unchanged."""
    if mode != "auto":
        return mode
    rows, cols = shape
    return "gram" if rows <= cols and rtol >= GRAM_RTOL_LIMIT else "torch"


def truncated_spectrum(
    op: JacobianOperator, mode: str, k: int, rtol: float, options: SolverOptions = SolverOptions()
) -> Spectrum:
    """The truncated SVD of M by the named solver ("auto" resolved by shape and rtol)."""
    return SOLVERS[resolve_mode(mode, op.shape, rtol)](op, k, rtol, options)


def pinv_direction(spectrum: Spectrum, op: JacobianOperator, residuals: Tensor, damping: float = 0.0) -> Tensor:
    """M⁺ r for residuals r (rows,), shape (cols,), in the operator's dtype.

    With ``damping`` λ > 0 each kept σ contributes σ/(σ² + λ) instead of 1/σ
    (Tikhonov filtering; λ = 0 is the exact truncated pseudoinverse).
    """
    if isinstance(spectrum, CertifiedGramSpectrum):
        return op.rmatmul(spectrum.solve(residuals.to(torch.float64), damping))
    sigma = spectrum.sigma
    projected = spectrum.u.T @ residuals.to(torch.float64)
    inverse_sigma = sigma / (sigma**2 + damping) if damping > 0 else 1.0 / sigma
    if spectrum.v is not None:
        return (spectrum.v @ (inverse_sigma * projected)).to(op.dtype)
    return op.rmatmul(spectrum.u @ (inverse_sigma / sigma * projected))
