"""Collocation residuals of a PDE with Dirichlet data, as an ``nn.Module`` Sven can wrap.

Each point is one condition: an interior point asks L[u](x) = f(x), a boundary (or
initial) point asks u(x) = g(x). The module returns both quantities for every point
and ``condition_losses`` keeps the one that point's kind asks for, so a mixed batch
(x, target, weight, on_boundary) splits into independent samples as Sven needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from sven.pde.taylor import Derivatives, derivatives

Operator = Callable[[Derivatives], Tensor]
"""L[u] at each point from u's derivatives: (B,)."""


class CollocationResidual(nn.Module):
    """(L[u](x), u(x)) as (B, 2) at points x (B, d), for a scalar network u = ``net``."""

    def __init__(self, net: nn.Sequential, operator: Operator, laplacian_dims: Sequence[int] | None = None) -> None:
        super().__init__()
        self.net = net
        self.operator = operator
        self.laplacian_dims = None if laplacian_dims is None else tuple(laplacian_dims)

    def forward(self, x: Tensor) -> Tensor:
        return self.compose(derivatives(self.net, x, self.laplacian_dims))

    def compose(self, taylor: Derivatives) -> Tensor:
        """(L[u], u) (B, 2) from u's derivatives at the points (the Taylor engine calls it on its own streams)."""
        return torch.stack([self.operator(taylor), taylor.value[:, 0]], dim=1)


def condition_losses(pred: Tensor, target: Tensor, weight: Tensor, on_boundary: Tensor) -> Tensor:
    """weight · r² per point (B,): r = u − g on boundary points, L[u] − f inside.

    pred (B, 2) from ``CollocationResidual``; target (B,) holds f or g; weight (B,);
    on_boundary (B,) bool.
    """
    residual = torch.where(on_boundary, pred[:, 1], pred[:, 0]) - target
    return weight * residual * residual


def condition_weights(on_boundary: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """N / N_kind per point (N,), so that the mean of ``condition_losses`` is the interior mean
    of r² plus the boundary mean of r²."""
    count = on_boundary.numel()
    boundary = int(on_boundary.sum())
    if boundary in (0, count):
        return torch.ones(count, dtype=dtype, device=on_boundary.device)
    return torch.where(on_boundary, count / boundary, count / (count - boundary)).to(dtype)


def negative_laplacian(taylor: Derivatives) -> Tensor:
    """−Δu (B,): the Poisson operator."""
    return -taylor.laplacian[:, 0]
