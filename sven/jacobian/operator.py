"""The small linear-operator interface every Jacobian engine produces.

An operator stands for a matrix M of shape (rows, cols): rows are samples (or
micro-batch groups), cols are the parameters it covers, flattened in the
wrapper's parameter order. Solvers in ``sven.opt.pinv`` talk to M only through
``gram``, ``matmul``, ``rmatmul`` and ``dense``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cached_property

import torch
from torch import Tensor

from sven.jacobian.checks import all_finite


class JacobianOperator(ABC):
    """A linear operator over a Jacobian M of shape (rows, cols)."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def gram(self) -> Tensor:
        """M Mᵀ, shape (rows, rows), float64; computed once per operator."""
        return self._cached_gram

    @cached_property
    def _cached_gram(self) -> Tensor:
        return self._compute_gram()

    @abstractmethod
    def _compute_gram(self) -> Tensor:
        """M Mᵀ, shape (rows, rows), float64 (called once; ``gram()`` caches it)."""

    @abstractmethod
    def rmatmul(self, u: Tensor) -> Tensor:
        """Mᵀ u for u of shape (rows,) or (rows, m); returns (cols,) or (cols, m).

        ``u`` is cast to the operator's dtype; the result has the operator's dtype.
        """

    def matmul(self, v: Tensor) -> Tensor:
        """M v for v of shape (cols,) or (cols, m); returns (rows,) or (rows, m).

        ``v`` is cast to the operator's dtype; the result has the operator's dtype.
        """
        return self.dense() @ v.to(self.dtype)

    @abstractmethod
    def dense(self) -> Tensor:
        """M itself, shape (rows, cols), in the operator's dtype (may materialise it)."""

    def dense_columns(self, columns: Tensor) -> Tensor:
        """M[:, columns] (rows, n) for sorted flat indices (n,); this default materialises M, factored operators
        override it."""
        return self.dense()[:, columns]

    def gram_matmul(self, u: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """M Mᵀ u for u (rows,) or (rows, m), float64, without forming M Mᵀ.

        Factored operators multiply in ``dtype`` (the operator's own dtype is cheaper, float64 exact to ε);
        this default is ``matmul(rmatmul(u))`` in the operator's dtype.
        """
        return self.matmul(self.rmatmul(u)).to(torch.float64)

    def masked_gram(self, columns: Tensor) -> Tensor:
        """M_S M_Sᵀ, shape (rows, rows), float64, for the columns S chosen by a boolean mask (cols,).

        This default materialises M; factored operators override it.
        """
        chosen = self.dense()[:, columns].to(torch.float64)
        return chosen @ chosen.T


    def nonfinite_rows(self) -> Tensor:
        """Boolean mask (rows,): rows of M holding a NaN or Inf."""
        return ~torch.isfinite(self.gram().diagonal())

    def all_rows_finite(self) -> bool:
        """Whether no row of M holds a NaN or Inf (``nonfinite_rows`` says which); factored operators test cheaper."""
        return not bool(self.nonfinite_rows().any())


class DenseJacobian(JacobianOperator):
    """An operator over an explicitly stored Jacobian (rows, cols)."""

    def __init__(self, matrix: Tensor) -> None:
        if matrix.dim() != 2:
            raise ValueError(f"DenseJacobian needs a 2-D matrix; got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.shape = (matrix.shape[0], matrix.shape[1])
        self.dtype = matrix.dtype
        self.device = matrix.device


    def _compute_gram(self) -> Tensor:
        m64 = self.matrix.to(torch.float64)
        return m64 @ m64.T

    def masked_gram(self, columns: Tensor) -> Tensor:
        chosen = self.matrix[:, columns].to(torch.float64)
        return chosen @ chosen.T

    def rmatmul(self, u: Tensor) -> Tensor:
        return self.matrix.T @ u.to(self.dtype)

    def gram_matmul(self, u: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        matrix = self.matrix.to(dtype)
        return (matrix @ (matrix.T @ u.to(dtype))).to(torch.float64)

    def matmul(self, v: Tensor) -> Tensor:
        return self.matrix @ v.to(self.dtype)

    def dense(self) -> Tensor:
        return self.matrix

    def nonfinite_rows(self) -> Tensor:
        return ~torch.isfinite(self.matrix).all(dim=1)


class RowTransformedJacobian(JacobianOperator):
    """R·J for a small (rows_out, rows_in) matrix R over another operator J — or diag(s)·J for a vector s (rows_in,).

    Micro-batch averaging and the residual power ``kappa`` both act on the rows of
    the per-sample loss Jacobian, so ``(R J)(R J)ᵀ = R (J Jᵀ) Rᵀ`` and
    ``(R J)ᵀ c = Jᵀ (Rᵀ c)`` never touch the parameter dimension. A row scaling alone
    (κ ≠ 2 without micro-batches) is kept as the vector s: O(rows) and O(rows²) work
    where a dense diag(s) would cost rows² per product and rows³ per Gram matrix.
    """

    def __init__(self, base: JacobianOperator, row_map: Tensor) -> None:
        rows_in = row_map.shape[-1] if row_map.dim() else -1
        if row_map.dim() not in (1, 2) or rows_in != base.shape[0]:
            raise ValueError(
                f"row_map must have shape (rows_out, {base.shape[0]}) or ({base.shape[0]},); got {tuple(row_map.shape)}"
            )
        self.base = base
        self.row_map = row_map.to(torch.float64)
        self.diagonal = row_map.dim() == 1
        self.shape = (row_map.shape[0], base.shape[1])
        self.dtype = base.dtype
        self.device = base.device

    def _left(self, values: Tensor) -> Tensor:
        """R · values for values (rows_in,) or (rows_in, m), float64."""
        values = values.to(torch.float64)
        if not self.diagonal:
            return self.row_map @ values
        return self.row_map * values if values.dim() == 1 else self.row_map[:, None] * values

    def _sandwich(self, gram: Tensor) -> Tensor:
        """R · G · Rᵀ for a (rows_in, rows_in) G."""
        return self._left(self._left(gram).T).T

    def _compute_gram(self) -> Tensor:
        return self._sandwich(self.base.gram())

    def masked_gram(self, columns: Tensor) -> Tensor:
        return self._sandwich(self.base.masked_gram(columns))

    def rmatmul(self, u: Tensor) -> Tensor:
        u = u.to(torch.float64)
        if self.diagonal:
            return self.base.rmatmul(self.row_map * u if u.dim() == 1 else self.row_map[:, None] * u)
        return self.base.rmatmul(self.row_map.T @ u)

    def matmul(self, v: Tensor) -> Tensor:
        return self._left(self.base.matmul(v)).to(self.dtype)

    def gram_matmul(self, u: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """R (G_base (Rᵀ u)), float64; the base's products in ``dtype``."""
        return self._left(self.base.gram_matmul(self._left_transposed(u), dtype))

    def _left_transposed(self, values: Tensor) -> Tensor:
        """Rᵀ · values for values (rows_out,) or (rows_out, m), float64."""
        values = values.to(torch.float64)
        if not self.diagonal:
            return self.row_map.T @ values
        return self._left(values)

    def dense(self) -> Tensor:
        return self._left(self.base.dense()).to(self.dtype)

    def all_rows_finite(self) -> bool:
        """A finite R and a finite base prove it (one sum each); the rows are examined only when not."""
        return (self.base.all_rows_finite() and all_finite(self.row_map)) or super().all_rows_finite()

    def nonfinite_rows(self) -> Tensor:
        if self.diagonal:
            return (self.base.nonfinite_rows() & (self.row_map != 0)) | ~torch.isfinite(self.row_map)
        uses_bad_row = ((self.row_map != 0) & self.base.nonfinite_rows()).any(dim=1)
        return uses_bad_row | ~torch.isfinite(self.row_map).all(dim=1)
