"""Truncated pseudoinverse solvers, one per ``svd_mode``, behind one signature.

Every solver takes a Jacobian operator M (rows × cols) and returns a
``sven.opt.spectrum.Spectrum``: at most ``k`` singular values, only those with
σ > max(rtol, floor)·σ_max where ``floor`` is the route's numerical zero. The
spectrum then applies M⁺ (or its Tikhonov-filtered version) to the residuals
(``Spectrum.direction``). All small dense algebra runs in float64.

Modes: "torch" (full SVD of M, the reference), "gram" (eigh of M Mᵀ, exact and
cheap when rows ≤ cols), "randomized" (range finder + SVD of the projection),
"randomized_v2" (range finder + eigh of the sketch's Gram matrix), "scipy"
(``scipy.sparse.linalg.svds``), "lobpcg" (``torch.lobpcg`` on the smaller of
MᵀM and MMᵀ) and "auto" (the cheapest exact route for the shape: "gram" when
rows ≤ cols and rtol ≥ 1e-6, else "torch"; equal to "torch" up to round-off).
The randomized modes draw their test matrices from a ``torch.Generator`` the
caller owns (``Sven`` keeps one and saves it in its ``state_dict``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sven.jacobian.operator import JacobianOperator
from sven.opt.spectrum import (
    CertifiedGramSpectrum,
    Spectrum,
    TruncatedSpectrum,
    certify_nothing_cut,
    effective_rtol,
    eig_floor,
    gram_eigh,
    svd_floor,
    truncate,
)

GRAM_RTOL_LIMIT = 1e-6
"""Below this rtol the Gram route cannot resolve the cut; "auto" then takes an SVD of M."""
LOBPCG_SEED = 0
"""Seed of LOBPCG's start block: a fixed local generator, so its result never depends on global RNG state."""


@dataclass(frozen=True)
class SolverOptions:
    """Options of the randomized solvers (ignored by the others)."""

    oversampling: int = 5
    power_iterations: int = 1


Solver = Callable[[JacobianOperator, int, float, SolverOptions, "torch.Generator | None"], Spectrum]
SOLVERS: dict[str, Solver] = {}


def _solver(name: str) -> Callable[[Solver], Solver]:
    def register(fn: Solver) -> Solver:
        SOLVERS[name] = fn
        return fn

    return register


@_solver("gram")
def gram_solver(op: JacobianOperator, k: int, rtol: float, options: SolverOptions,
                generator: torch.Generator | None) -> Spectrum:
    """M Mᵀ (rows × rows, float64); λ = σ²; V is never formed.

    When k ≥ rows and ``certify_nothing_cut`` proves that no σ falls below the cut, the
    step needs no eigendecomposition (``CertifiedGramSpectrum``); otherwise eigh.
    """
    gram = op.gram()
    if k >= gram.shape[0]:
        certificate = certify_nothing_cut(gram, effective_rtol(rtol, eig_floor(gram.shape[0])))
        if certificate is not None:
            return CertifiedGramSpectrum(gram, certificate, rtol)
    return gram_eigh(gram, k, rtol)


@_solver("torch")
def torch_solver(op: JacobianOperator, k: int, rtol: float, options: SolverOptions,
                 generator: torch.Generator | None) -> Spectrum:
    """Full thin SVD of the materialised M in float64 (the reference path)."""
    u, sigma, vh = torch.linalg.svd(op.dense().to(torch.float64), full_matrices=False)
    return truncate(u, sigma, vh.T, k, rtol, svd_floor(op.shape))


def _range_finder(op: JacobianOperator, width: int, power_iterations: int, generator: torch.Generator | None) -> Tensor:
    """Orthonormal Q (rows, width) approximately spanning the range of M."""
    omega = torch.randn(op.shape[1], width, dtype=op.dtype, device=op.device, generator=generator)
    q = torch.linalg.qr(op.matmul(omega).to(torch.float64)).Q
    for _ in range(power_iterations):
        z = torch.linalg.qr(op.rmatmul(q).to(torch.float64)).Q
        q = torch.linalg.qr(op.matmul(z).to(torch.float64)).Q
    return q


