"""svd_mode "cg" (sven.opt.matrix_free): the uncut damped step without an eigendecomposition, against the dense
float64 reference; the Gram matrix in row blocks; Gram-vector products from the blocks' factors.

Step tolerance: the solve returns c with relative residual ρ = ‖(G + λI) c − r‖/‖r‖ (reported, ≤ 1e-8).
With M = U Σ Vᵀ of full row rank, d = Mᵀ c = V diag(σ/(σ² + λ)) Uᵀ r + Mᵀ (G + λI)⁻¹ (residual), so
‖δd‖/‖d‖ ≤ φ·ρ with φ = max_i f(σ_i) / min_i f(σ_i), f(σ) = σ/(σ² + λ): the filter's condition number
(a few hundred on these problems). Each test asserts both φ·ρ (plus float64 rounding) and 1e-8.
"""

from __future__ import annotations

import pytest
import torch
from conftest import LR, STEP_TOLERANCE, Case, flat_parameters, make_batch, make_mlp, per_sample_mse
from reference import reference_direction, reference_residuals_and_jacobian, relative_error

from sven.cost import gram_fits
from sven.jacobian.blocks import OuterProductBlock
from sven.nn import SvenWrapper
from sven.opt import Sven, matrix_free
from sven.opt.matrix_free import RESIDUAL_TOLERANCE
from sven.opt.pinv import resolve_mode

DAMPING = 1e-3
CASE = Case((3, 8, 2), 12)  # M is 12 × 50
ROUNDING = 1e-12


def filter_condition(jacobian: torch.Tensor, damping: float) -> float:
    """max f(σ) / min f(σ) over M's singular values, f(σ) = σ/(σ² + λ)."""
    sigma = torch.linalg.svdvals(jacobian)
    weights = sigma / (sigma**2 + damping)
    return float(weights.max() / weights.min())


def cg_step(wrapper: dict, dtype: torch.dtype = torch.float64, **options
            ) -> tuple[torch.Tensor, torch.Tensor, Sven, float]:
    """(Sven's step, the reference step, the optimizer, ``filter_condition``) on ``CASE`` with λ and k = rows."""
    model, batch = CASE.model_and_batch(dtype)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch, **wrapper)
    expected = -LR * reference_direction(jacobian, residuals, CASE.batch_size, 0.0, DAMPING)
    wrapped = SvenWrapper(model, per_sample_mse, engine="gram", **wrapper)
    optimizer = Sven(wrapped, lr=LR, k=CASE.k, rtol=CASE.rtol, damping=DAMPING, **options)
    before = flat_parameters(model)
    wrapped.loss_and_grad(batch)
    optimizer.step()
    return flat_parameters(model) - before, expected, optimizer, filter_condition(jacobian, DAMPING)


@pytest.mark.parametrize("wrapper", [{}, {"kappa": 1.0}], ids=["plain", "kappa_1"])
@pytest.mark.parametrize("gram_memory, route", [(0, "pcg"), (2**20, "cholesky")])
def test_cg_route_matches_the_dense_reference(single_thread, monkeypatch, wrapper: dict, gram_memory: int,
                                              route: str) -> None:
    """A rank-4 preconditioner for 12 rows: CG has to iterate. 2²⁰ bytes hold three 12 × 12 float64 matrices."""
    monkeypatch.setattr(matrix_free, "PRECONDITIONER_RANK", 4)
    step, expected, optimizer, condition = cg_step(wrapper, svd_mode="cg", gram_memory=gram_memory)
    report = optimizer.last_step
    assert report["svd_mode"] == "cg" and report["normal_equation_route"] == route
    assert report["normal_equation_residual"] <= RESIDUAL_TOLERANCE
    assert report["rank_kept"] == CASE.batch_size
    if route == "pcg":
        assert report["cg_iterations"] > 1
    error = relative_error(step, expected)
    assert error <= condition * report["normal_equation_residual"] + ROUNDING
    assert error <= 1e-8


def test_cg_route_in_float32(single_thread, monkeypatch) -> None:
    """A float32 model: the sketch in float32, CG on float64 products of the float32 factors (residual ≤ 1e-8);
    the step within ``STEP_TOLERANCE`` of the float64 reference, as every float32 route."""
    monkeypatch.setattr(matrix_free, "PRECONDITIONER_RANK", 4)
    step, expected, optimizer, _ = cg_step({}, torch.float32, svd_mode="cg", gram_memory=0)
    assert optimizer.last_step["normal_equation_residual"] <= RESIDUAL_TOLERANCE
    assert relative_error(step, expected) <= STEP_TOLERANCE[torch.float32]


def test_auto_goes_matrix_free_past_the_memory_budget(single_thread) -> None:
    _, _, optimizer, _ = cg_step({}, svd_mode="auto", gram_memory=0)
    assert optimizer.last_step["svd_mode"] == "cg"
    assert optimizer.last_step["normal_equation_residual"] <= RESIDUAL_TOLERANCE


@pytest.mark.parametrize("damping, k, rows, budget, expected", [
    (1e-3, 64, 12, 0, "cg"), (1e-3, 64, 12, 3 * 12 * 12 * 8, "gram"), (0.0, 64, 12, 0, "gram"),
    (1e-3, 8, 12, 0, "gram"), (1e-3, None, 12, 0, "cg"),
])
def test_the_route_rule(damping: float, k: int | None, rows: int, budget: int, expected: str) -> None:
    """"cg" only for a damped step keeping every row whose Gram matrix and factor exceed the budget."""
    assert gram_fits(rows, 3 * rows * rows * 8) and not gram_fits(rows, 3 * rows * rows * 8 - 1)
    assert resolve_mode("auto", (rows, 50), 1e-3, damping, k, budget) == expected


