"""engine="auto": residual modules written the usual PyTorch ways get an exact engine, named by engine_plan().

A PDE residual −Δu computed inside forward with ``torch.func.hessian`` (the Gram engine's hooks
cannot run inside functorch transforms) and with ``torch.autograd.grad(create_graph=True)`` (the
weights' second-order use is invisible to the hooks: without the check the Gram engine would
give a wrong Jacobian silently). Each is checked against jacrev of the residual vector, float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import STEP_TOLERANCE, flat_parameters, make_batch, make_mlp, per_sample_mse
from reference import reference_direction, relative_error
from torch import Tensor, nn
from torch.func import functional_call

from sven.cost import SvenCostWarning
from sven.nn import SvenWrapper
from sven.opt import Sven

LR = 0.5


class HessianResidual(nn.Module):
    """−Δu(x) by torch.func.hessian of a tanh MLP, per point: (B, 2) → (B,)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp([2, 8, 1])

    def forward(self, x: Tensor) -> Tensor:
        u = lambda point: self.net(point.unsqueeze(0)).squeeze()  # noqa: E731
        return -torch.vmap(lambda point: torch.func.hessian(u)(point).trace())(x)


class AutogradResidual(nn.Module):
    """−Δu(x) by torch.autograd.grad(create_graph=True), the usual PyTorch PINN pattern: (B, 2) → (B,)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp([2, 8, 1])

    def forward(self, x: Tensor) -> Tensor:
        x = x.detach().requires_grad_(True)
        gradient = torch.autograd.grad(self.net(x).sum(), x, create_graph=True)[0]
        return -sum(torch.autograd.grad(gradient[:, k].sum(), x, create_graph=True)[0][:, k] for k in range(2))


def source_error(pred: Tensor, target: Tensor) -> Tensor:
    return pred - target


def reference_step(model: nn.Module, batch: tuple) -> Tensor:
    """−lr·M⁺r with M from jacfwd of the torch.func form of the same residual (same parameter names)."""
    model64 = HessianResidual()
    model64.load_state_dict(model.state_dict())
    names = [n for n, _ in model64.named_parameters()]
    shapes = [p.shape for _, p in model64.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model64.parameters()])

    def residuals(flat: Tensor) -> Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[start:start + shape.numel()].view(shape)
            start += shape.numel()
        return source_error(functional_call(model64, params, (batch[0],)), batch[1])

    jacobian = torch.func.jacfwd(residuals)(theta)
    return -LR * reference_direction(jacobian, residuals(theta).detach(), 64, 1e-3)


@pytest.mark.parametrize("module, engine, passed_over", [
    (HessianResidual, "functorch", ["gram"]),
    (AutogradResidual, "rowwise", ["gram", "functorch"]),
])
def test_auto_finds_an_exact_engine_for_residuals_written_the_usual_ways(module, engine: str, passed_over) -> None:
    torch.manual_seed(0)
    model = module()
    batch = (torch.rand(10, 2, dtype=torch.float64), torch.randn(10, dtype=torch.float64))
    expected = reference_step(model, batch)
    wrapped = SvenWrapper(model, residual_fn=source_error)
    assert wrapped.engine_plan()["engine"] == "auto"
    before = flat_parameters(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Sven(wrapped, lr=LR).step(batch)
    costs = [str(w.message) for w in caught if issubclass(w.category, SvenCostWarning)]
    assert len(costs) == (engine == "rowwise")  # only the per-row engine is far off the fast path
    if engine == "rowwise":
        assert "took 'rowwise'" in costs[0] and "(10 × 33)" in costs[0] and "sven.pde.derivatives" in costs[0]
    plan = wrapped.engine_plan()
    assert plan["engine"] == engine and sorted(plan["passed_over"]) == sorted(passed_over), plan
    assert relative_error(flat_parameters(model) - before, expected) <= STEP_TOLERANCE[torch.float64]
    optimizer = Sven(wrapped, lr=LR, damping="adaptive")
    first = float(optimizer.step(batch).mean())
    assert optimizer.last_step["accepted"] and float(wrapped.batch_losses(batch).mean()) < first


def test_an_ordinary_model_stays_on_the_gram_engine_and_a_nan_batch_settles_nothing() -> None:
    wrapped = SvenWrapper(make_mlp([3, 6, 2]), per_sample_mse)
    x, y = make_batch(8, 3, 2)
    bad = x.clone()
    bad[2, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped the step"):
        Sven(wrapped).step((bad, y))
    assert wrapped.engine_plan()["engine"] == "auto"
    Sven(wrapped).step((x, y))
    assert wrapped.engine_plan()["engine"] == "gram" and wrapped.engine_plan()["passed_over"] == {}


def test_an_explicit_engine_that_cannot_see_a_weight_use_is_an_error_not_a_wrong_step() -> None:
    torch.manual_seed(0)
    wrapped = SvenWrapper(AutogradResidual(), residual_fn=source_error, engine="gram")
    batch = (torch.rand(10, 2, dtype=torch.float64), torch.randn(10, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="engine='gram' gives a Jacobian .* Use engine='auto' or 'rowwise'"):
        wrapped.loss_and_grad(batch)
