"""Top eigenpairs of a symmetric positive semi-definite float64 matrix S (n, n), one routine per solver.

Every routine has the signature ``(S, k, options, generator) -> (eigenvalues (n',), eigenvectors (n, m))``:
eigenvalues ascending, the last m of them belonging to the m eigenvectors, a tensor or a
``sven.opt.basis.Basis`` (m ≤ n' ≤ n; ``top_eigh`` returns all n values and the top k vectors);
``sven.opt.sides`` turns them into singular triplets of M. ``S`` is the smaller of M Mᵀ and Mᵀ M,
so the solvers never touch the (rows × cols) Jacobian itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sven.opt.basis import Basis, DenseBasis, ReflectedBasis
from sven.opt.lapack import torch_threads

START_SEED = 0
"""Seed of LOBPCG's start block and ARPACK's start vector: fixed, so neither depends on global RNG state."""


@dataclass(frozen=True)
class SolverOptions:
    """Options of the randomized solvers, and the memory budget of the Gram matrix (bytes, ``sven.opt.matrix_free``)."""

    oversampling: int = 5
    power_iterations: int = 1
    gram_memory: int = 2**29


EigenRoutine = Callable[[Tensor, int, SolverOptions, "torch.Generator | None"], tuple[Tensor, "Tensor | Basis"]]


def _lapack_error(routine: str, info: int) -> torch.linalg.LinAlgError:
    return torch.linalg.LinAlgError(f"LAPACK {routine} failed (info = {info})")


REFLECTED_EIGH_SIZE = 128
"""From this size on the CPU, ``top_eigh`` leaves the eigenvectors as reflectors and T's eigenvectors
(``ReflectedBasis``): one eigh + direction of a Gaussian Gram matrix, one thread, µs: n = 64: 393 (eigh) /
448 (reflected), 128: 1,635 / 1,354, 256: 9,063 / 5,135, 512: 51,025 / 23,569 (docs/GRAM_ENGINE.md)."""


def top_eigh(matrix: Tensor, k: int) -> tuple[Tensor, Basis]:
    """All n eigenvalues of S (n, n), ascending, and the eigenvectors (n, min(k, n)) of the largest: exact.

    From ``REFLECTED_EIGH_SIZE`` on the CPU: Householder tridiagonalisation S = Q T Qᵀ (``dsytrd``,
    4/3·n³), divide and conquer on T (``dstevd``), and the eigenvectors kept as Q Z
    (``ReflectedBasis``): neither all n (a full ``eigh``) nor the top k are back-transformed.
    scipy's LAPACK runs on torch's thread count (``sven.opt.lapack``). LAPACK's subset drivers
    (``dsyevr``/``dsyevx`` with an index range, ``dstemr`` for a subset) find the values by
    bisection and are slower here (docs/GRAM_ENGINE.md, "Top-k eigenpairs"). Below that size, or
    off the CPU, ``torch.linalg.eigh``.
    """
    n = matrix.shape[0]
    wanted = min(k, n)
    if n < REFLECTED_EIGH_SIZE or matrix.device.type != "cpu":
        values, vectors = torch.linalg.eigh(matrix)
        return values, DenseBasis(vectors[:, n - wanted:])
    import scipy.linalg.lapack as lapack

    with torch_threads():
        work = int(lapack.dsytrd_lwork(n, lower=1)[0])
        reflectors, diagonal, off_diagonal, tau, info = lapack.dsytrd(matrix.numpy(), lower=1, lwork=work)
        if info != 0:
            raise _lapack_error("dsytrd", info)
        values, vectors, info = lapack.dstevd(diagonal, off_diagonal, compute_v=1)
    if info != 0:
        raise _lapack_error("dstevd", info)
    top = torch.from_numpy(np.ascontiguousarray(vectors[:, n - wanted:]))
    return torch.from_numpy(values), ReflectedBasis(torch.from_numpy(reflectors)[1:, :-1], torch.from_numpy(tau), top)


def exact_eigh(matrix: Tensor, k: int, options: SolverOptions, generator: torch.Generator | None
               ) -> tuple[Tensor, Basis]:
    """``top_eigh``: the exact top-k eigenpairs."""
    return top_eigh(matrix, k)


def _range_finder(matrix: Tensor, width: int, options: SolverOptions, generator: torch.Generator | None) -> Tensor:
    """Orthonormal Q (n, width) spanning S^(q+1) Ω for a Gaussian Ω, re-orthonormalised after each power step."""
    omega = torch.randn(matrix.shape[0], width, dtype=matrix.dtype, device=matrix.device, generator=generator)
    q = torch.linalg.qr(matrix @ omega).Q
    for _ in range(options.power_iterations):
        q = torch.linalg.qr(matrix @ q).Q
    return q


def _sketch_width(matrix: Tensor, k: int, options: SolverOptions) -> int:
    return min(k + options.oversampling, matrix.shape[0])


def randomized_eigh(matrix: Tensor, k: int, options: SolverOptions, generator: torch.Generator | None
                    ) -> tuple[Tensor, Tensor]:
    """Randomized range finder (k + oversampling columns, power iterations), then Rayleigh–Ritz: eigh of Qᵀ S Q.

    Exact (up to round-off) when k + oversampling ≥ rank(S): Q then spans the range of S.
    """
    q = _range_finder(matrix, _sketch_width(matrix, k, options), options, generator)
    values, vectors = torch.linalg.eigh(q.T @ matrix @ q)
    return values, q @ vectors


def nystrom_eigh(matrix: Tensor, k: int, options: SolverOptions, generator: torch.Generator | None
                 ) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of the sketch Y = S Ω itself: the Nyström approximation Y (Ωᵀ Y)⁺ Yᵀ of S.

    Ω is the range finder's orthonormal basis (k + oversampling columns, power iterations). The
    stable form of Tropp et al. (2017): shift ν = n·ε·‖Y‖, C = chol(Ωᵀ(Y + νΩ)), F = (Y + νΩ) C⁻ᵀ,
    so that F Fᵀ approximates S + νI; eigh of Fᵀ F (l × l) = W Λ gives the eigenvalues Λ − ν and
    vectors F W Λ^(-1/2). Exact when k + oversampling ≥ rank(S).
    """
    omega = _range_finder(matrix, _sketch_width(matrix, k, options), options, generator)
    return nystrom_from_sketch(omega, matrix @ omega)


