"""Tikhonov damping: the fixed-λ step is the Levenberg–Marquardt step; the adaptive rule accepts, undoes and retries.

References are dense float64 (tests/reference.py): the LM step Jᵀ(JJᵀ + λI)⁻¹e of the
prediction residuals e = f(x) − y, and the filtered truncated SVD V diag(σ/(σ² + λ)) Uᵀ r.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import flat_parameters, make_batch, make_mlp, per_sample_mse
from reference import EPS64, reference_residuals_and_jacobian, relative_error
from torch import Tensor

from sven import Sven, SvenWrapper


def prediction_residual(pred: Tensor, target: Tensor) -> Tensor:
    """e = f(x) − y for a single output, (B, 1) → (B,): with kappa = 2 the residual itself is inverted."""
    return (pred - target)[:, 0]


def damped_reference(jacobian: Tensor, residuals: Tensor, damping: float, k: int, rtol: float) -> Tensor:
    """V_k diag(σ/(σ² + λ)) U_kᵀ r over the σ that the truncation keeps, float64."""
    u, sigma, vh = torch.linalg.svd(jacobian, full_matrices=False)
    cut = max(rtol, max(jacobian.shape) * EPS64) * sigma[0]
    keep = int((sigma > cut).sum().clamp(max=k))
    filtered = sigma[:keep] / (sigma[:keep] ** 2 + damping)
    return vh[:keep].T @ (filtered * (u[:, :keep].T @ residuals))


@pytest.mark.parametrize("engine", ["gram", "functorch"])
@pytest.mark.parametrize("svd_mode", ["auto", "torch"])
@pytest.mark.parametrize("damping", [1e-3, 1.0])
def test_fixed_damping_with_kappa_one_is_the_levenberg_marquardt_step(engine: str, svd_mode: str,
                                                                      damping: float) -> None:
    """kappa = 1 inverts r = √l = |e| with M = sign(e)·J, so Mᵀ(MMᵀ + λI)⁻¹r = Jᵀ(JJᵀ + λI)⁻¹e exactly.

    Truncation is disabled (k ≥ rows, rtol = 0): only the routes' round-off floors remain.
    """
    model = make_mlp([1, 8, 8, 1], seed=3)
    batch = make_batch(12, 1, 1, seed=4)
    errors, jacobian = reference_residuals_and_jacobian(model, prediction_residual, batch)
    gram = jacobian @ jacobian.T
    expected = -0.7 * jacobian.T @ torch.linalg.solve(gram + damping * torch.eye(12, dtype=torch.float64), errors)
    wrapped = SvenWrapper(model, per_sample_mse, kappa=1.0, engine=engine)
    optimizer = Sven(wrapped, lr=0.7, k=12, rtol=0.0, svd_mode=svd_mode, damping=damping)
    before = flat_parameters(model)
    optimizer.step(batch)
    assert relative_error(flat_parameters(model) - before, expected) < 1e-8


def test_fixed_damping_filters_only_the_kept_singular_values() -> None:
    model = make_mlp([3, 6, 2])
    batch = make_batch(8, 3, 2)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch)
    expected = -0.5 * damped_reference(jacobian, residuals, 0.3, k=3, rtol=1e-3)
    before = flat_parameters(model)
    optimizer = Sven(SvenWrapper(model, per_sample_mse), lr=0.5, k=3, damping=0.3)
    optimizer.step(batch)
    assert relative_error(flat_parameters(model) - before, expected) < 1e-8
    assert optimizer.last_step["damping"] == 0.3 and optimizer.last_step["rank_kept"] == 3


class ScriptedLosses:
    """Replaces ``wrapped.batch_losses``: records the parameters each try reached and reports scripted losses."""

    def __init__(self, wrapped: SvenWrapper, rises: list[bool]) -> None:
        self.wrapped, self.rises, self.seen = wrapped, list(rises), []

    def __call__(self, batch: tuple) -> Tensor:
        self.seen.append(flat_parameters(self.wrapped.model))
        rise = self.rises.pop(0)
        return torch.full((batch[1].shape[0],), 1e6 if rise else 0.0, dtype=torch.float64)


def adaptive_setup(rises: list[bool], microbatch_size: int = 1, **options) -> tuple:
    model = make_mlp([3, 6, 2])
    batch = make_batch(8, 3, 2)
    wrapped = SvenWrapper(model, per_sample_mse, microbatch_size=microbatch_size, kappa=1.0)
    optimizer = Sven(wrapped, lr=0.5, damping="adaptive", damping_init=1e-2, **options)
    scripted = ScriptedLosses(wrapped, rises)
    wrapped.batch_losses = scripted
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch, kappa=1.0,
                                                           microbatch_size=microbatch_size)
    return model, batch, optimizer, scripted, residuals, jacobian


@pytest.mark.parametrize("microbatch_size", [1, 2])
def test_each_rejected_try_is_undone_and_retried_with_a_larger_damping(microbatch_size: int) -> None:
    """Two rejections then an acceptance: try j reaches exactly θ0 − lr·M⁺_λj r with λj = λ0·10^j (k, rtol kept)."""
    model, batch, optimizer, scripted, residuals, jacobian = adaptive_setup(
        [True, True, False], microbatch_size, k=3, rtol=1e-3)
    theta0 = flat_parameters(model)
    optimizer.step(batch)
    for tried, damping in zip(scripted.seen, [1e-2, 1e-1, 1.0]):
        expected = -0.5 * damped_reference(jacobian, residuals, damping, k=3, rtol=1e-3)
        assert relative_error(tried - theta0, expected) < 1e-8
    assert torch.equal(flat_parameters(model), scripted.seen[-1])
    report = optimizer.last_step
    assert (report["tries"], report["accepted"], report["damping"]) == (3, True, pytest.approx(1.0))
    assert optimizer.current_damping == pytest.approx(0.1), "λ must fall after an acceptance"


def test_a_step_whose_tries_all_fail_leaves_the_parameters_bit_identical_and_honours_max_tries() -> None:
    model, batch, optimizer, scripted, _, _ = adaptive_setup([True] * 10, max_tries=4)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step(batch)
    assert len(scripted.seen) == 4
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert (optimizer.last_step["tries"], optimizer.last_step["accepted"]) == (4, False)
    assert optimizer.last_step["step_norm"] == 0.0
    assert optimizer.current_damping == pytest.approx(1e-2 * 10**4), "λ must rise after each rejection"


def test_damping_stays_within_its_bounds() -> None:
    _, batch, optimizer, _, _, _ = adaptive_setup([True] * 3 + [False], max_tries=4, damping_max=0.5,
                                                  damping_min=0.2)
    optimizer.step(batch)
    assert optimizer.last_step["damping"] == 0.5 and optimizer.current_damping == 0.2


def test_adaptive_steps_lower_the_real_batch_loss_and_state_dict_carries_lambda() -> None:
    model = make_mlp([1, 8, 8, 1], seed=1)
    batch = make_batch(16, 1, 1, seed=2)
    wrapped = SvenWrapper(model, per_sample_mse, kappa=1.0)
    optimizer = Sven(wrapped, lr=1.0, damping="adaptive", damping_init=1e-4)
    dampings = []
    for _ in range(5):
        before = float(wrapped.batch_losses(batch).mean())
        optimizer.step(batch)
        after = float(wrapped.batch_losses(batch).mean())
        assert optimizer.last_step["accepted"] and after < before
        dampings.append(optimizer.current_damping)
    fresh = Sven(SvenWrapper(make_mlp([1, 8, 8, 1], seed=5), per_sample_mse, kappa=1.0), damping="adaptive")
    fresh.load_state_dict(optimizer.state_dict())
    assert fresh.current_damping == dampings[-1]


@pytest.mark.parametrize("options, message", [
    (dict(damping=-1.0), "damping must be a number >= 0 or 'adaptive'; got -1.0"),
    (dict(damping="lm"), "damping must be a number >= 0 or 'adaptive'; got 'lm'"),
    (dict(damping="adaptive", damping_increase=1.0), "damping_increase must be > 1; got 1.0"),
    (dict(damping="adaptive", damping_decrease=1.5), r"damping_decrease must be in \(0, 1\); got 1.5"),
    (dict(damping="adaptive", max_tries=0), "max_tries must be an integer >= 1; got 0"),
    (dict(damping="adaptive", damping_min=2.0, damping_max=1.0), "damping_min <= damping_max"),
    (dict(damping="adaptive", variable_k=True), "pick one"),
])
def test_bad_damping_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Sven(SvenWrapper(make_mlp([3, 4, 2]), per_sample_mse), **options)


def test_the_lm_baseline_says_how_to_install_the_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from sven.bench.lm_baseline import LevenbergMarquardtStepper, LevenbergMarquardtUnavailable

    monkeypatch.setitem(sys.modules, "torch_levenberg_marquardt", None)
    with pytest.raises(LevenbergMarquardtUnavailable, match=r"pip install sven\[lm\]") as raised:
        LevenbergMarquardtStepper(make_mlp([1, 4, 1]), per_sample_mse)
    assert isinstance(raised.value, ImportError)


def test_one_lm_package_step_equals_sven_with_kappa_one_and_damping_b_lambda() -> None:
    """The package solves (JJᵀ/B + λI)c = e/B: its first accepted try is Sven's step with damping B·λ, lr 1.

    λ = 2⁻⁷ because the package keeps λ in a float32 tensor.
    """
    pytest.importorskip("torch_levenberg_marquardt")
    from sven.bench.lm_baseline import LevenbergMarquardtStepper

    x, y = make_batch(16, 1, 1, seed=2)
    lm_model, sven_model = make_mlp([1, 8, 8, 1], seed=1), make_mlp([1, 8, 8, 1], seed=1)
    before = flat_parameters(lm_model)
    stepper = LevenbergMarquardtStepper(lm_model, per_sample_mse, {"starting_value": 2.0**-7, "solve_method": "solve"})
    loss_before = stepper.step(x, y)
    assert stepper.last_logs["attempts"] == 1, "the comparison needs the package's first try to be accepted"
    optimizer = Sven(SvenWrapper(sven_model, per_sample_mse, kappa=1.0), lr=1.0, k=16, rtol=0.0, damping=16 * 2.0**-7)
    losses = optimizer.step((x, y))
    assert loss_before == pytest.approx(float(losses.mean()), rel=1e-12)
    assert relative_error(flat_parameters(lm_model) - before, flat_parameters(sven_model) - before) < 1e-9
