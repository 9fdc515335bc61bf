"""Backtracking on lr (``line_search=True``): the step taken is the reference step times the accepted scale 2^-j."""

from __future__ import annotations

import pytest
import torch
from conftest import flat_parameters, make_batch, make_mlp, per_sample_mse
from reference import reference_direction, reference_residuals_and_jacobian, relative_error

from sven import Sven, SvenWrapper


@pytest.mark.parametrize("engine", ["gram", "functorch"])
@pytest.mark.parametrize("batch_size", [12, 40], ids=["rows_below_P", "rows_above_P"])
@pytest.mark.parametrize("lr, damping", [(0.5, 0.0), (64.0, 0.0), (64.0, 0.1)])
def test_the_step_is_the_reference_step_times_the_accepted_scale(engine: str, batch_size: int, lr: float,
                                                                 damping: float) -> None:
    """lr = 64 overshoots: the first tries are refused, and the kept scale is the first that lowers the loss."""
    model = make_mlp([3, 6, 1], seed=3)
    batch = make_batch(batch_size, 3, 1, seed=4)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch, kappa=1.0)
    expected = -lr * reference_direction(jacobian, residuals, k=64, rtol=1e-3, damping=damping)
    wrapped = SvenWrapper(model, per_sample_mse, kappa=1.0, engine=engine)
    optimizer = Sven(wrapped, lr=lr, k=64, rtol=1e-3, damping=damping, line_search=True, max_tries=20)
    before = flat_parameters(model)
    loss_before = float(wrapped.batch_losses(batch).mean())
    optimizer.step(batch)
    report = optimizer.last_step
    scale = report["lr_scale"]
    assert report["accepted"] and scale == 0.5 ** (report["tries"] - 1)
    assert lr < 1 or report["tries"] > 1
    assert relative_error(flat_parameters(model) - before, scale * expected) <= 1e-8
    assert float(wrapped.batch_losses(batch).mean()) < loss_before


def test_no_scale_that_lowers_the_loss_leaves_the_parameters_unchanged() -> None:
    model = make_mlp([3, 6, 1], seed=3)
    batch = make_batch(40, 3, 1, seed=4)
    wrapped = SvenWrapper(model, per_sample_mse, kappa=1.0)
    optimizer = Sven(wrapped, lr=1e9, k=64, line_search=True, max_tries=2)
    before = flat_parameters(model)
    optimizer.step(batch)
    assert not optimizer.last_step["accepted"] and optimizer.last_step["tries"] == 2
    assert torch.equal(flat_parameters(model), before)


@pytest.mark.parametrize("options, message", [
    (dict(line_search=1), "line_search must be True or False; got 1"),
    (dict(line_search=True, damping="adaptive"), "pick one"),
    (dict(line_search=True, variable_k=True), "pick one"),
])
def test_bad_line_search_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Sven(SvenWrapper(make_mlp([3, 4, 2]), per_sample_mse), **options)
