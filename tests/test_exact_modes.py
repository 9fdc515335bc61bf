"""Every exact svd_mode, on both Jacobian engines, takes the dense float64 reference step."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    CASES,
    ENGINES,
    LR,
    STEP_TOLERANCE,
    Case,
    flat_parameters,
    per_sample_mse,
    reference_step,
    sven_step,
)
from reference import EPS64, reference_direction, reference_residuals_and_jacobian, relative_error

from sven.jacobian import DenseJacobian
from sven.nn import SvenWrapper
from sven.opt import Sven
from sven.opt.pinv import truncated_spectrum

pytestmark = pytest.mark.usefixtures("single_thread")

EXACT_MODES = ("torch", "gram", "auto", "scipy", "lobpcg", "lq")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("svd_mode", EXACT_MODES)
@pytest.mark.parametrize("case_name", CASES)
def test_exact_mode_takes_the_reference_step(case_name: str, svd_mode: str, engine: str, dtype: torch.dtype) -> None:
    case = CASES[case_name]
    step, optimizer = sven_step(case, dtype, engine, svd_mode)
    assert not optimizer.last_step["skipped"]
    assert relative_error(step, reference_step(case, dtype)) <= STEP_TOLERANCE[dtype]


@pytest.mark.parametrize("case_name", CASES)
def test_cases_exercise_what_they_claim(case_name: str) -> None:
    """Each case really has the shape, rank deficiency, k cut or rtol cut its name says."""
    case = CASES[case_name]
    model, batch = case.model_and_batch(torch.float64)
    _, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch)
    rows, cols = jacobian.shape
    sigma = torch.linalg.svdvals(jacobian)
    rank = int((sigma > max(rows, cols) * EPS64 * sigma[0]).sum())
    above_rtol = int((sigma > case.rtol * sigma[0]).sum())
    claims = {
        "mlp_b_lt_p": rows < cols and above_rtol == rank <= case.k,
        "b_gt_p": rows > cols,
        "duplicated_samples": rank <= rows // 2 < rows <= cols,
        "k_below_rank": case.k < min(rank, above_rtol),
        "rtol_cuts": above_rtol < rank <= case.k,
    }
    assert claims[case_name]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", ["b_lt_p", "b_gt_p"])
def test_lobpcg_runs_torch_lobpcg_and_takes_the_reference_step(
    shape: str, engine: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With k ≤ size/3 the solver really calls torch.lobpcg (on M Mᵀ for B < P, on Mᵀ M for B > P)."""
    case = Case((3, 8, 2), 12, k=3) if shape == "b_lt_p" else Case((2, 3, 1), 24, k=3)
    sizes_seen = []
    lobpcg = torch.lobpcg

    def counting_lobpcg(matrix: torch.Tensor, *args, **kwargs):
        sizes_seen.append(matrix.shape[0])
        return lobpcg(matrix, *args, **kwargs)

    monkeypatch.setattr(torch, "lobpcg", counting_lobpcg)
    step, _ = sven_step(case, dtype, engine, "lobpcg")
    expected_size = 12 if shape == "b_lt_p" else 13
    assert sizes_seen == [expected_size] and expected_size >= 3 * case.k
    assert relative_error(step, reference_step(case, dtype)) <= STEP_TOLERANCE[dtype]


def test_step_scales_with_the_lr_a_scheduler_sets() -> None:
    """lr lives in param_groups[0]["lr"]: after StepLR(gamma=0.25) the step is a quarter of the reference's."""
    case = CASES["mlp_b_lt_p"]
    model, batch = case.model_and_batch(torch.float64)
    wrapped = SvenWrapper(model, per_sample_mse)
    optimizer = Sven(wrapped, lr=LR, k=case.k, rtol=case.rtol)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.25)
    wrapped.loss_and_grad(batch)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == LR * 0.25
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch)
    before = flat_parameters(model)
    wrapped.loss_and_grad(batch)
    optimizer.step()
    expected = -LR * 0.25 * reference_direction(jacobian, residuals, case.k, case.rtol)
    assert relative_error(flat_parameters(model) - before, expected) <= STEP_TOLERANCE[torch.float64]


def test_lobpcg_with_k_above_the_rank_takes_the_reference_step() -> None:
    """torch.lobpcg asked for 8 eigenpairs of a rank-4 M Mᵀ (24 × 24): the zero ones are cut, the step is exact."""
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(24, 4, generator=generator, dtype=torch.float64) @ torch.randn(
        4, 60, generator=generator, dtype=torch.float64
    )
    residuals = torch.randn(24, generator=generator, dtype=torch.float64)
    operator = DenseJacobian(matrix)
    spectrum = truncated_spectrum(operator, "lobpcg", 8, 1e-3)
    assert spectrum.rank_kept == 4
    direction = spectrum.direction(operator, residuals)
    assert relative_error(direction, reference_direction(matrix, residuals, 8, 1e-3)) <= STEP_TOLERANCE[torch.float64]
