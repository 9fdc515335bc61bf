"""Full-batch optimizers of the PINN benchmark, each a ``step() -> loss before the step`` on the fixed batch.

The loss is L = mean of ``condition_losses`` = interior mean of r² + boundary mean of r².
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from sven.bench.lm_baseline import LevenbergMarquardtStepper, LevenbergMarquardtUnavailable
from sven.bench.optimizers import OptimizerUnavailable
from sven.jacobian import ParamSpace, functorch_jacobian
from sven.nn import SvenWrapper
from sven.opt import Sven
from sven.pde import CollocationResidual, condition_losses

Batch = tuple[Tensor, Tensor, Tensor, Tensor]


def signed_residuals(pred: Tensor, target: Tensor, weight: Tensor, on_boundary: Tensor) -> Tensor:
    """√weight · r (N,), r the signed residual of each condition (pred from ``CollocationResidual``)."""
    return weight.sqrt() * (torch.where(on_boundary, pred[:, 1], pred[:, 0]) - target)


def least_squares_batch(batch: Batch) -> Batch:
    """The batch with weights divided by N, so that ρ = ``signed_residuals`` has Σ ρ² = L."""
    x, target, weight, on_boundary = batch
    return x, target, weight / x.shape[0], on_boundary


def batch_loss(model: nn.Module, batch: Batch) -> Tensor:
    """L (scalar): interior mean of r² + boundary mean of r²."""
    return condition_losses(model(batch[0]), *batch[1:]).mean()


class SvenStepper:
    """Sven on the Gauss–Newton residuals (kappa = 1): ``settings`` go to ``Sven``."""

    def __init__(self, model: CollocationResidual, batch: Batch, settings: dict[str, Any]) -> None:
        self.wrapped = SvenWrapper(model, condition_losses, kappa=1.0)
        self.optimizer = Sven(self.wrapped, **settings)
        self.batch = batch

    def step(self) -> float:
        losses, _ = self.wrapped.loss_and_grad(self.batch)
        self.optimizer.step()
        return float(losses.mean())


class ClosureStepper:
    """A ``torch.optim`` optimizer stepped with a closure over the full batch loss."""

    def __init__(self, model: CollocationResidual, batch: Batch, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.batch, self.optimizer = model, batch, optimizer

    def step(self) -> float:
        def closure() -> Tensor:
            self.optimizer.zero_grad()
            loss = batch_loss(self.model, self.batch)
            loss.backward()
            return loss

        return float(self.optimizer.step(closure).detach())


LINE_SEARCH_ETAS = tuple(0.5**k for k in range(31))
"""The step sizes Müller & Zeinhofer's line search tries."""


def grid_line_search(model: nn.Module, batch: Batch, params: list[Tensor], start: Tensor, step: Tensor) -> float:
    """Set the flat parameters to start + η·step for the η in ``LINE_SEARCH_ETAS`` of smallest loss; return it."""
    losses = []
    for eta in LINE_SEARCH_ETAS:
        vector_to_parameters(start + eta * step, params)
        losses.append(float(batch_loss(model, batch)))
    best = min(range(len(losses)), key=losses.__getitem__)
    vector_to_parameters(start + LINE_SEARCH_ETAS[best] * step, params)
    return losses[best]


class SvenLineSearchStepper(SvenStepper):
    """Sven's exact step (damping 0, lr = 1) taken as a direction, scaled by ENGD's line search."""

    @torch.no_grad()
    def step(self) -> float:
        params = list(self.wrapped.params.tensors)
        start = parameters_to_vector(params)
        loss = super().step()
        grid_line_search(self.wrapped.model, self.batch, params, start, parameters_to_vector(params) - start)
        return loss


