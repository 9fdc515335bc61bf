"""The two symmetric sides of M (rows × cols) whose eigenpairs give its SVD, and the smaller one of them.

Rows ≤ cols: the Gram matrix M Mᵀ (rows × rows) — eigenvectors are U, σ = √λ, V is never formed
(the step is Mᵀ c through ``op.rmatmul``). Rows > cols: Mᵀ M (cols × cols) from the materialised
M (rows·cols ≤ rows² is then small) — eigenvectors are V, and U = M V / σ is never formed either (the step
is V diag(1/(σ² + λ)) Vᵀ Mᵀ r, ``ColumnSpectrum``). Either way σ is squared, so an
undamped cut never goes below ``eig_floor`` of the side's size (``squared_floor``). When nothing is
cut, either side is solved by Cholesky instead (``Side.certified``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from sven.jacobian.operator import JacobianOperator
from sven.opt.basis import Basis, as_basis
from sven.opt.lapack import column_gram
from sven.opt.spectrum import (
    CertifiedGramSpectrum,
    GramCertificate,
    Spectrum,
    TruncatedSpectrum,
    keep_leading,
    squared_floor,
)


class Side(ABC):
    """One side of M: ``matrix`` (n, n) float64 and how its eigen- or singular vectors become M's spectrum."""

    def __init__(self, op: JacobianOperator) -> None:
        self.op = op

    @property
    @abstractmethod
    def matrix(self) -> Tensor:
        """The side's Gram matrix (n, n), float64."""

    @property
    @abstractmethod
    def tall(self) -> Tensor:
        """Mᵀ or M, whichever has n columns: its right singular vectors are this side's."""

    @abstractmethod
    def spectrum(self, sigma: Tensor, vectors: Tensor | Basis, k: int, rtol: float, floor: float,
                 sigma_all: Tensor | None = None, damped: bool = False) -> Spectrum:
        """M's truncated spectrum from singular values ``sigma`` (m,) descending and this side's vectors (n, m).

        ``damped``: every step from it uses a λ that resolves (``squared_floor`` is 0), so σ = 0 directions
        may be kept (``keep_leading``'s ``keep_zero``).
        """

    @abstractmethod
    def certified(self, certificate: GramCertificate, rtol: float, floor: float) -> Spectrum:
        """M's spectrum when ``certificate`` proves that ``matrix`` has no σ below the cut: a Cholesky solve."""

    def eigen_spectrum(self, eigenvalues: Tensor, eigenvectors: Tensor | Basis, k: int, rtol: float,
                       damping: float) -> Spectrum:
        """M's truncated spectrum from eigenpairs of ``matrix``: σ = √λ, cut at ``squared_floor`` or above.

        ``eigenvalues`` (n',) ascending, the last m belonging to ``eigenvectors`` (n, m); ``damping``:
        the smallest λ the step may use.
        """
        vectors = as_basis(eigenvectors)
        sigma = eigenvalues.flip(0).clamp(min=0).sqrt()
        size, found = vectors.shape
        largest = float(eigenvalues.max()) if found and damping > 0 else 0.0
        floor = squared_floor(size, damping, largest)
        sigma_all = None if found == sigma.numel() else sigma
        return self.spectrum(sigma[:found], vectors.reversed(), k, rtol, floor, sigma_all, floor == 0.0)


class RowSide(Side):
    """M Mᵀ (rows, rows): vectors are U; V stays implicit."""

    @property
    def matrix(self) -> Tensor:
        return self.op.gram()

    @property
    def tall(self) -> Tensor:
        return self.op.dense().T

    def spectrum(self, sigma: Tensor, vectors: Tensor | Basis, k: int, rtol: float, floor: float,
                 sigma_all: Tensor | None = None, damped: bool = False) -> TruncatedSpectrum:
        return keep_leading(vectors, sigma, None, k, rtol, floor, sigma_all, keep_zero=damped)

    def certified(self, certificate: GramCertificate, rtol: float, floor: float) -> Spectrum:
        return CertifiedGramSpectrum(self.matrix, certificate, rtol, floor)


