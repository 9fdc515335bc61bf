"""PINN benchmark problems (the protocol of Dangel et al. 2024, "Kronecker-factored approximate curvature
for physics-informed neural networks"): collocation points, exact solutions and tanh MLPs, in float64."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sven.pde import CollocationResidual, Derivatives, condition_weights, negative_laplacian

INTERIOR_POINTS, BOUNDARY_POINTS, EVAL_POINTS = 900, 120, 9000
DTYPE = torch.float64

Field = Callable[[Tensor], Tensor]
"""A function of points x (N, 2) → (N,)."""


@dataclass(frozen=True)
class CollocationData:
    """The full training batch (x (N, 2), target (N,), weight (N,), on_boundary (N,)) and held-out points
    ``eval_x`` (M, 2) with the exact solution ``eval_u`` (M,)."""

    batch: tuple[Tensor, Tensor, Tensor, Tensor]
    eval_x: Tensor
    eval_u: Tensor


@dataclass(frozen=True)
class PinnProblem:
    """−Δu = f (Poisson) or u_t = ¼ u_xx (heat) on [0, 1]² with Dirichlet (and initial) data.

    ``boundary(n, generator)`` draws n boundary points (n, 2); ``boundary_value`` and ``source`` give the
    targets there and inside; ``solution`` is u*.
    """

    name: str
    sizes: tuple[int, ...]
    operator: Callable[[Derivatives], Tensor]
    laplacian_dims: tuple[int, ...] | None
    source: Field
    boundary_value: Field
    solution: Field
    boundary: Callable[[int, torch.Generator], Tensor]

    def build_model(self) -> CollocationResidual:
        """A fresh tanh MLP (torch's global RNG) inside its residual module."""
        layers: list[nn.Module] = []
        for index, (d_in, d_out) in enumerate(itertools.pairwise(self.sizes)):
            if index:
                layers.append(nn.Tanh())
            layers.append(nn.Linear(d_in, d_out))
        return CollocationResidual(nn.Sequential(*layers).to(DTYPE), self.operator, self.laplacian_dims)

    def data(self, seed: int, interior: int = INTERIOR_POINTS, boundary: int = BOUNDARY_POINTS) -> CollocationData:
        """``interior`` and ``boundary`` points (900 and 120) and 9000 held-out points, uniform, drawn from ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        inside = torch.rand(interior, 2, generator=generator, dtype=DTYPE)
        edge = self.boundary(boundary, generator)
        x = torch.cat([inside, edge])
        on_boundary = torch.arange(x.shape[0]) >= interior
        target = torch.where(on_boundary, self.boundary_value(x), self.source(x))
        eval_x = torch.rand(EVAL_POINTS, 2, generator=generator, dtype=DTYPE)
        return CollocationData((x, target, condition_weights(on_boundary), on_boundary), eval_x,
                               self.solution(eval_x))


def _sides(count: int, generator: torch.Generator, sides: tuple[tuple[int, float], ...]) -> Tensor:
    """``count`` points uniform on the unit-square sides given as (fixed coordinate, its value)."""
    points = torch.rand(count, 2, generator=generator, dtype=DTYPE)
    side = torch.randint(len(sides), (count,), generator=generator)
    for index, (coordinate, value) in enumerate(sides):
        points[side == index, coordinate] = value
    return points


def _sine_product(x: Tensor) -> Tensor:
    return torch.sin(math.pi * x[:, 0]) * torch.sin(math.pi * x[:, 1])


def poisson2d(sizes: tuple[int, ...] = (2, 64, 1)) -> PinnProblem:
    """−Δu = 2π² sin(πx) sin(πy), u = 0 on ∂[0,1]²; u* = sin(πx) sin(πy)."""
    name = "poisson2d" if sizes == (2, 64, 1) else "poisson2d-large"
    return PinnProblem(
        name, sizes, negative_laplacian, None,
        source=lambda x: 2 * math.pi**2 * _sine_product(x), boundary_value=lambda x: torch.zeros_like(x[:, 0]),
        solution=_sine_product,
        boundary=lambda n, g: _sides(n, g, ((0, 0.0), (0, 1.0), (1, 0.0), (1, 1.0))),
    )


def _heat_operator(taylor: Derivatives) -> Tensor:
    """u_t − ¼ u_xx (B,) with x = (t, x) and the Laplacian over x only."""
    return taylor.gradient[:, 0, 0] - 0.25 * taylor.laplacian[:, 0]


def heat1d() -> PinnProblem:
    """u_t = ¼ u_xx on (t, x) ∈ [0,1]², u(0, x) = sin(πx), u(t, 0) = u(t, 1) = 0; u* = exp(−π² t / 4) sin(πx).

    The initial line and both spatial sides are one boundary set (120 points over the three sides).
    """
    return PinnProblem(
        "heat1d", (2, 64, 1), _heat_operator, (1,),
        source=lambda x: torch.zeros_like(x[:, 0]),
        boundary_value=lambda x: torch.where(x[:, 0] == 0, torch.sin(math.pi * x[:, 1]), torch.zeros_like(x[:, 0])),
        solution=lambda x: torch.exp(-(math.pi**2) * x[:, 0] / 4) * torch.sin(math.pi * x[:, 1]),
        boundary=lambda n, g: _sides(n, g, ((0, 0.0), (1, 0.0), (1, 1.0))),
    )


PINN_PROBLEMS: dict[str, Callable[[], PinnProblem]] = {
    "poisson2d": poisson2d,
    "poisson2d-large": lambda: poisson2d((2, 64, 64, 48, 48, 1)),
    "heat1d": heat1d,
}