def _sketch(op: JacobianOperator, k: int, options: SolverOptions, generator: torch.Generator | None
            ) -> tuple[Tensor, Tensor]:
    """(Q, Qᵀ M) with Q (rows, l), l = min(k + oversampling, rows, cols)."""
    width = min(k + options.oversampling, *op.shape)
    q = _range_finder(op, width, options.power_iterations, generator)
    return q, op.rmatmul(q).to(torch.float64).T


@_solver("randomized")
def randomized_solver(op: JacobianOperator, k: int, rtol: float, options: SolverOptions,
                      generator: torch.Generator | None) -> Spectrum:
    """Randomized SVD: range finder with power iterations, then SVD of Qᵀ M."""
    q, projected = _sketch(op, k, options, generator)
    u_small, sigma, vh = torch.linalg.svd(projected, full_matrices=False)
    return truncate(q @ u_small, sigma, vh.T, k, rtol, svd_floor(op.shape))


@_solver("randomized_v2")
def randomized_eig_solver(op: JacobianOperator, k: int, rtol: float, options: SolverOptions,
                          generator: torch.Generator | None) -> Spectrum:
    """Randomized range finder, then eigh of the sketch's small Gram matrix (Qᵀ M)(Qᵀ M)ᵀ."""
    q, projected = _sketch(op, k, options, generator)
    spectrum = gram_eigh(projected @ projected.T, k, rtol)
    v = projected.T @ spectrum.u / spectrum.sigma
    return TruncatedSpectrum(q @ spectrum.u, spectrum.sigma, v, spectrum.sigma_all, spectrum.rtol_used)


@_solver("scipy")
def scipy_solver(op: JacobianOperator, k: int, rtol: float, options: SolverOptions,
                 generator: torch.Generator | None) -> Spectrum:
    """``scipy.sparse.linalg.svds`` (ARPACK, tol=0) for k < min(rows, cols); full LAPACK SVD otherwise."""
    import scipy.linalg
    import scipy.sparse.linalg

    matrix = op.dense().to(torch.float64).cpu().numpy()
    if k >= min(matrix.shape) - 1:
        u, sigma, vh = scipy.linalg.svd(matrix, full_matrices=False)
    else:
        u, sigma, vh = scipy.sparse.linalg.svds(matrix, k=k, tol=0, random_state=np.random.default_rng(0))
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(op.device)  # noqa: E731
    return truncate(as_tensor(u), as_tensor(sigma), as_tensor(vh.T), k, rtol, svd_floor(op.shape))


@_solver("lobpcg")
def lobpcg_solver(op: JacobianOperator, k: int, rtol: float, options: SolverOptions,
                  generator: torch.Generator | None) -> Spectrum:
    """``torch.lobpcg`` for the top k eigenpairs of the smaller of MMᵀ and MᵀM.

    LOBPCG needs the matrix size to be at least 3·k; smaller problems use eigh. Its start
    block comes from a local generator seeded with ``LOBPCG_SEED``.
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
        start_generator = torch.Generator(device=matrix.device).manual_seed(LOBPCG_SEED)
        start = torch.randn(size, wanted, dtype=torch.float64, device=matrix.device, generator=start_generator)
        eigenvalues, eigenvectors = torch.lobpcg(matrix, k=wanted, X=start, largest=True, tol=1e-13, niter=2000)
    spectrum = truncate(eigenvectors, eigenvalues.clamp(min=0).sqrt(), None, k, rtol, eig_floor(size))
    if use_gram:
        return spectrum
    u = dense64 @ spectrum.u / spectrum.sigma
    return TruncatedSpectrum(u, spectrum.sigma, spectrum.u, spectrum.sigma_all, spectrum.rtol_used)


SVD_MODES = ("auto", *SOLVERS)


def resolve_mode(mode: str, shape: tuple[int, int], rtol: float) -> str:
    """The solver "auto" stands for on this shape; other modes are returned unchanged."""
    if mode != "auto":
        return mode
    rows, cols = shape
    return "gram" if rows <= cols and rtol >= GRAM_RTOL_LIMIT else "torch"


def truncated_spectrum(
    op: JacobianOperator, mode: str, k: int, rtol: float, options: SolverOptions = SolverOptions(),
    generator: torch.Generator | None = None,
) -> Spectrum:
    """The truncated SVD of M by the named solver ("auto" resolved by shape and rtol).

    ``generator`` feeds the randomized modes (None: torch's global generator).
    """
    return SOLVERS[resolve_mode(mode, op.shape, rtol)](op, k, rtol, options, generator)