def nystrom_from_sketch(omega: Tensor, sketch: Tensor, roundoff: float | None = None) -> tuple[Tensor, Tensor]:
    """Eigenpairs (l,), (n, l) of the Nyström approximation Y (Ωᵀ Y)⁺ Yᵀ from an orthonormal Ω (n, l) and Y = S Ω.

    The stable form of Tropp et al. (2017), see ``nystrom_eigh``; eigenvalues ascending. ``roundoff``: the
    unit roundoff the sketch was computed in (default: its dtype's), which sets the shift ν.
    """
    roundoff = float(torch.finfo(sketch.dtype).eps) if roundoff is None else roundoff
    shift = omega.shape[0] * roundoff * float(torch.linalg.matrix_norm(sketch))
    shifted = sketch + shift * omega
    core = omega.T @ shifted
    factor = torch.linalg.cholesky((core + core.T) / 2)
    root = torch.linalg.solve_triangular(factor, shifted.T, upper=False).T
    values, small = torch.linalg.eigh(root.T @ root)
    return (values - shift).clamp(min=0), root @ small / values.clamp(min=shift).sqrt()


def lobpcg_eigh(matrix: Tensor, k: int, options: SolverOptions, generator: torch.Generator | None
                ) -> tuple[Tensor, Tensor | Basis]:
    """``torch.lobpcg`` (tol 1e-13) for the top k; it needs n ≥ 3k, smaller problems use ``top_eigh``.

    Its start block comes from a local generator seeded with ``START_SEED``.
    """
    size = matrix.shape[0]
    wanted = min(k, size)
    if size < 3 * wanted:
        return top_eigh(matrix, wanted)
    start_generator = torch.Generator(device=matrix.device).manual_seed(START_SEED)
    start = torch.randn(size, wanted, dtype=torch.float64, device=matrix.device, generator=start_generator)
    values, vectors = torch.lobpcg(matrix, k=wanted, X=start, largest=True, tol=1e-13, niter=2000)
    order = torch.argsort(values)
    return values[order], vectors[:, order]


def arpack_eigh(matrix: Tensor, k: int, options: SolverOptions, generator: torch.Generator | None
                ) -> tuple[Tensor, Tensor | Basis]:
    """``scipy.sparse.linalg.eigsh`` (ARPACK, tol 0, largest algebraic) while its Krylov space (2k + 1) is smaller
    than n; otherwise ARPACK would run a full Lanczos, and ``top_eigh`` gives the same pairs for less."""
    import scipy.sparse.linalg

    size = matrix.shape[0]
    if 2 * k + 1 >= size:
        return top_eigh(matrix, k)
    start = np.random.default_rng(START_SEED).standard_normal(size)
    values, vectors = scipy.sparse.linalg.eigsh(matrix.cpu().numpy(), k=k, which="LA", tol=0, v0=start)
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(matrix.device)  # noqa: E731
    return as_tensor(values), as_tensor(vectors)
