"""RMSProp scaling for Sven: a running average of squared mean Jacobian rows and the column-scaled Jacobian.

v ← α·v + (1 − α)·g², with g = Mᵀ1 / G (n,) the mean row of the residual Jacobian M
(G × n) — the gradient of mean(r), i.e. of the mean loss when kappa = 2 — defines the
column scale D = diag(1 / (√v + eps)). Sven's step is then ``(M D)⁺ r`` (pre-scaling,
the paper's: the pseudoinverse of the rescaled Jacobian applied as the update, like
RMSProp's g / √v) or ``D M⁺ r`` (post-scaling of the update).

``D (M D)⁺ r`` — the exact reparametrisation θ = D θ' — is deliberately not used: it
is invariant to D's overall scale and moves a parameter whose mean gradient is near zero
by about r / M_ij, which blew up cross-entropy training in the first epoch; ``(M D)⁺ r``
moves it by at most about r·√v_j / |M_ij|.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sven.jacobian.operator import JacobianOperator


def updated_square_average(square_avg: Tensor, gradient: Tensor, alpha: float) -> Tensor:
    """α·v + (1 − α)·g² for v, g (the mean Jacobian row Mᵀ1 / G) of the same shape (n,); returns a new tensor."""
    return alpha * square_avg + (1 - alpha) * gradient.to(square_avg.dtype) ** 2


def column_scale(square_avg: Tensor, eps: float) -> Tensor:
    """The RMSProp scale 1 / (√v + eps), shape of v."""
    return 1.0 / (square_avg.sqrt() + eps)


class ColumnScaledJacobian(JacobianOperator):
    """M·diag(s) for an operator M (rows, cols) and column scales s (cols,).

    ``rmatmul`` and ``matmul`` go through M's own products, so they stay cheap on
    the Gram engine. ``gram()`` = M diag(s²) Mᵀ has no factored form on the Gram
    engine's per-layer blocks (s is not a per-layer outer product), so it
    materialises M once through ``dense()`` (rows × cols memory) and works in float64.
    """

    def __init__(self, base: JacobianOperator, scale: Tensor) -> None:
        if scale.shape != (base.shape[1],):
            raise ValueError(f"scale must have shape ({base.shape[1]},) to match M's columns; got {tuple(scale.shape)}")
        self.base = base
        self.scale = scale
        self.shape = base.shape
        self.dtype = base.dtype
        self.device = base.device
        self._gram: Tensor | None = None

    @property
    def materialised(self) -> bool:
        return self.base.materialised

    def _scale_like(self, values: Tensor) -> Tensor:
        scale = self.scale.to(values.dtype)
        return scale if values.dim() == 1 else scale[:, None]

    def gram(self) -> Tensor:
        if self._gram is None:
            scaled = self.base.dense().to(torch.float64) * self.scale.to(torch.float64)
            self._gram = scaled @ scaled.T
        return self._gram

    def rmatmul(self, u: Tensor) -> Tensor:
        product = self.base.rmatmul(u)
        return product * self._scale_like(product)

    def matmul(self, v: Tensor) -> Tensor:
        return self.base.matmul(v.to(self.dtype) * self._scale_like(v.to(self.dtype)))

    def dense(self) -> Tensor:
        return self.base.dense() * self.scale.to(self.dtype)

    def nonfinite_rows(self) -> Tensor:
        return self.base.nonfinite_rows()
