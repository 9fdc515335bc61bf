"""Orthonormal columns V (n, m) in float64 that a spectrum applies, formed or not.

A step only ever needs Vᵀ x and V c. An eigendecomposition S = Q T Qᵀ (Householder
tridiagonalisation, then T = Z Λ Zᵀ) has V = Q Z; ``ReflectedBasis`` applies Q from its
reflectors instead of forming V, which skips LAPACK's back-transformation (2·n²·m flops, a third
of an eigh of a 256 × 256 matrix) for two reflector sweeps of one vector (4·n² flops) per use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor


class Basis(ABC):
    """Orthonormal columns V (n, m), float64."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]:
        """(n, m)."""

    @abstractmethod
    def project(self, x: Tensor) -> Tensor:
        """Vᵀ x: x (n,) or (n, j) → (m,) or (m, j)."""

    @abstractmethod
    def combine(self, c: Tensor) -> Tensor:
        """V c: c (m,) or (m, j) → (n,) or (n, j)."""

    @abstractmethod
    def columns(self, stop: int) -> Basis:
        """The first ``stop`` columns."""

    @abstractmethod
    def reversed(self) -> Basis:
        """The columns in reverse order."""

    @abstractmethod
    def dense(self) -> Tensor:
        """V itself (n, m)."""


@dataclass(frozen=True)
class DenseBasis(Basis):
    """V held as a tensor (n, m)."""

    matrix: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)

    def project(self, x: Tensor) -> Tensor:
        return self.matrix.T @ x

    def combine(self, c: Tensor) -> Tensor:
        return self.matrix @ c

    def columns(self, stop: int) -> DenseBasis:
        return DenseBasis(self.matrix[:, :stop])

    def reversed(self) -> DenseBasis:
        return DenseBasis(self.matrix.flip(1))

    def dense(self) -> Tensor:
        return self.matrix


def as_basis(vectors: Tensor | Basis) -> Basis:
    """``vectors`` as a Basis: a tensor (n, m) becomes a ``DenseBasis``."""
    return vectors if isinstance(vectors, Basis) else DenseBasis(vectors)


@dataclass(frozen=True)
class ReflectedBasis(Basis):
    """V = Q Z for S = Q T Qᵀ: ``reflectors`` (n − 1, n − 1) and ``tau`` (n − 1,) are LAPACK ``dsytrd``'s lower
    Householder vectors of Q (rows 1…n−1, columns 0…n−2 of its output), ``z`` (n, m) eigenvectors of T."""

    reflectors: Tensor
    tau: Tensor
    z: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.z.shape)

    def _apply_q(self, x: Tensor, transpose: bool) -> Tensor:
        """Q x or Qᵀ x for x (n,) or (n, j): Q = diag(1, Q̃), Q̃ the product of the reflectors."""
        columns = x.unsqueeze(1) if x.dim() == 1 else x
        out = columns.clone()
        out[1:] = torch.ormqr(self.reflectors, self.tau, columns[1:], transpose=transpose)
        return out.squeeze(1) if x.dim() == 1 else out

    def project(self, x: Tensor) -> Tensor:
        return self.z.T @ self._apply_q(x, transpose=True)

    def combine(self, c: Tensor) -> Tensor:
        return self._apply_q(self.z @ c, transpose=False)

    def columns(self, stop: int) -> ReflectedBasis:
        return ReflectedBasis(self.reflectors, self.tau, self.z[:, :stop])

    def reversed(self) -> ReflectedBasis:
        return ReflectedBasis(self.reflectors, self.tau, self.z.flip(1))

    def dense(self) -> Tensor:
        return self._apply_q(self.z, transpose=False)
