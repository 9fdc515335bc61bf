"""Weight decay: every mode and combination against a dense float64 solve of the normal equations.

The step minimises ‖r + M d‖² + μ‖d‖² + Σ_j λ_j (θ_j + d_j)² + λ_F ‖M(θ + d)‖², then
θ ← θ + lr·d − lr·λ_dec·θ. The reference forms the P × P normal equations
[(1 + λ_F) MᵀM + μI + Λ] d = −Mᵀ(r + λ_F Mθ) − Λθ from the jacrev Jacobian and takes their
minimum-norm solution. Tolerance 1e-8: the test problems are well conditioned (the
regularised matrices have κ ≤ 1e4, so float64 solves agree to κ·n·u ≈ 1e-10).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import flat_parameters, make_batch, make_mlp, per_sample_mse
from reference import reference_direction, reference_residuals_and_jacobian, relative_error

from sven.nn import SvenWrapper
from sven.opt import Sven

TOLERANCE = 1e-8
LR = 0.7


def normal_equation_step(jacobian: torch.Tensor, residuals: torch.Tensor, theta: torch.Tensor, decay: torch.Tensor,
                         mu: float, fisher: float) -> torch.Tensor:
    """The minimum-norm d of the regularised normal equations (P,), float64."""
    matrix = (1 + fisher) * jacobian.T @ jacobian + torch.diag(mu + decay)
    rhs = -jacobian.T @ (residuals + fisher * jacobian @ theta) - decay * theta
    return torch.linalg.pinv(matrix, hermitian=True, rtol=1e-12) @ rhs


def groups_of(model: torch.nn.Module, weight_decay: float, bias_decay: float, decoupled: float) -> list[dict]:
    """Two groups: weights (decayed) and biases, the AdamW habit."""
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    return [{"params": weights, "weight_decay": weight_decay, "decoupled_weight_decay": decoupled},
            {"params": biases, "weight_decay": bias_decay, "decoupled_weight_decay": 0.0}]


def column_values(model: torch.nn.Module, weight_value: float, bias_value: float) -> torch.Tensor:
    return torch.cat([torch.full((p.numel(),), weight_value if name.endswith("weight") else bias_value,
                                 dtype=torch.float64) for name, p in model.named_parameters()])


CASES: dict[str, dict[str, Any]] = {
    "coupled_all": dict(weight=0.1, bias=0.1),
    "coupled_weights_only": dict(weight=0.1, bias=0.0),
    "fisher_only": dict(fisher=0.5),
    "fisher_and_coupled": dict(weight=0.05, bias=0.0, fisher=0.3),
    "damping_and_coupled": dict(weight=0.02, bias=0.0, mu=0.05),
    "everything": dict(weight=0.05, bias=0.01, fisher=0.2, mu=0.01, decoupled=0.1),
    "relative": dict(weight=1e-2, bias=0.0, mu=1e-3, relative=True),
}


@pytest.mark.parametrize("batch_size", [6, 40], ids=["rows_lt_p", "rows_gt_p"])
@pytest.mark.parametrize("engine", ["gram", "functorch"])
@pytest.mark.parametrize("case_name", CASES)
def test_regularised_step_solves_the_normal_equations(case_name: str, engine: str, batch_size: int) -> None:
    case = {"weight": 0.0, "bias": 0.0, "fisher": 0.0, "mu": 0.0, "decoupled": 0.0, "relative": False,
            **CASES[case_name]}
    model = make_mlp([3, 5, 2])
    batch = make_batch(batch_size, 3, 2)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch, kappa=1.0)
    theta = flat_parameters(model)
    unit = float(torch.linalg.matrix_norm(jacobian, ord=2)) ** 2 if case["relative"] else 1.0
    decay = column_values(model, case["weight"], case["bias"]) * unit
    d = normal_equation_step(jacobian, residuals, theta, decay, case["mu"] * unit, case["fisher"])
    expected = theta + LR * d - LR * column_values(model, case["decoupled"], 0.0) * theta
    wrapped = SvenWrapper(model, per_sample_mse, kappa=1.0, engine=engine)
    optimizer = Sven(wrapped, lr=LR, params=groups_of(model, case["weight"], case["bias"], case["decoupled"]),
                     fisher_decay=case["fisher"], damping=case["mu"], relative=case["relative"])
    optimizer.step(batch)
    assert optimizer.last_step["svd_mode"] == "regularized"
    assert relative_error(flat_parameters(model) - theta, expected - theta) <= TOLERANCE


@pytest.mark.parametrize("engine", ["gram", "functorch"])
def test_decoupled_decay_alone_shrinks_the_pre_step_parameters_beside_the_plain_step(engine: str) -> None:
    model = make_mlp([3, 5, 2])
    batch = make_batch(6, 3, 2)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch)
    theta = flat_parameters(model)
    expected = theta - LR * reference_direction(jacobian, residuals, 64, 1e-3) - LR * 0.2 * theta
    optimizer = Sven(SvenWrapper(model, per_sample_mse, engine=engine), lr=LR, decoupled_weight_decay=0.2)
    optimizer.step(batch)
    assert optimizer.last_step["svd_mode"] != "regularized"
    assert relative_error(flat_parameters(model) - theta, expected - theta) <= TOLERANCE


@pytest.mark.parametrize("engine", ["gram", "functorch"])
def test_penalties_act_on_the_drawn_columns_with_param_fraction(engine: str) -> None:
    model = make_mlp([3, 5, 2])
    batch = make_batch(6, 3, 2)
    theta = flat_parameters(model)
    torch.manual_seed(4)
    wrapped = SvenWrapper(model, per_sample_mse, kappa=1.0, param_fraction=0.5, engine=engine)
    optimizer = Sven(wrapped, lr=LR, weight_decay=0.1, fisher_decay=0.2, decoupled_weight_decay=0.1)
    generator_state = wrapped.generator.get_state()
    columns = wrapped.draw_columns()
    wrapped.generator.set_state(generator_state)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch, kappa=1.0, columns=columns)
    d = normal_equation_step(jacobian, residuals, theta[columns], torch.full((columns.numel(),), 0.1,
                                                                              dtype=torch.float64), 0.0, 0.2)
    optimizer.step(batch)
    after = flat_parameters(model)
    untouched = torch.ones_like(theta, dtype=torch.bool)
    untouched[columns] = False
    assert torch.equal(after[untouched], theta[untouched])
    expected = LR * d - LR * 0.1 * theta[columns]
    assert relative_error(after[columns] - theta[columns], expected) <= TOLERANCE


def test_every_decay_zero_is_bit_identical_to_the_plain_step() -> None:
    steps = []
    for options in ({}, {"weight_decay": 0.0, "fisher_decay": 0.0, "decoupled_weight_decay": 0.0}):
        model = make_mlp([3, 5, 2])
        Sven(SvenWrapper(model, per_sample_mse), lr=LR, **options).step(make_batch(6, 3, 2))
        steps.append(flat_parameters(model))
    assert torch.equal(steps[0], steps[1])


@pytest.mark.parametrize("options, message", [
    (dict(weight_decay=0.1, rmsprop="pre"), "rmsprop='pre' rescales the columns"),
    (dict(fisher_decay=0.1, variable_k=True), "variable_k cuts the spectrum"),
    (dict(weight_decay=-1.0), "weight_decay must be a number >= 0; got -1.0"),
    (dict(fisher_decay=-1.0), "fisher_decay must be >= 0; got -1.0"),
    (dict(relative=True, damping="adaptive"), "relative=True .* pick one"),
])
def test_combinations_without_a_defined_step_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Sven(SvenWrapper(make_mlp([3, 5, 2]), per_sample_mse), **options)


def test_adaptive_damping_searches_mu_of_the_regularised_step() -> None:
    """With weight decay and damping='adaptive' each try is the exact regularised minimiser for its μ."""
    model = make_mlp([3, 5, 2])
    batch = make_batch(6, 3, 2)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch, kappa=1.0)
    theta = flat_parameters(model)
    optimizer = Sven(SvenWrapper(model, per_sample_mse, kappa=1.0), lr=LR, weight_decay=0.05, damping="adaptive",
                     damping_init=1e-2)
    optimizer.step(batch)
    mu = optimizer.last_step["damping"]
    assert optimizer.last_step["accepted"]
    d = normal_equation_step(jacobian, residuals, theta, torch.full_like(theta, 0.05), mu, 0.0)
    assert relative_error(flat_parameters(model) - theta, LR * d) <= TOLERANCE


class Shift(torch.nn.Module):
    """A layer without a Gram rule (x + shift): its parameter goes to the Gram engine's fallback."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(torch.linspace(-0.5, 0.5, width, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x + self.shift)


