"""The parts a Sven step is composed of, each on its own against the dense float64 reference.

options (validated settings, deprecated names), spectrum (truncation with the route's floor,
M⁺ and its filtered form, leading ranks), rmsprop (the operator and directions it scales),
pinv's generators (the randomized modes draw from the optimizer's generator, LOBPCG from a
local one; neither touches torch's global RNG) and the state_dict of that generator.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, make_mlp, per_sample_mse
from reference import EPS64, reference_direction, relative_error

from sven.jacobian import DenseJacobian
from sven.nn import SvenWrapper
from sven.opt import Sven
from sven.opt.options import StepSettings, settings_from_options, translate_deprecated
from sven.opt.pinv import truncated_spectrum
from sven.opt.rmsprop import rmsprop_step
from sven.opt.spectrum import (
    CertifiedGramSpectrum,
    effective_rtol,
    eig_floor,
    gram_eigh,
    keep_leading,
    truncate,
)


def random_problem(rows: int = 10, cols: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return matrix, torch.randn(rows, generator=generator, dtype=torch.float64)


def test_settings_validate_and_name_what_they_received() -> None:
    with pytest.raises(ValueError, match=r"rmsprop must be one of \(None, 'pre', 'post'\); got 'both'"):
        StepSettings(rmsprop="both")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\); got 1.0"):
        StepSettings(momentum=1.0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['kk'\]"):
        settings_from_options({"kk": 3})
    assert StepSettings().fixed_damping == 0.0 and StepSettings(damping="adaptive").adaptive


@pytest.mark.parametrize("old, new", [
    (dict(use_rmsprop=True), dict(rmsprop="pre")),
    (dict(use_rmsprop=True, rmsprop_post=True), dict(rmsprop="post")),
    (dict(use_rmsprop=False), dict(rmsprop=None)),
    (dict(mu_rmsprop=0.5, alpha_rmsprop=0.9, eps_rmsprop=1e-3),
     dict(momentum=0.5, rmsprop_alpha=0.9, rmsprop_eps=1e-3)),
])
def test_deprecated_names_translate_with_a_warning(old: dict, new: dict) -> None:
    with pytest.warns(DeprecationWarning, match="deprecated; use"):
        assert translate_deprecated(old) == new


def test_deprecated_and_current_names_together_are_refused() -> None:
    with pytest.raises(ValueError, match="got both 'mu_rmsprop' \\(deprecated\\) and 'momentum'"):
        translate_deprecated({"mu_rmsprop": 0.1, "momentum": 0.2})
    with pytest.raises(ValueError, match="rmsprop_post=True .* needs use_rmsprop=True"):
        translate_deprecated({"rmsprop_post": True})


def test_truncation_applies_the_route_floor_once() -> None:
    sigma = torch.tensor([1.0, 1e-3, 1e-9], dtype=torch.float64)
    u = torch.eye(3, dtype=torch.float64)
    floor = eig_floor(3)
    assert effective_rtol(0.0, floor) == floor == (3 * EPS64) ** 0.5
    spectrum = truncate(u, sigma, None, k=3, rtol=0.0, floor=floor)
    assert spectrum.rank_kept == 2 and spectrum.rtol_used == floor
    assert truncate(u, sigma, None, k=3, rtol=1e-2, floor=floor).rank_kept == 1


@pytest.mark.parametrize("k", [2, 4, 8])
def test_eigen_route_keeps_the_reference_leading_triplets(k: int) -> None:
    """gram_eigh (eigh's ascending pairs flipped, counted by keep_leading) against the dense SVD of a rank-4 M."""
    generator = torch.Generator().manual_seed(3)
    matrix = torch.randn(8, 4, generator=generator, dtype=torch.float64) @ torch.randn(
        4, 20, generator=generator, dtype=torch.float64)
    residuals = torch.randn(8, generator=generator, dtype=torch.float64)
    u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    spectrum = gram_eigh(matrix @ matrix.T, k, rtol=1e-3)
    kept = min(k, 4)
    assert spectrum.rank_kept == kept
    assert torch.allclose(spectrum.sigma, sigma[:kept], rtol=1e-10, atol=0)
    assert torch.allclose(spectrum.sigma_all[:4], sigma[:4], rtol=1e-10, atol=0)
    assert float(spectrum.sigma_all[4:].max()) < 1e-6 * float(sigma[0])
    expected = vh[:kept].T @ ((u[:, :kept].T @ residuals) / sigma[:kept])
    assert relative_error(spectrum.direction(DenseJacobian(matrix), residuals), expected) < 1e-9
    order = torch.randperm(8, generator=generator)
    shuffled = truncate(u[:, order], sigma[order], vh[order].T, k, 1e-3, 0.0)
    leading = keep_leading(u, sigma, vh.T, k, 1e-3, 0.0)
    assert shuffled.rank_kept == leading.rank_kept == kept
    assert torch.equal(shuffled.sigma, leading.sigma) and torch.equal(shuffled.u.dense(), leading.u.dense())


def test_keep_leading_keeps_zeros_only_when_damped() -> None:
    sigma = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    u = torch.eye(3, dtype=torch.float64)
    assert keep_leading(u, sigma, None, 3, 0.0, 0.0).rank_kept == 2
    assert keep_leading(u, sigma, None, 3, 0.0, 0.0, keep_zero=True).rank_kept == 3
    assert keep_leading(u, sigma, None, 3, 0.6, 0.0, keep_zero=True).rank_kept == 1
    assert keep_leading(u[:, :0], sigma[:0], None, 3, 0.0, 0.0).rank_kept == 0


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_spectra_apply_the_reference_pseudoinverse_and_its_filter(damping: float) -> None:
    matrix, residuals = random_problem()
    operator = DenseJacobian(matrix)
    u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    expected = vh.T @ (sigma / (sigma**2 + damping) * (u.T @ residuals))
    certified = truncated_spectrum(operator, "gram", 64, 1e-3)
    assert isinstance(certified, CertifiedGramSpectrum)
    solved = (certified, truncated_spectrum(operator, "torch", 64, 1e-3), gram_eigh(operator.gram(), 64, 1e-3))
    for spectrum in solved:
        assert relative_error(spectrum.direction(operator, residuals, damping), expected) <= 1e-12
    leading = certified.leading(3)
    assert relative_error(leading.direction(operator, residuals), reference_direction(matrix, residuals, 3, 1e-3)) \
        <= 1e-12


@pytest.mark.parametrize("rtol, damping, certified", [(1e-3, 0.0, True), (1e-3, 0.3, True), (0.0, 0.3, True),
                                                     (0.5, 0.0, False)],
                         ids=["undamped", "damped", "damped_rtol_zero", "rtol_cuts"])
def test_rows_above_cols_take_a_cholesky_solve_of_the_column_side_when_nothing_is_cut(
    rtol: float, damping: float, certified: bool
) -> None:
    """Mᵀ M (cols × cols) certified: (Mᵀ M + λI)⁻¹ Mᵀ r = V diag(σ/(σ² + λ)) Uᵀ r, the same σ as the eigh route."""
    matrix, residuals = random_problem(rows=30, cols=10)
    operator = DenseJacobian(matrix)
    spectrum = truncated_spectrum(operator, "gram", 64, rtol, damping=damping)
    assert isinstance(spectrum, CertifiedGramSpectrum) == certified
    expected = reference_direction(matrix, residuals, 64, rtol, damping)
    assert relative_error(spectrum.direction(operator, residuals, damping), expected) <= 1e-12
    assert relative_error(spectrum.sigma, torch.linalg.svdvals(matrix)[:spectrum.rank_kept]) <= 1e-12


def test_a_damped_rank_deficient_column_side_is_factorised_with_its_damping() -> None:
    """rtol = 0 and λ > 0 cut nothing: no certificate factor exists for a singular Mᵀ M, so Mᵀ M + λI is factorised."""
    matrix, residuals = random_problem(rows=30, cols=10)
    matrix[:, -1] = matrix[:, 0]
    operator = DenseJacobian(matrix)
    spectrum = truncated_spectrum(operator, "gram", 64, 0.0, damping=0.3)
    assert isinstance(spectrum, CertifiedGramSpectrum) and spectrum.certificate.factor is None
    expected = reference_direction(matrix, residuals, 64, 0.0, 0.3)
    assert relative_error(spectrum.direction(operator, residuals, 0.3), expected) <= 1e-12


def test_rmsprop_pre_scales_the_columns_and_post_scales_the_directions() -> None:
    matrix, _ = random_problem()
    operator = DenseJacobian(matrix)
    mean_row = matrix.mean(dim=0)
    pre = rmsprop_step("pre", operator, None, 30, None, alpha=0.9, eps=1e-3)
    scale = 1 / ((0.1 * mean_row**2).sqrt() + 1e-3)
    assert relative_error(pre.operator.dense(), matrix * scale) <= 1e-14
    assert relative_error(pre.operator.gram(), (matrix * scale) @ (matrix * scale).T) <= 1e-14
    assert relative_error(pre.square_avg_after(update_applied=False), 0.1 * mean_row**2) <= 1e-14
    post = rmsprop_step("post", operator, None, 30, None, alpha=0.9, eps=1e-3)
    direction = torch.linspace(-1, 1, 30, dtype=torch.float64)
    scaled = post.direction_scaling(direction)
    assert relative_error(scaled, direction / ((0.1 * direction**2).sqrt() + 1e-3)) <= 1e-14
    assert post.operator is operator and post.square_avg_after(update_applied=False) is None
    assert rmsprop_step(None, operator, None, 30, None, 0.9, 1e-3).square_avg_after(True) is None


def randomized_steps(seed: int, mode: str = "randomized") -> tuple[torch.Tensor, Sven]:
    """One randomized step with k below the rank (so the test matrix matters) after torch.manual_seed(seed)."""
    model = make_mlp([3, 8, 2])
    torch.manual_seed(seed)
    optimizer = Sven(SvenWrapper(model, per_sample_mse), lr=0.5, k=3, svd_mode=mode, oversampling=0,
                     power_iterations=0)
    optimizer.step(make_batch(12, 3, 2))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), optimizer