class EngdStepper:
    """Energy natural gradient descent (Müller & Zeinhofer 2023) with their grid line search.

    G = JᵀJ (P, P) from the Jacobian J (N, P) of ρ (per-sample gradients by ``torch.func``),
    d = G⁺ ∇(L/2) = G⁺ Jᵀρ, then θ ← θ − η d with the η of ``LINE_SEARCH_ETAS`` of smallest loss.
    """

    def __init__(self, model: CollocationResidual, batch: Batch) -> None:
        self.model, self.batch = model, batch
        self.params = ParamSpace.of_module(model)

    @torch.no_grad()
    def step(self) -> float:
        residuals, _, jacobian = functorch_jacobian(self.model, signed_residuals, least_squares_batch(self.batch),
                                                    self.params)
        matrix = jacobian.dense()
        direction = torch.linalg.pinv(matrix.T @ matrix, hermitian=True) @ (matrix.T @ residuals)
        tensors = list(self.params.tensors)
        grid_line_search(self.model, self.batch, tensors, parameters_to_vector(tensors), -direction)
        return float(residuals.square().sum())


class LevenbergMarquardtPinnStepper:
    """``torch-levenberg-marquardt`` on ρ: its model maps the batch points to ρ (N, 1), its targets are 0."""

    def __init__(self, model: CollocationResidual, batch: Batch, settings: dict[str, Any]) -> None:
        self.residual_model = _FixedConditions(model, least_squares_batch(batch))
        try:
            self.inner = LevenbergMarquardtStepper(self.residual_model, lambda pred, y: (pred - y).square()[:, 0],
                                                   settings)
        except LevenbergMarquardtUnavailable as missing:
            raise OptimizerUnavailable(str(missing)) from missing
        self.x, self.zeros = batch[0], torch.zeros_like(batch[1])[:, None]

    def step(self) -> float:
        return self.inner.step(self.x, self.zeros) * self.x.shape[0]


class _FixedConditions(nn.Module):
    """ρ (N, 1) of ``model`` at the batch's points; the targets and kinds stay those of ``batch``."""

    def __init__(self, model: CollocationResidual, batch: Batch) -> None:
        super().__init__()
        self.model, self.batch = model, batch

    def forward(self, x: Tensor) -> Tensor:
        return signed_residuals(self.model(x), *self.batch[1:])[:, None]


StepperFactory = Callable[[CollocationResidual, Batch], Any]


def _sven_settings(batch: Batch, **settings: Any) -> dict[str, Any]:
    """lr = 1 and k = N (every direction the rtol cut leaves), plus ``settings``."""
    return {"lr": 1.0, "k": batch[0].shape[0], **settings}


PINN_OPTIMIZERS: dict[str, StepperFactory] = {
    "sven": lambda model, batch: SvenStepper(model, batch, _sven_settings(batch, rtol=1e-8, line_search=True,
                                                                          max_tries=30)),
    "sven-adaptive": lambda model, batch: SvenStepper(model, batch,
                                                      _sven_settings(batch, rtol=0.0, damping="adaptive")),
    "sven-exact": lambda model, batch: SvenStepper(model, batch, _sven_settings(batch, rtol=1e-6)),
    "sven-ls": lambda model, batch: SvenLineSearchStepper(model, batch, _sven_settings(batch, rtol=1e-7)),
    "adam": lambda model, batch: ClosureStepper(model, batch, torch.optim.Adam(model.parameters(), lr=1e-3)),
    "lbfgs": lambda model, batch: ClosureStepper(
        model, batch, torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=10, history_size=100,
                                        line_search_fn="strong_wolfe")),
    "engd": EngdStepper,
    "lm": lambda model, batch: LevenbergMarquardtPinnStepper(model, batch, {}),
}
"""Each optimizer's settings: Sven takes the undamped step cut below 1e-8·σ_max with its backtracking on lr
(``line_search``: 1, ½, … ½^29); "sven-adaptive" keeps every direction (rtol = 0) and lets adaptive λ filter them;
the exact step (damping 0, lr = 1) cuts below 1e-6·σ_max; "sven-ls" takes the exact step cut below 1e-7·σ_max
(about where ENGD's pseudoinverse of G = JᵀJ cuts) as a direction for ENGD's line search; Adam at lr = 1e-3;
L-BFGS with a strong Wolfe search."""
