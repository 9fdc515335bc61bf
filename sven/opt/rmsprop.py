"""RMSProp scaling for Sven: a running average of squared mean Jacobian rows and the column-scaled Jacobian.

v ← α·v + (1 − α)·g², with g = Mᵀ1 / G (n,) the mean row of the residual Jacobian M
(G × n) — the gradient of mean(r), i.e. of the mean loss when kappa = 2 — defines the
column scale D = diag(1 / (√v + eps)). Sven's step is then ``(M D)⁺ r`` (pre-scaling,
the paper's: the pseudoinverse of the rescaled Jacobian applied as the update, like
RMSProp's g / √v). Post-scaling (the paper's too) normalises the update by its own
running RMS instead: d = M⁺ r, v ← α·v + (1 − α)·d², step ``d / (√v + eps)``.

``D (M D)⁺ r`` — the exact reparametrisation θ = D θ' — is deliberately not used: it
is invariant to D's overall scale and moves a parameter whose mean gradient is near zero
by about r / M_ij, which blew up cross-entropy training in the first epoch; ``(M D)⁺ r``
moves it by at most about r·√v_j / |M_ij|.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sven.jacobian.operator import JacobianOperator

BUFFER_DTYPE = torch.float64
"""dtype of the flat RMSProp and momentum buffers, whatever the model's dtype."""


def updated_square_average(square_avg: Tensor, values: Tensor, alpha: float) -> Tensor:
    """α·v + (1 − α)·g² for v, g of the same shape (n,) (g: mean Jacobian row or update); a new tensor."""
    return alpha * square_avg + (1 - alpha) * values.to(square_avg.dtype) ** 2


def column_scale(square_avg: Tensor, eps: float) -> Tensor:
    """The RMSProp scale 1 / (√v + eps), shape of v."""
    return 1.0 / (square_avg.sqrt() + eps)


class UpdateScaling:
    """RMSProp post-scaling d ↦ d / (√v + eps), v = α·v_prev + (1 − α)·d², for candidate directions d (n,).

    ``square_avg`` is the flat running average (P,) after the last direction scaled (the
    one a step applies); with ``columns`` (param_fraction) only those entries change.
    """

    def __init__(self, previous: Tensor, columns: Tensor | None, alpha: float, eps: float) -> None:
        self.previous, self.columns, self.alpha, self.eps = previous, columns, alpha, eps
        self.square_avg = previous

    def __call__(self, direction: Tensor) -> Tensor:
        current = self.previous if self.columns is None else self.previous[self.columns]
        updated = updated_square_average(current, direction, self.alpha)
        self.square_avg = updated if self.columns is None else self.previous.index_copy(0, self.columns, updated)
        return direction * column_scale(updated, self.eps).to(direction.dtype)


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

    def _scale_like(self, values: Tensor) -> Tensor:
        scale = self.scale.to(values.dtype)
        return scale if values.dim() == 1 else scale[:, None]

    def _compute_gram(self) -> Tensor:
        scaled = self.base.dense().to(torch.float64) * self.scale.to(torch.float64)
        return scaled @ scaled.T

    def rmatmul(self, u: Tensor) -> Tensor:
        product = self.base.rmatmul(u)
        return product * self._scale_like(product)

    def matmul(self, v: Tensor) -> Tensor:
        return self.base.matmul(v.to(self.dtype) * self._scale_like(v.to(self.dtype)))

    def dense(self) -> Tensor:
        return self.base.dense() * self.scale.to(self.dtype)

    def nonfinite_rows(self) -> Tensor:
        return self.base.nonfinite_rows()


@dataclass
class RMSPropStep:
    """RMSProp's part of one step: the operator to solve on and how candidate directions are scaled.

    ``operator`` is M, or M·D under pre-scaling; ``direction_scaling`` is the post-scaling
    of each candidate direction, or None; ``pre_square_avg`` the running average (P,) a
    pre-scaled step leaves, or None.
    """

    operator: JacobianOperator
    direction_scaling: UpdateScaling | None = None
    pre_square_avg: Tensor | None = None

    def square_avg_after(self, update_applied: bool) -> Tensor | None:
        """The running average (P,) to keep after the step, or None to keep the previous one."""
        if self.direction_scaling is not None:
            return self.direction_scaling.square_avg if update_applied else None
        return self.pre_square_avg


def rmsprop_step(mode: str | None, operator: JacobianOperator, square_avg: Tensor | None, size: int,
                 columns: Tensor | None, alpha: float, eps: float) -> RMSPropStep:
    """Prepare RMSProp ``mode`` (None, "pre" or "post") for a step on ``operator`` (G, n).

    ``square_avg`` is the flat running average (P,) float64 of the previous steps (None
    before the first: zeros); ``columns`` the flat indices (n,) the operator covers, or None.
    Pre-scaling averages the squared mean Jacobian row g = Mᵀ1 / G, the gradient of mean(r).
    """
    if mode is None:
        return RMSPropStep(operator)
    previous = square_avg if square_avg is not None else torch.zeros(size, dtype=BUFFER_DTYPE, device=operator.device)
    if mode == "post":
        return RMSPropStep(operator, UpdateScaling(previous, columns, alpha, eps))
    ones = torch.ones(operator.shape[0], dtype=BUFFER_DTYPE, device=operator.device)
    gradient = operator.rmatmul(ones).to(BUFFER_DTYPE) / operator.shape[0]
    current = previous if columns is None else previous[columns]
    updated = updated_square_average(current, gradient, alpha)
    new_buffer = updated if columns is None else previous.index_copy(0, columns, updated)
    return RMSPropStep(ColumnScaledJacobian(operator, column_scale(updated, eps)), pre_square_avg=new_buffer)
