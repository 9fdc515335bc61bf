"""Sven as a torch.optim.Optimizer: param groups, schedulers, step(batch), diagnostics, RMSProp, momentum, variable_k.

Every step is checked against the dense float64 reference (tests/reference.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import flat_parameters, make_batch, make_mlp, per_sample_mse
from reference import reference_direction, reference_residuals_and_jacobian, relative_error
from torch import Tensor, nn

from sven import Sven, SvenWrapper

TIGHT = 1e-8
"""Gram route in float64: eigh of M Mᵀ squares the condition number (about 1e-9 here)."""


def setup(engine: str = "gram", batch_size: int = 8, seed: int = 0) -> tuple[nn.Module, SvenWrapper, tuple]:
    model = make_mlp([3, 6, 2], seed=seed)
    return model, SvenWrapper(model, per_sample_mse, engine=engine), make_batch(batch_size, 3, 2)


def reference_step_direction(model: nn.Module, batch: tuple, k: int = 64, rtol: float = 1e-3) -> Tensor:
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch)
    return reference_direction(jacobian, residuals, k, rtol)


def restore(model: nn.Module, flat: Tensor) -> None:
    torch.nn.utils.vector_to_parameters(flat.clone(), list(model.parameters()))


def test_per_group_lr_scales_that_groups_part_of_the_one_step() -> None:
    model, wrapped, batch = setup()
    first_layer = list(model[0].parameters())
    rest = list(model[2].parameters())
    optimizer = Sven(wrapped, lr=0.5, params=[{"params": first_layer, "lr": 0.1}, {"params": rest}])
    before = flat_parameters(model)
    direction = reference_step_direction(model, batch)
    optimizer.step(batch)
    cut = sum(p.numel() for p in first_layer)
    lrs = torch.cat([torch.full((cut,), 0.1), torch.full((direction.numel() - cut,), 0.5)]).double()
    assert relative_error(flat_parameters(model) - before, -lrs * direction) < TIGHT
    assert optimizer.last_step["step_norm"] == pytest.approx(float((lrs * direction).norm()), rel=1e-9)


@pytest.mark.parametrize("groups, message", [
    (lambda m: [{"params": list(m[0].parameters())}], "cover exactly"),
    (lambda m: [{"params": list(m.parameters()), "k": 3}], "may only set lr, weight_decay, decoupled_weight_decay"),
    (lambda m: [{"params": list(m.parameters())}, {"params": [m[0].weight]}], "more than once"),
    (lambda m: [{"params": list(m.parameters()) + [nn.Parameter(torch.zeros(2))]}], "1 not in the model"),
    (lambda m: [{"params": list(m.parameters()), "lr": -1.0}], "lr must be a number >= 0"),
])
def test_param_groups_that_cannot_be_honoured_are_refused(groups, message: str) -> None:
    model, wrapped, _ = setup()
    with pytest.raises(ValueError, match=message):
        Sven(wrapped, params=groups(model))


def test_add_param_group_refuses_and_zero_grad_is_harmless() -> None:
    model, wrapped, batch = setup()
    optimizer = Sven(wrapped)
    with pytest.raises(ValueError, match="cannot add a param group .*1 tensor"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    direction = reference_step_direction(model, batch)
    before = flat_parameters(model)
    wrapped.loss_and_grad(batch)
    optimizer.zero_grad()
    optimizer.step()
    assert relative_error(flat_parameters(model) - before, -0.1 * direction) < TIGHT


def test_groups_that_diverge_in_a_shared_setting_are_refused_at_step() -> None:
    model, wrapped, batch = setup()
    optimizer = Sven(wrapped, params=[{"params": list(model[0].parameters())},
                                      {"params": list(model[2].parameters())}])
    optimizer.param_groups[1]["k"] = 2
    with pytest.raises(ValueError, match=r"differ in \['k'\]"):
        optimizer.step(batch)


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.01),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.4, total_steps=6,
                                                                 cycle_momentum=False),
    "ReduceLROnPlateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_scale_the_step_as_they_scale_sgds_lr(name: str) -> None:
    """Each step starts from the same θ0, so Δθ = −lr_t·M⁺r with lr_t the lr the scheduler gives SGD."""
    model, wrapped, batch = setup()
    optimizer = Sven(wrapped, lr=0.2)
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    schedulers = [SCHEDULERS[name](optimizer), SCHEDULERS[name](sgd)]
    theta0 = flat_parameters(model)
    direction = reference_step_direction(model, batch)
    implied = []
    for _ in range(6):
        restore(model, theta0)
        optimizer.step(batch)
        sgd.step()
        delta = flat_parameters(model) - theta0
        implied.append(float(-(delta @ direction) / (direction @ direction)))
        assert relative_error(delta, -implied[-1] * direction) < TIGHT
        assert implied[-1] == pytest.approx(sgd.param_groups[0]["lr"], rel=1e-10)
        for scheduler in schedulers:
            scheduler.step(1.0) if name == "ReduceLROnPlateau" else scheduler.step()
    assert len(set(round(lr, 12) for lr in implied)) > 1, f"{name} never changed the step: {implied}"


def test_step_with_batch_equals_loss_and_grad_then_step() -> None:
    model_a, wrapped_a, batch = setup()
    model_b, wrapped_b, _ = setup()
    losses_a = Sven(wrapped_a).step(batch)
    losses_b, _ = wrapped_b.loss_and_grad(batch)
    Sven(wrapped_b).step()
    assert torch.equal(losses_a, losses_b)
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


def test_last_step_and_svd_history_report_the_reference_spectrum() -> None:
    model, wrapped, batch = setup(batch_size=6)
    optimizer = Sven(wrapped, lr=0.3, k=4, rtol=1e-3, track_svd_info=True)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch)
    sigma = torch.linalg.svdvals(jacobian)
    direction = reference_direction(jacobian, residuals, 4, 1e-3)
    optimizer.step(batch)
    report = optimizer.last_step
    assert report["skipped"] is False and report["rank_kept"] == 4 and report["svd_mode"] == "gram"
    assert relative_error(report["kept_singular_values"], sigma[:4]) < 1e-8
    assert report["sigma_max"] == pytest.approx(float(sigma[0]), rel=1e-10)
    assert report["rtol_cut"] == pytest.approx(1e-3 * float(sigma[0]), rel=1e-10)
    assert report["step_norm"] == pytest.approx(0.3 * float(direction.norm()), rel=1e-9)
    assert report["mean_loss"] == pytest.approx(float(residuals.mean()), rel=1e-12)
    assert report["solve_time"] > 0 and report["damping"] == 0.0
    optimizer.step(batch)
    assert [entry["step"] for entry in optimizer.svd_history] == [1, 2]
    assert relative_error(optimizer.svd_history[0]["kept_singular_values"], sigma[:4]) < 1e-8
    assert relative_error(optimizer.svd_history[0]["all_singular_values"], sigma) < 1e-6


def mean_jacobian_row(jacobian: Tensor) -> Tensor:
    """g = Mᵀ1 / G (P,), the statistic RMSProp averages."""
    return jacobian.mean(dim=0)


def rmsprop_scale(jacobian: Tensor, alpha: float, eps: float) -> Tensor:
    return 1.0 / (((1 - alpha) * mean_jacobian_row(jacobian) ** 2).sqrt() + eps)


@pytest.mark.parametrize("engine", ["gram", "functorch"])
def test_rmsprop_pre_scaling_first_step_matches_the_scaled_reference(engine: str) -> None:
    """Δθ = −lr·(M D)⁺ r with D = 1/(√((1−α) g²) + eps), g = Mᵀ1/G."""
    model, wrapped, batch = setup(engine)
    optimizer = Sven(wrapped, lr=0.2, rmsprop="pre", rmsprop_alpha=0.9, rmsprop_eps=1e-3)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch)
    expected = -0.2 * reference_direction(jacobian * rmsprop_scale(jacobian, 0.9, 1e-3), residuals, 64, 1e-3)
    before = flat_parameters(model)
    optimizer.step(batch)
    assert relative_error(flat_parameters(model) - before, expected) < 1e-9
    assert relative_error(optimizer.square_avg, 0.1 * mean_jacobian_row(jacobian) ** 2) < 1e-9


@pytest.mark.parametrize("engine", ["gram", "functorch"])
def test_rmsprop_post_scaling_normalises_the_update_by_its_running_rms(engine: str) -> None:
    """d = M⁺ r, v = α·v_prev + (1−α)·d², Δθ = −lr·d/(√v + eps), over two steps."""
    model, wrapped, batch = setup(engine)
    optimizer = Sven(wrapped, lr=0.2, rmsprop="post", rmsprop_alpha=0.9, rmsprop_eps=1e-3)
    average = torch.zeros_like(flat_parameters(model))
    for _ in range(2):
        direction = reference_step_direction(model, batch)
        average = 0.9 * average + 0.1 * direction**2
        before = flat_parameters(model)
        optimizer.step(batch)
        assert relative_error(flat_parameters(model) - before, -0.2 * direction / (average.sqrt() + 1e-3)) < 1e-9
        assert relative_error(optimizer.square_avg, average) < 1e-9


def test_rmsprop_second_step_averages_the_squared_mean_rows() -> None:
    """v₂ = α·(1−α)·g₁² + (1−α)·g₂² and Δθ₂ = −lr·(M₂ D₂)⁺ r₂ with D₂ = 1/(√v₂ + eps)."""
    model, wrapped, batch = setup()
    optimizer = Sven(wrapped, lr=0.2, rmsprop="pre", rmsprop_alpha=0.9, rmsprop_eps=1e-3)
    _, first_jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch)
    optimizer.step(batch)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch)
    average = 0.9 * 0.1 * mean_jacobian_row(first_jacobian) ** 2 + 0.1 * mean_jacobian_row(jacobian) ** 2
    expected = -0.2 * reference_direction(jacobian / (average.sqrt() + 1e-3), residuals, 64, 1e-3)
    before = flat_parameters(model)
    optimizer.step(batch)
    assert relative_error(optimizer.square_avg, average) < 1e-9
    assert relative_error(flat_parameters(model) - before, expected) < 1e-9


def test_momentum_adds_mu_times_the_previous_step() -> None:
    model, wrapped, batch = setup()
    optimizer = Sven(wrapped, lr=0.2, momentum=0.5)
    first = reference_step_direction(model, batch)
    optimizer.step(batch)
    second = reference_step_direction(model, batch)
    before = flat_parameters(model)
    optimizer.step(batch)
    assert relative_error(flat_parameters(model) - before, -0.2 * (0.5 * first + second)) < 1e-9


def test_variable_k_keeps_the_greedy_rank_and_counts_its_forward_passes() -> None:
    model, wrapped, batch = setup(batch_size=8)
    optimizer = Sven(wrapped, lr=1.0, variable_k=True)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch)
    u, sigma, vh = torch.linalg.svd(jacobian, full_matrices=False)
    theta0 = flat_parameters(model)
    rank_all = int((sigma > 1e-3 * sigma[0]).sum())

    def step_of_rank(rank: int) -> Tensor:
        return -vh[:rank].T @ (u[:, :rank].T @ residuals / sigma[:rank])

    def loss_of_rank(rank: int) -> float:
        restore(model, theta0 + step_of_rank(rank))
        return float(wrapped.batch_losses(batch).mean())

    losses = [loss_of_rank(rank) for rank in range(1, rank_all + 1)]
    expected = next((j for j in range(1, rank_all) if not losses[j] < losses[j - 1]), rank_all)
    restore(model, theta0)
    wrapped.loss_and_grad(batch)  # the first batch also checks the engine, one more forward
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    optimizer.step(batch)
    assert optimizer.last_step["rank_kept"] == expected
    assert relative_error(flat_parameters(model) - theta0, step_of_rank(expected)) < 1e-9
    assert len(forwards) == 1 + min(expected + 1, rank_all)