@pytest.mark.parametrize("mode", ["randomized", "randomized_v2"])
def test_randomized_modes_are_reproducible_from_the_seed_and_leave_the_global_rng_alone(mode: str) -> None:
    first, optimizer = randomized_steps(0, mode)
    again, _ = randomized_steps(0, mode)
    other, _ = randomized_steps(1, mode)
    assert torch.equal(first, again) and not torch.equal(first, other)
    state = torch.get_rng_state()
    optimizer.step(make_batch(12, 3, 2, seed=5))
    assert torch.equal(torch.get_rng_state(), state)


def test_the_solver_generator_is_saved_and_restored_by_the_state_dict() -> None:
    _, optimizer = randomized_steps(0)
    saved = optimizer.state_dict()
    batch = make_batch(12, 3, 2, seed=5)
    before = [p.detach().clone() for p in optimizer.wrapped.model.parameters()]
    optimizer.step(batch)
    continued = [p.detach().clone() for p in optimizer.wrapped.model.parameters()]
    _, fresh = randomized_steps(7)
    with torch.no_grad():
        for param, value in zip(fresh.wrapped.model.parameters(), before):
            param.copy_(value)
    fresh.load_state_dict(saved)
    fresh.step(batch)
    assert all(torch.equal(a, b) for a, b in zip(continued, fresh.wrapped.model.parameters()))


def test_lobpcg_leaves_the_global_rng_alone() -> None:
    matrix, _ = random_problem(rows=24, cols=60)
    state = torch.get_rng_state()
    spectrum = truncated_spectrum(DenseJacobian(matrix), "lobpcg", 4, 1e-3)
    assert spectrum.rank_kept == 4 and torch.equal(torch.get_rng_state(), state)
