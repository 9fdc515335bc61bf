"""Signed and vector residuals (``SvenWrapper(model, residual_fn=fn)``) against the dense float64 reference.

Rows are sign(r)·|r|^κ, one per residual r_ij; the reference differentiates the flattened
residual vector with jacrev and takes the truncated SVD step. Tolerance: ``STEP_TOLERANCE``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ENGINES, STEP_TOLERANCE, flat_parameters, make_batch, make_mlp
from reference import reference_direction, relative_error
from torch import Tensor
from torch.func import functional_call, jacrev

from sven.nn import SvenWrapper
from sven.opt import Sven

LR = 0.5


def signed_error(pred: Tensor, target: Tensor) -> Tensor:
    """Scalar residual per sample: Σ_j (pred − target)_j (B,), of either sign."""
    return (pred - target).sum(dim=1)


def vector_error(pred: Tensor, target: Tensor) -> Tensor:
    """One residual per output: pred − target (B, m)."""
    return pred - target


def reference_rows(model: torch.nn.Module, residual_fn, batch: tuple, kappa: float) -> tuple[Tensor, Tensor]:
    """(rows sign(r)|r|^κ (B·m,), their Jacobian (B·m, P)) in float64."""
    model64 = copy.deepcopy(model).double()
    names = [n for n, _ in model64.named_parameters()]
    shapes = [p.shape for _, p in model64.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model64.parameters()])
    x, y = (t.double() for t in batch)

    def rows(theta: Tensor) -> Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = theta[start:start + shape.numel()].view(shape)
            start += shape.numel()
        r = residual_fn(functional_call(model64, params, (x,)), y).reshape(-1)
        return torch.sign(r) * r.abs() ** kappa

    return rows(flat).detach(), jacrev(rows)(flat).detach()


@pytest.mark.parametrize("kappa", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("residual_fn", [signed_error, vector_error])
@pytest.mark.parametrize("engine", ENGINES)
def test_residual_rows_take_the_reference_step(engine: str, residual_fn, kappa: float) -> None:
    model = make_mlp([3, 6, 2])
    batch = make_batch(5, 3, 2)
    rows, jacobian = reference_rows(model, residual_fn, batch, kappa)
    expected = -LR * reference_direction(jacobian, rows, 64, 1e-3)
    wrapped = SvenWrapper(model, residual_fn=residual_fn, kappa=kappa, engine=engine)
    before = flat_parameters(model)
    losses, preds = wrapped.loss_and_grad(batch)
    assert wrapped.state.operator.shape[0] == rows.numel()
    residuals = residual_fn(preds, batch[1])
    assert torch.allclose(losses, (residuals**2).reshape(5, -1).sum(dim=1), rtol=1e-12, atol=0)
    Sven(wrapped, lr=LR).step()
    assert relative_error(flat_parameters(model) - before, expected) <= STEP_TOLERANCE[torch.float64]


def test_kappa_defaults_to_1_for_residuals_and_adaptive_damping_compares_their_squares() -> None:
    model = make_mlp([3, 6, 2])
    wrapped = SvenWrapper(model, residual_fn=vector_error)
    assert wrapped.kappa == 1.0
    optimizer = Sven(wrapped, lr=1.0, damping="adaptive")
    batch = make_batch(16, 3, 2)
    first = float(optimizer.step(batch).mean())
    assert optimizer.last_step["accepted"] and float(wrapped.batch_losses(batch).mean()) < first


@pytest.mark.parametrize("options, message", [
    (dict(residual_fn=vector_error, microbatch_size=2), "use microbatch_size=1 with residual_fn"),
    (dict(), "exactly one of loss_fn .* and residual_fn .*; got neither"),
])
def test_residual_options_that_cannot_work_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SvenWrapper(make_mlp([3, 6, 2]), **options)


def test_vector_residuals_with_batch_statistics_are_refused_and_frozen_statistics_are_kept() -> None:
    """The repeated batch would feed m·B samples to BatchNorm's running variance: refused before any pass."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 2)).double()
    batch = make_batch(5, 3, 2)
    statistics = model[1].running_var.clone()
    with pytest.raises(ValueError, match=r"returned 2 residuals per sample.*1 \(BatchNorm1d\).*bn_mode='frozen'"):
        SvenWrapper(model, residual_fn=vector_error).loss_and_grad(batch)
    assert torch.equal(model[1].running_var, statistics)
    frozen = SvenWrapper(model, residual_fn=vector_error, bn_mode="frozen")
    losses, _ = frozen.loss_and_grad(batch)
    assert losses.shape == (5,) and torch.equal(model[1].running_var, statistics)
    model.eval()
    losses, _ = SvenWrapper(model, residual_fn=vector_error).loss_and_grad(batch)
    assert losses.shape == (5,) and torch.equal(model[1].running_var, statistics)


@pytest.mark.parametrize("bad, received", [
    (lambda pred, target: (pred - target)[:3], r"\(3, 2\)"),
    (lambda pred, target: (pred - target)[..., None], r"\(5, 2, 1\)"),
])
def test_residuals_of_the_wrong_shape_say_what_was_received(bad, received: str) -> None:
    wrapped = SvenWrapper(make_mlp([3, 6, 2]), residual_fn=bad)
    with pytest.raises(ValueError, match=rf"shape \(B,\) or \(B, m\) with B = 5; got shape {received}"):
        wrapped.loss_and_grad(make_batch(5, 3, 2))
