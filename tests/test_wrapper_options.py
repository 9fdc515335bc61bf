"""SvenWrapper options against the dense reference: kappa, microbatch_size, param_fraction; the model's view."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import STEP_TOLERANCE, flat_parameters, make_batch, make_mlp, per_sample_mse
from reference import reference_direction, reference_residuals_and_jacobian, relative_error
from torch.nn.utils import vector_to_parameters

from sven.nn import SvenWrapper
from sven.opt import Sven

pytestmark = pytest.mark.usefixtures("single_thread")

LR, K, RTOL = 0.5, 64, 1e-3
BATCH_SIZE = 10  # groups of 3 leave a last group of 1, groups of 4 one of 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("svd_mode", ["gram", "torch"])
@pytest.mark.parametrize("engine", ["gram", "functorch"])
@pytest.mark.parametrize("microbatch_size", [1, 3, 4])
@pytest.mark.parametrize("kappa", [1.0, 2.0])
def test_kappa_and_microbatch_take_the_reference_step(
    kappa: float, microbatch_size: int, engine: str, svd_mode: str, dtype: torch.dtype
) -> None:
    model = make_mlp([3, 8, 2], dtype)
    batch = make_batch(BATCH_SIZE, 3, 2, dtype)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch, kappa, microbatch_size)
    wrapped = SvenWrapper(model, per_sample_mse, kappa=kappa, microbatch_size=microbatch_size, engine=engine)
    optimizer = Sven(wrapped, lr=LR, k=K, rtol=RTOL, svd_mode=svd_mode)
    before = flat_parameters(model)
    wrapped.loss_and_grad(batch)
    groups = -(-BATCH_SIZE // microbatch_size)
    assert wrapped.state.operator.shape == (groups, before.numel()) == tuple(jacobian.shape)
    assert relative_error(wrapped.state.residuals, residuals) <= STEP_TOLERANCE[dtype]
    optimizer.step()
    expected = -LR * reference_direction(jacobian, residuals, K, RTOL)
    assert relative_error(flat_parameters(model) - before, expected) <= STEP_TOLERANCE[dtype]


def test_ragged_last_group_is_the_mean_of_the_remaining_samples() -> None:
    """With B = 10 and m = 4 the residuals are the means of samples 0–3, 4–7 and 8–9 (kappa = 2)."""
    model = make_mlp([3, 8, 2])
    batch = make_batch(BATCH_SIZE, 3, 2)
    wrapped = SvenWrapper(model, per_sample_mse, microbatch_size=4)
    losses, _ = wrapped.loss_and_grad(batch)
    expected = torch.stack([losses[0:4].mean(), losses[4:8].mean(), losses[8:10].mean()]).double()
    assert losses.shape == (BATCH_SIZE,)
    assert torch.allclose(wrapped.state.residuals, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("svd_mode", ["gram", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_param_fraction_moves_only_the_drawn_subset_by_the_reference_step(dtype: torch.dtype, svd_mode: str) -> None:
    model = make_mlp([4, 5, 2], dtype)  # P = 37, so the subset has ⌊0.5 · 37⌋ = 18 columns
    batch = make_batch(8, 4, 2, dtype)
    drawn = []
    for _ in range(2):
        torch.manual_seed(7)
        wrapped = SvenWrapper(model, per_sample_mse, param_fraction=0.5)
        wrapped.loss_and_grad(batch)
        drawn.append(wrapped.state.columns)
    columns, total = drawn[0], wrapped.params.size
    assert torch.equal(drawn[1], columns), "torch.manual_seed must reproduce the subset"
    assert total == 37 and columns.shape == (18,) and len(set(columns.tolist())) == 18
    assert wrapped.state.operator.shape == (8, 18) and wrapped.state.operator.dense().shape == (8, 18)

    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch, columns=columns)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    Sven(wrapped, lr=LR, k=K, rtol=RTOL, svd_mode=svd_mode).step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    untouched = torch.ones(total, dtype=torch.bool)
    untouched[columns] = False
    assert torch.equal(after[untouched], before[untouched])
    expected = -LR * reference_direction(jacobian, residuals, K, RTOL)
    assert relative_error(after[columns].double() - before[columns].double(), expected) <= STEP_TOLERANCE[dtype]


def test_param_fraction_draws_a_fresh_subset_each_step() -> None:
    model = make_mlp([4, 5, 2])
    wrapped = SvenWrapper(model, per_sample_mse, param_fraction=0.5)
    optimizer = Sven(wrapped, lr=LR)
    drawn = []
    for seed in range(2):
        wrapped.loss_and_grad(make_batch(8, 4, 2, seed=seed))
        drawn.append(wrapped.state.columns)
        optimizer.step()
    assert not torch.equal(drawn[0], drawn[1])


@pytest.mark.parametrize("engine", ["gram", "functorch"])
def test_model_parameters_state_dict_and_forward_show_the_new_values(engine: str) -> None:
    model = make_mlp([3, 8, 2])
    x, y = make_batch(12, 3, 2)
    parameters_before = list(model.parameters())
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, (x, y))
    expected_model = copy.deepcopy(model)
    vector_to_parameters(
        flat_parameters(model) - LR * reference_direction(jacobian, residuals, K, RTOL), expected_model.parameters()
    )
    old_output = model(x).detach()

    wrapped = SvenWrapper(model, per_sample_mse, engine=engine)
    optimizer = Sven(wrapped, lr=LR, k=K, rtol=RTOL)
    wrapped.loss_and_grad((x, y))
    optimizer.step()

    assert all(now is then for now, then in zip(model.parameters(), parameters_before, strict=True))
    assert all(p is q for p, q in zip(optimizer.param_groups[0]["params"], model.parameters(), strict=True))
    for name, value in model.state_dict().items():
        assert torch.allclose(value, expected_model.state_dict()[name], rtol=1e-10, atol=1e-12), name
    assert torch.allclose(model(x), expected_model(x), rtol=1e-10, atol=1e-12)
    assert torch.allclose(wrapped(x), expected_model(x), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(model(x), old_output, rtol=1e-3, atol=0)



@pytest.mark.parametrize("engine", ["gram", "functorch"])
def test_kappa_one_gives_a_zero_loss_sample_a_zero_row_instead_of_skipping(engine: str) -> None:
    """l_i = 0 exactly: r_i = 0 and row i of M is zero; the step is the reference step on the other rows."""
    model = make_mlp([3, 8, 2])
    x, y = make_batch(BATCH_SIZE, 3, 2)
    with torch.no_grad():
        y[4] = model(x[4:5])[0]
    wrapped = SvenWrapper(model, per_sample_mse, kappa=1.0, engine=engine)
    optimizer = Sven(wrapped, lr=LR, k=K, rtol=RTOL)
    losses, _ = wrapped.loss_and_grad((x, y))
    assert losses[4] == 0
    _, loss_jacobian = reference_residuals_and_jacobian(model, per_sample_mse, (x, y), kappa=2.0)
    root = losses.double().sqrt()
    row_scale = torch.where(root > 0, 0.5 / root, torch.zeros_like(root))
    expected = -LR * reference_direction(row_scale[:, None] * loss_jacobian, root, K, RTOL)
    before = flat_parameters(model)
    optimizer.step()
    assert optimizer.last_step["skipped"] is False
    assert relative_error(flat_parameters(model) - before, expected) <= 1e-8
