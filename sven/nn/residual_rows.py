"""Signed and vector residuals: ``SvenWrapper(model, residual_fn=fn)`` with ``fn(pred, y, *extra)`` → (B,) or (B, m).

Each residual r_ij is a condition of its own: M has B·m rows, sign(r)·|r|^κ (r itself at
κ = 1), and the per-sample loss reported is Σ_j r_ij². A (B, m) residual is differentiated on
the batch repeated m times: copy j of sample i contributes row j·B + i through its own forward
pass (the copy index travels with the batch), so every engine — the Gram engine's per-sample
backprops included — sees one condition per sample of the repeated batch: exact, at m times
the cost of one pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

ResidualFn = Callable[..., Tensor]


def residual_width(residuals: Tensor, batch_size: int) -> int:
    """m of residuals shaped (B,) (m = 1) or (B, m); anything else is a ValueError saying what was received."""
    if not isinstance(residuals, Tensor):
        raise ValueError(f"residual_fn must return a tensor of shape (B,) or (B, m) with B = {batch_size}; "
                         f"got {type(residuals).__name__}")
    if residuals.dim() in (1, 2) and residuals.shape[0] == batch_size and residuals.numel() > 0:
        return 1 if residuals.dim() == 1 else residuals.shape[1]
    raise ValueError(f"residual_fn must return residuals of shape (B,) or (B, m) with B = {batch_size}; "
                     f"got shape {tuple(residuals.shape)}")


def _repeat(value: Any, copies: int) -> Any:
    return tree_map(lambda t: torch.cat([t] * copies) if isinstance(t, Tensor) else t, value)


@dataclass(frozen=True)
class ResidualRows:
    """How a residual_fn with ``width`` = m outputs per sample becomes the rows (B·m,) an engine differentiates."""

    residual_fn: ResidualFn
    width: int

    def engine_batch(self, batch: tuple) -> tuple:
        """The batch the engine runs: itself for m = 1, else every tensor repeated m times along dim 0
        plus the copy index j of each row (B·m,), passed to ``rows`` as the last extra tensor."""
        if self.width == 1:
            return batch
        copies = torch.arange(self.width, device=batch[1].device).repeat_interleave(batch[1].shape[0])
        return (*(_repeat(item, self.width) for item in batch), copies)

    def rows(self, preds: Tensor, targets: Tensor, *extra: Tensor) -> Tensor:
        """The engine's per-sample "losses": r (B,), or r_ij of copy j of sample i at row j·B + i (B·m,).

        Works on the whole repeated batch (Gram engine) and on one sample at a time (functorch).
        """
        if self.width == 1:
            residuals = self.residual_fn(preds, targets, *extra)
            residual_width(residuals, targets.shape[0])
            return residuals
        *extra, copy = extra
        residuals = self.residual_fn(preds, targets, *extra)
        if tuple(residuals.shape) != (targets.shape[0], self.width):
            raise ValueError(f"residual_fn returned shape {tuple(residuals.shape)}; it returned "
                             f"{self.width} residuals per sample before, expected ({targets.shape[0]}, {self.width})")
        return residuals.gather(1, copy[:, None]).squeeze(1)

    def per_sample_losses(self, rows: Tensor) -> Tensor:
        """Σ_j r_ij² (B,) from the rows (B·m,)."""
        return (rows.detach() ** 2).view(self.width, -1).sum(dim=0)

    def batch_losses(self, preds: Tensor, targets: Tensor, *extra: Tensor) -> Tensor:
        """Σ_j r_ij² (B,) of one plain forward's predictions."""
        residuals = self.residual_fn(preds, targets, *extra)
        residual_width(residuals, targets.shape[0])
        squares = residuals.detach() ** 2
        return squares if squares.dim() == 1 else squares.sum(dim=1)


def signed_rows(values: Tensor, kappa: float) -> tuple[Tensor, Tensor | None]:
    """Rows sign(r)·|r|^κ (n,) float64 and the row scaling κ·|r|^(κ−1) (n,) (None at κ = 1).

    For κ < 1 a residual that is exactly 0 gets a zero row (its derivative is infinite there
    and its condition already holds), as for per-sample losses.
    """
    residuals = values.detach().to(torch.float64)
    if kappa == 1.0:
        return residuals, None
    magnitude = residuals.abs()
    scale = kappa * magnitude ** (kappa - 1)
    if kappa < 1.0:
        scale = torch.where(magnitude == 0, torch.zeros_like(scale), scale)
    return torch.sign(residuals) * magnitude**kappa, scale