@pytest.mark.parametrize("chunk_numel", [2**22, 8], ids=["kept", "recomputed"])
def test_a_fallback_layer_takes_part_in_the_regularised_step(chunk_numel: int) -> None:
    """M θ, the per-group Grams and Mᵀc of a fallback block (kept or recomputed in chunks) enter the solve."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), Shift(5), torch.nn.Linear(5, 2)).double()
    batch = make_batch(6, 3, 2)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch, kappa=1.0)
    theta = flat_parameters(model)
    decay = torch.cat([torch.full((p.numel(),), 0.1 if name.endswith("weight") else 0.0, dtype=torch.float64)
                       for name, p in model.named_parameters()])
    d = normal_equation_step(jacobian, residuals, theta, decay, 0.0, 0.3)
    wrapped = SvenWrapper(model, per_sample_mse, kappa=1.0, fallback_chunk_numel=chunk_numel)
    assert wrapped.engine_plan()["fallback_parameters"] == ["1.shift"]
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    others = [p for name, p in model.named_parameters() if not name.endswith("weight")]
    optimizer = Sven(wrapped, lr=LR, params=[{"params": weights, "weight_decay": 0.1}, {"params": others}],
                     fisher_decay=0.3)
    optimizer.step(batch)
    assert relative_error(flat_parameters(model) - theta, LR * d) <= TOLERANCE


def test_a_zero_jacobian_with_coupled_decay_is_a_pure_shrink() -> None:
    """Every loss already 0 (κ = 2: M = 0 exactly): the minimiser is d = −λ/(λ + μ)·θ, no skip, no crash."""
    model = make_mlp([3, 5, 2])
    x, _ = make_batch(6, 3, 2)
    with torch.no_grad():
        y = model(x)
    theta = flat_parameters(model)
    optimizer = Sven(SvenWrapper(model, per_sample_mse), lr=0.5, weight_decay=1e-2, damping=1e-3)
    optimizer.step((x, y))
    assert optimizer.last_step["skipped"] is False
    assert relative_error(flat_parameters(model), (1 - 0.5 * 1e-2 / (1e-2 + 1e-3)) * theta) <= 1e-12


def test_the_eigh_root_replaces_a_cholesky_that_rounding_defeats(monkeypatch: pytest.MonkeyPatch) -> None:
    """H = I + K has every eigenvalue ≥ 1; when its Cholesky fails (huge ‖K‖), the clamped symmetric root
    gives the same minimiser (here Cholesky is made to fail on purpose)."""
    model = make_mlp([3, 5, 2])
    batch = make_batch(6, 3, 2)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch, kappa=1.0)
    theta = flat_parameters(model)
    decay = column_values(model, 0.05, 0.0)
    d = normal_equation_step(jacobian, residuals, theta, decay, 0.0, 0.3)
    failing = lambda matrix: (matrix, torch.ones((), dtype=torch.int32))  # noqa: E731
    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    optimizer = Sven(SvenWrapper(model, per_sample_mse, kappa=1.0), lr=LR, params=groups_of(model, 0.05, 0.0, 0.0),
                     fisher_decay=0.3)
    optimizer.step(batch)
    assert relative_error(flat_parameters(model) - theta, LR * d) <= TOLERANCE
