"""The randomized svd_modes: exact when k ≥ rank(M), close to the reference when the spectrum has a gap."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, ENGINES, STEP_TOLERANCE, Case, reference_step, sven_step
from reference import reference_direction, relative_error

from sven.jacobian import DenseJacobian
from sven.opt.pinv import truncated_spectrum

pytestmark = pytest.mark.usefixtures("single_thread")

RANDOMIZED_MODES = ("randomized", "randomized_v2")
FULL_RANK_CASES = {
    "full_rank_k_equals_rank": Case((3, 8, 2), 12, k=12),
    "rank_deficient_k_above_rank": CASES["duplicated_samples"],
    "b_gt_p_on_the_column_side": CASES["b_gt_p"],
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("svd_mode", RANDOMIZED_MODES)
@pytest.mark.parametrize("case_name", FULL_RANK_CASES)
def test_randomized_mode_is_exact_when_k_covers_the_rank(
    case_name: str, svd_mode: str, engine: str, dtype: torch.dtype
) -> None:
    case = FULL_RANK_CASES[case_name]
    torch.manual_seed(0)
    step, optimizer = sven_step(case, dtype, engine, svd_mode)
    assert not optimizer.last_step["skipped"]
    assert relative_error(step, reference_step(case, dtype)) <= STEP_TOLERANCE[dtype]


def gapped_matrix(rows: int, cols: int, top: torch.Tensor, tail_max: float, seed: int) -> torch.Tensor:
    """U diag(σ) Vᵀ (rows, cols) with the given top singular values and a tail in [tail_max/2, tail_max]."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, rows, generator=generator, dtype=torch.float64)).Q
    tail = tail_max * (0.5 + 0.5 * torch.rand(rows - top.numel(), generator=generator, dtype=torch.float64))
    return u @ torch.diag(torch.cat([top, tail])) @ v.T


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("svd_mode", RANDOMIZED_MODES)
def test_randomized_mode_matches_the_reference_on_a_spectral_gap(svd_mode: str, seed: int) -> None:
    """Top 5 values in [5, 10], a tail near 0.05 (above the rtol cut): with k = 5 the step is within 1e-3."""
    k, rtol = 5, 1e-3
    matrix = gapped_matrix(40, 200, torch.linspace(10.0, 5.0, k, dtype=torch.float64), 0.05, seed)
    residuals = torch.randn(40, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    operator = DenseJacobian(matrix)
    torch.manual_seed(seed)
    spectrum = truncated_spectrum(operator, svd_mode, k, rtol)
    direction = spectrum.direction(operator, residuals)
    assert spectrum.rank_kept == k
    assert relative_error(direction, reference_direction(matrix, residuals, k, rtol)) <= 1e-3