class ColumnSide(Side):
    """Mᵀ M (cols, cols) from the materialised M: vectors are V, and U = M V / σ."""

    @cached_property
    def dense64(self) -> Tensor:
        return self.op.dense().to(torch.float64)

    @cached_property
    def matrix(self) -> Tensor:
        return column_gram(self.dense64)

    @property
    def tall(self) -> Tensor:
        """M itself, float64: the one materialisation the step's direction reuses (``dense64``)."""
        return self.dense64

    def transposed_product(self, residuals: Tensor) -> Tensor:
        """Mᵀ r (cols,) float64 for r (rows,)."""
        return self.dense64.T @ residuals.to(torch.float64)

    def spectrum(self, sigma: Tensor, vectors: Tensor | Basis, k: int, rtol: float, floor: float,
                 sigma_all: Tensor | None = None, damped: bool = False) -> ColumnSpectrum:
        """U = M V / σ needs σ > 0: zeros are dropped even when damped (they weigh σ/(σ² + λ) = 0)."""
        right = keep_leading(vectors, sigma, None, k, rtol, floor, sigma_all)
        return ColumnSpectrum(self, right.u, right.sigma, right.sigma_all, right.rtol_used)

    def certified(self, certificate: GramCertificate, rtol: float, floor: float) -> Spectrum:
        return CertifiedColumnSpectrum(self, certificate, rtol, floor)


@dataclass
class ColumnSpectrum(Spectrum):
    """M's kept spectrum from the right singular vectors ``v`` (cols, r) and σ > 0 (r,), float64.

    M⁺r = V diag(σ/(σ² + λ)) Uᵀ r with U = M V / σ is V diag(1/(σ² + λ)) Vᵀ (Mᵀ r): one product Mᵀ r
    (rows·cols) instead of forming U (rows·cols·r).
    """

    side: ColumnSide
    v: Basis
    sigma: Tensor
    sigma_all: Tensor
    rtol_used: float

    def direction(self, op: JacobianOperator, residuals: Tensor, damping: float = 0.0) -> Tensor:
        projected = self.v.project(self.side.transposed_product(residuals))
        return self.v.combine(projected / (self.sigma**2 + damping)).to(op.dtype)

    def leading(self, rank: int) -> ColumnSpectrum:
        return ColumnSpectrum(self.side, self.v.columns(rank), self.sigma[:rank], self.sigma_all, self.rtol_used)


class CertifiedColumnSpectrum(CertifiedGramSpectrum):
    """Mᵀ M (cols, cols) proved to have every σ above the cut: M⁺r = (Mᵀ M)⁻¹ Mᵀ r, damped (Mᵀ M + λI)⁻¹ Mᵀ r.

    A Cholesky solve of the cols × cols system instead of its eigendecomposition; eigh only for diagnostics.
    """

    def __init__(self, side: ColumnSide, certificate: GramCertificate, rtol: float, floor: float) -> None:
        super().__init__(side.matrix, certificate, rtol, floor)
        self.side = side

    @cached_property
    def eigen(self) -> ColumnSpectrum:
        """The eigh route's spectrum of Mᵀ M."""
        eigenvalues, vectors = torch.linalg.eigh(self.gram)
        return self.side.spectrum(eigenvalues.flip(0).clamp(min=0).sqrt(), vectors.flip(1), self.gram.shape[0],
                                  self.rtol, self.floor)

    def direction(self, op: JacobianOperator, residuals: Tensor, damping: float = 0.0) -> Tensor:
        return self.solve(self.side.transposed_product(residuals), damping).to(op.dtype)


def smaller_side(op: JacobianOperator) -> Side:
    """The cheaper exact side: M Mᵀ when rows ≤ cols, else Mᵀ M."""
    rows, cols = op.shape
    return RowSide(op) if rows <= cols else ColumnSide(op)