@pytest.mark.parametrize("options, message", [
    (dict(k=4, damping=DAMPING), "k = 4"), (dict(k=64, damping=0.0, rtol=1e-3), "rtol"),
])
def test_cg_refuses_cuts_that_need_the_spectrum(options: dict, message: str) -> None:
    model, batch = CASE.model_and_batch(torch.float64)
    wrapped = SvenWrapper(model, per_sample_mse, engine="gram")
    optimizer = Sven(wrapped, svd_mode="cg", **options)
    wrapped.loss_and_grad(batch)
    with pytest.raises(ValueError, match=message):
        optimizer.step()


def test_cg_refuses_a_rank_search() -> None:
    wrapped = SvenWrapper(make_mlp([3, 8, 2]), per_sample_mse, engine="gram")
    with pytest.raises(ValueError, match="variable_k"):
        Sven(wrapped, svd_mode="cg", variable_k=True)


def gram_operator(sizes: list[int], batch_size: int):
    model = make_mlp(sizes)
    wrapped = SvenWrapper(model, per_sample_mse, engine="gram", kappa=1.0)
    wrapped.loss_and_grad(make_batch(batch_size, sizes[0], sizes[-1]))
    return wrapped.state.operator


def test_gram_matmul_equals_the_gram_matrix_times_u() -> None:
    """From the factors (row-scaled by κ = 1) and by columns: M (Mᵀ U) = (M Mᵀ) U."""
    operator = gram_operator([5, 16, 3], 20)
    u = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = operator.gram() @ u
    assert relative_error(operator.gram_matmul(u), expected) <= 1e-13
    assert relative_error(operator.gram_matmul(u[:, 0]), expected[:, 0]) <= 1e-13


def test_blocked_gram_equals_the_unblocked_one(monkeypatch) -> None:
    """The engine's M Mᵀ assembled 3 rows at a time equals the one-block Gram matrix."""
    batch_size = 20
    whole = gram_operator([5, 16, 3], batch_size).gram()
    monkeypatch.setattr("sven.jacobian.gram_engine.GRAM_ROW_BLOCK_ELEMENTS", 3 * batch_size)
    blocked = gram_operator([5, 16, 3], batch_size).gram()
    assert relative_error(blocked, whole) <= 1e-12


@pytest.mark.parametrize("tokens, d_in, d_out", [(1, 6, 4), (3, 16, 16), (2, 1, 1)],
                         ids=["linear", "tokens", "materialised_form"])
def test_outer_product_block_rows_and_products_match_its_gram(tokens: int, d_in: int, d_out: int) -> None:
    """``add_gram`` by blocks of 3 rows and ``gram_matmul``, for the ghost and the materialised form."""
    generator = torch.Generator().manual_seed(0)
    batch = 10
    acts = torch.randn(batch, tokens, d_in, dtype=torch.float64, generator=generator)
    grads = torch.randn(batch, tokens, d_out, dtype=torch.float64, generator=generator)
    block = OuterProductBlock(torch.zeros(d_out, d_in), torch.zeros(d_out), acts, grads)
    assert block.uses_ghost_form == (d_in > 1)
    blocked = torch.zeros(batch, batch, dtype=torch.float64)
    block.add_gram(blocked, 3)
    assert relative_error(blocked, block.gram()) <= 1e-12
    u = torch.randn(batch, 2, dtype=torch.float64, generator=generator)
    assert relative_error(block.gram_matmul(u), block.gram() @ u) <= 1e-13


@pytest.mark.slow
def test_normal_equation_residual_at_4096_rows() -> None:
    """MLP 784-64-10 in float32 on B = 4096, matrix-free: the float64 residual of the normal equations."""
    model = make_mlp([784, 64, 10], torch.float32)
    wrapped = SvenWrapper(model, per_sample_mse, engine="gram")
    optimizer = Sven(wrapped, lr=0.1, k=4096, damping=DAMPING, gram_memory=0)
    wrapped.loss_and_grad(make_batch(4096, 784, 10, torch.float32))
    optimizer.step()
    report = optimizer.last_step
    assert report["svd_mode"] == "cg" and report["normal_equation_route"] == "pcg"
    assert report["normal_equation_residual"] <= RESIDUAL_TOLERANCE


def test_a_failed_cholesky_hands_over_to_cg(single_thread) -> None:
    """Undamped, rtol = 0, duplicated samples: G (12 × 12, rank 6) has no Cholesky factor; CG on the consistent
    system G c = r still gives Mᵀ c = M⁺ r, the minimum-norm step."""
    case = Case((3, 8, 2), 12, rtol=0.0, duplicated=True)
    model, batch = case.model_and_batch(torch.float64)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch)
    expected = -LR * reference_direction(jacobian, residuals, case.batch_size, 0.0)
    wrapped = SvenWrapper(model, per_sample_mse, engine="gram")
    optimizer = Sven(wrapped, lr=LR, k=case.k, rtol=0.0, svd_mode="cg", gram_memory=2**20)
    before = flat_parameters(model)
    wrapped.loss_and_grad(batch)
    optimizer.step()
    assert optimizer.last_step["normal_equation_route"] == "pcg"
    assert optimizer.last_step["normal_equation_residual"] <= RESIDUAL_TOLERANCE
    assert relative_error(flat_parameters(model) - before, expected) <= 1e-8


def test_a_state_dict_saved_before_gram_memory_loads() -> None:
    wrapped = SvenWrapper(make_mlp([3, 8, 2]), per_sample_mse, engine="gram")
    saved = Sven(wrapped).state_dict()
    for group in saved["param_groups"]:
        del group["gram_memory"]
    optimizer = Sven(wrapped, gram_memory=1234)
    optimizer.load_state_dict(saved)
    assert optimizer.settings().gram_memory == 1234
