"""Candidate Sven updates for one Jacobian: build one for a spectrum and λ, apply it, measure it, undo it.

The step searches (adaptive damping, greedy rank) try several updates from the same
spectrum; this keeps the bookkeeping — RMSProp post-scaling, momentum, per-group lr,
param_fraction columns, and the exact undo — in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sven.jacobian.operator import JacobianOperator
from sven.nn.wrapper import SvenWrapper
from sven.opt.spectrum import Spectrum


class CandidateSteps:
    """Updates b with θ ← θ − lr_g · b for the residuals r (G,) and Jacobian operator of one batch.

    Args:
        wrapped: the wrapper whose parameters move and whose loss re-evaluates the batch.
        operator: the operator the spectrum was computed on (M, or M D under RMSProp pre-scaling).
        residuals: r (G,) float64.
        batch: the batch ``(x, y, *extra)`` the losses came from.
        columns: flat indices (n,) the operator covers (param_fraction), or None for all P.
        direction_scaling: maps each direction (n,) to the scaled one (RMSProp post-scaling), or None.
        lr_per_param: lr of each wrapped parameter's group, in ParamSpace order.
        decoupled_decay_per_param: λ_dec of each wrapped parameter's group: apply shrinks θ by lr·λ_dec·θ.
        momentum: previous momentum buffer (P,) and its factor μ, or None: b = μ·b_prev + d over all P.
        undoable: keep an exact copy of the parameters so that ``undo`` restores them bit-identically.
    """

    def __init__(self, wrapped: SvenWrapper, operator: JacobianOperator, residuals: Tensor, batch: tuple,
                 columns: Tensor | None, direction_scaling: Callable[[Tensor], Tensor] | None,
                 lr_per_param: list[float], decoupled_decay_per_param: list[float],
                 momentum: tuple[Tensor | None, float] | None, undoable: bool) -> None:
        self.wrapped, self.operator, self.residuals, self.batch = wrapped, operator, residuals, batch
        self.direction_columns, self.direction_scaling, self.momentum = columns, direction_scaling, momentum
        self.lr_per_param = lr_per_param
        self.shrink_per_param = [1.0 - lr * decay for lr, decay in zip(lr_per_param, decoupled_decay_per_param)]
        self.columns = columns if momentum is None else None
        self._saved = _copies(wrapped.params.tensors) if undoable else []

    def update(self, spectrum: Spectrum, damping: float) -> Tensor:
        """b for the kept triplets of ``spectrum`` filtered with λ = ``damping``: (n,), or (P,) with momentum."""
        direction = spectrum.direction(self.operator, self.residuals, damping)
        if self.direction_scaling is not None:
            direction = self.direction_scaling(direction)
        if self.momentum is None:
            return direction
        previous, factor = self.momentum
        flat = torch.zeros(self.wrapped.params.size, dtype=torch.float64, device=direction.device)
        flat[slice(None) if self.direction_columns is None else self.direction_columns] = direction.double()
        return flat if previous is None else factor * previous + flat

    def apply(self, update: Tensor) -> None:
        """θ ← θ − lr_g·λ_dec·θ − lr_g·b, in place (decoupled decay on the columns the update covers)."""
        self.wrapped.params.scale_(self.shrink_per_param, self.direction_columns)
        self.wrapped.params.add_flat_(update, [-lr for lr in self.lr_per_param], self.columns)

    def loss_after(self, update: Tensor) -> float:
        """Apply ``update`` and return the batch's mean loss (inf if not finite); the update stays applied."""
        self.apply(update)
        loss = float(self.wrapped.batch_losses(self.batch).double().mean())
        return loss if math.isfinite(loss) else math.inf

    def undo(self) -> None:
        """Restore the parameters to their values at construction, bit for bit (needs ``undoable``)."""
        for param, saved in zip(self.wrapped.params.tensors, self._saved, strict=True):
            param.copy_(saved)

    def step_norm(self, update: Tensor) -> float:
        """‖Δθ‖ = ‖lr_g · b‖ of an update, accumulated in float64 (``vector_norm`` upcasts as it reads, no copy)."""
        if len(set(self.lr_per_param)) == 1:
            return abs(self.lr_per_param[0]) * float(torch.linalg.vector_norm(update, dtype=torch.float64))
        lr_flat = self.wrapped.params.per_entry(self.lr_per_param, self.columns, update.device)
        return float(torch.linalg.vector_norm(update.to(torch.float64) * lr_flat))


@torch.no_grad()
def _copies(tensors: tuple[Tensor, ...]) -> list[Tensor]:
    """Copies of the parameters outside autograd: one clone each, without a detached view first."""
    return [t.clone() for t in tensors]
