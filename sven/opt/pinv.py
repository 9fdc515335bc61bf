"""Truncated pseudoinverse solvers, one per ``svd_mode``, behind one signature.

Every solver takes a Jacobian operator M (rows × cols) and returns a
``sven.opt.spectrum.Spectrum``: at most ``k`` singular values, only those with
σ > max(rtol, floor)·σ_max where ``floor`` is the route's numerical zero. The
spectrum then applies M⁺ (or its Tikhonov-filtered version) to the residuals
(``Spectrum.direction``). All small dense algebra runs in float64.

Modes: "torch" (full SVD of M, the reference), "lq" (QR of the tall one of M, Mᵀ by chunks, then
the SVD of its small triangular factor: σ to SVD accuracy without a full SVD of M), and five
modes on the smaller side S of M — M Mᵀ when rows ≤ cols, Mᵀ M otherwise (``sven.opt.sides``),
which never form M on the Gram engine when rows ≤ cols: "gram" (exact top-k eigenpairs of S, or
no eigendecomposition at all when a Cholesky certificate proves nothing is cut), "randomized"
(range finder with oversampling and power iterations, Rayleigh–Ritz), "randomized_v2"
(Nyström: eigendecomposition of the sketch S Ω), "scipy" (ARPACK ``eigsh``) and "lobpcg"
(``torch.lobpcg``), and "cg": the uncut damped step (M Mᵀ + λI)⁻¹ r by Cholesky, or matrix-free by
preconditioned conjugate gradients when the Gram matrix exceeds ``gram_memory`` (``sven.opt.matrix_free``).
"auto" (``resolve_mode``) is "gram" unless the step is undamped and rtol lies below what the squared
spectrum resolves, then "lq" — or "cg" for a damped step keeping every row whose Gram matrix does not fit.
The randomized modes draw their test
matrices from a ``torch.Generator`` the caller owns (``Sven`` keeps one and saves it in its
``state_dict``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sven.cost import gram_fits
from sven.jacobian.operator import JacobianOperator
from sven.opt.eigen import (
    EigenRoutine,
    SolverOptions,
    arpack_eigh,
    exact_eigh,
    lobpcg_eigh,
    nystrom_eigh,
    randomized_eigh,
)
from sven.opt.matrix_free import normal_equation_solver
from sven.opt.sides import smaller_side
from sven.opt.spectrum import (
    Spectrum,
    certify_nothing_cut,
    effective_rtol,
    resolves,
    squared_floor,
    svd_floor,
    truncate,
)

__all__ = ["SOLVERS", "SVD_MODES", "SolverOptions", "resolve_mode", "truncated_spectrum"]

R_FACTOR_CHUNK_ELEMENTS = 2**23
"""float64 elements of one chunk of the tall matrix the "lq" route factorises (64 MiB)."""

Solver = Callable[[JacobianOperator, int, float, SolverOptions, "torch.Generator | None", float], Spectrum]
"""(M, k, rtol, options, generator, damping: the smallest λ the step may use) → the truncated spectrum."""
SOLVERS: dict[str, Solver] = {}


def _solver(name: str) -> Callable[[Solver], Solver]:
    def register(fn: Solver) -> Solver:
        SOLVERS[name] = fn
        return fn

    return register


@_solver("gram")
def gram_solver(op: JacobianOperator, k: int, rtol: float, options: SolverOptions,
                generator: torch.Generator | None, damping: float) -> Spectrum:
    """Exact top-k eigenpairs of the smaller side S (float64); λ = σ².

    With k ≥ the side's size, when ``certify_nothing_cut`` proves that no σ falls below the cut
    (or a damped step cuts nothing), the step needs no eigendecomposition, only a Cholesky solve of
    the side (``Side.certified``).
    """
    side = smaller_side(op)
    if k >= min(op.shape):
        gram = side.matrix
        trace = float(gram.diagonal().sum())
        floor = squared_floor(gram.shape[0], damping, trace)
        certificate = certify_nothing_cut(gram, effective_rtol(rtol, floor), trace)
        if certificate is not None:
            return side.certified(certificate, rtol, floor)
    return side.eigen_spectrum(*exact_eigh(side.matrix, k, options, generator), k, rtol, damping)


def _side_solver(name: str, routine: EigenRoutine, summary: str) -> Solver:
    """Register the solver that runs ``routine`` on the smaller side of M."""

    def solve(op: JacobianOperator, k: int, rtol: float, options: SolverOptions,
              generator: torch.Generator | None, damping: float) -> Spectrum:
        side = smaller_side(op)
        return side.eigen_spectrum(*routine(side.matrix, k, options, generator), k, rtol, damping)

    solve.__doc__ = summary
    return _solver(name)(solve)


_side_solver("randomized", randomized_eigh, "Range finder + Rayleigh–Ritz on the smaller side (``randomized_eigh``).")
_side_solver("randomized_v2", nystrom_eigh, "Nyström eigendecomposition of the sketch of the smaller side.")
_side_solver("scipy", arpack_eigh, "ARPACK ``eigsh`` on the smaller side (``arpack_eigh``).")
_side_solver("lobpcg", lobpcg_eigh, "``torch.lobpcg`` on the smaller side (``lobpcg_eigh``).")


@_solver("torch")
def torch_solver(op: JacobianOperator, k: int, rtol: float, options: SolverOptions,
                 generator: torch.Generator | None, damping: float) -> Spectrum:
    """Full thin SVD of the materialised M in float64 (the reference path)."""
    u, sigma, vh = torch.linalg.svd(op.dense().to(torch.float64), full_matrices=False)
    return truncate(u, sigma, vh.T, k, rtol, svd_floor(op.shape))


def r_factor(tall: Tensor) -> Tensor:
    """R (n, n) float64 of the QR of a tall (N, n) matrix, by chunks of rows: R ← R of [R; chunk] (TSQR).

    Memory: one float64 chunk of ``R_FACTOR_CHUNK_ELEMENTS``; Q is never formed.
    """
    n = tall.shape[1]
    chunk_rows = max(n, R_FACTOR_CHUNK_ELEMENTS // max(n, 1))
    r = torch.zeros(0, n, dtype=torch.float64, device=tall.device)
    for start in range(0, tall.shape[0], chunk_rows):
        r = torch.linalg.qr(torch.cat([r, tall[start:start + chunk_rows].to(torch.float64)]), mode="r").R
    return r


@_solver("lq")
def orthogonal_solver(op: JacobianOperator, k: int, rtol: float, options: SolverOptions,
                      generator: torch.Generator | None, damping: float) -> Spectrum:
    """σ to SVD accuracy without an SVD of M: the tall one T of M, Mᵀ is Q R, and R = W Σ Zᵀ (n × n).

    Z holds the smaller side's singular vectors (U when rows ≤ cols, V otherwise), so the cut is
    at ``svd_floor``; the step is applied like the smaller side's (Mᵀ U Σ⁻² Uᵀ r when rows ≤ cols).
    """
    side = smaller_side(op)
    _, sigma, zh = torch.linalg.svd(r_factor(side.tall))
    return side.spectrum(sigma, zh.T, k, rtol, svd_floor(op.shape))


_solver("cg")(normal_equation_solver)

SVD_MODES = ("auto", *SOLVERS)


def resolve_mode(mode: str, shape: tuple[int, int], rtol: float, damping: float = 0.0, k: int | None = None,
                 gram_memory: int | None = None) -> str:
    """The solver "auto" stands for; other modes are returned unchanged.

    ``damping`` is the smallest λ the step may use (0: undamped), ``k`` the smallest rank limit
    (None: no limit; a rank search passes 1). With λ > 0 the filtered σ/(σ² + λ) is well conditioned
    at any rtol, so the squared-spectrum route "gram" (on the smaller side) is taken — unless rows ≤ cols,
    k ≥ rows and three float64 rows × rows matrices exceed ``gram_memory`` bytes (``gram_fits``):
    then "cg", the matrix-free uncut solve. Undamped, "gram" is taken when it ``resolves`` rtol
    (rtol ≥ 10·√(n·ε), n = min(rows, cols)), and "lq" below.
    """
    if mode != "auto":
        return mode
    rows, cols = shape
    budget = SolverOptions().gram_memory if gram_memory is None else gram_memory
    if damping > 0 and rows <= cols and (k is None or k >= rows) and not gram_fits(rows, budget):
        return "cg"
    return "gram" if damping > 0 or resolves(rtol, min(shape)) else "lq"


def truncated_spectrum(
    op: JacobianOperator, mode: str, k: int, rtol: float, options: SolverOptions = SolverOptions(),
    generator: torch.Generator | None = None, damping: float = 0.0,
) -> Spectrum:
    """The truncated SVD of M by the named solver ("auto" resolved by shape, rtol and ``damping``).

    ``generator`` feeds the randomized modes (None: torch's global generator); ``damping`` is
    the smallest λ the step may use.
    """
    name = resolve_mode(mode, op.shape, rtol, damping, k, options.gram_memory)
    return SOLVERS[name](op, k, rtol, options, generator, damping)
