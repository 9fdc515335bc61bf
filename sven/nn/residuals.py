"""Per-sample losses → residuals r and the row map R with M = R · (dl/dθ).

With micro-batches of size m the losses are averaged over consecutive groups
(S, shape (G, B)); the residual is r = (S l)^(kappa/2) and, by the chain rule,
its Jacobian is M = diag((kappa/2)·(S l)^(kappa/2 - 1)) · S · J_l.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_matrix(batch_size: int, microbatch_size: int, device: torch.device | None = None) -> Tensor:
    """S, shape (G, B), G = ceil(B / m): row g averages samples g·m … min((g+1)·m, B) − 1.

    The last group is smaller when m does not divide B.
    """
    groups = torch.arange(batch_size, device=device) // microbatch_size
    num_groups = int(groups[-1]) + 1
    one_hot = torch.nn.functional.one_hot(groups, num_groups).T.to(torch.float64)
    return one_hot / one_hot.sum(dim=1, keepdim=True)


def residuals_and_row_map(
    losses: Tensor, microbatch_size: int, kappa: float
) -> tuple[Tensor, Tensor | None]:
    """Residuals r (G,) in float64 and the row map R (G, B) — a vector (B,) when R is diagonal, None when
    it is the identity.

    Raises ValueError for a negative loss when kappa ≠ 2 (the power is undefined).
    For kappa < 2 a group whose mean loss is exactly 0 has an infinite derivative of
    l^(kappa/2); its condition r_g = 0 already holds, so its row of M is set to zero
    (the step leaves that condition to first order unconstrained) instead of making
    the whole Jacobian non-finite.
    """
    losses64 = losses.detach().to(torch.float64)
    if kappa != 2.0 and bool((losses64 < 0).any()):
        raise ValueError(
            f"kappa={kappa} raises the losses to the power kappa/2, which needs losses >= 0; "
            f"got {int((losses64 < 0).sum())} negative per-sample loss(es), min {float(losses64.min()):.3g}. "
            "Use kappa=2 or a non-negative loss."
        )
    if microbatch_size == 1 and kappa == 2.0:
        return losses64, None
    grouping = group_matrix(losses.shape[0], microbatch_size, losses.device) if microbatch_size > 1 else None
    grouped = losses64 if grouping is None else grouping @ losses64
    residuals = grouped ** (kappa / 2)
    row_scale = (kappa / 2) * grouped ** (kappa / 2 - 1) if kappa != 2.0 else torch.ones_like(grouped)
    if kappa < 2.0:
        row_scale = torch.where(grouped == 0, torch.zeros_like(row_scale), row_scale)
    return residuals, row_scale if grouping is None else row_scale[:, None] * grouping
