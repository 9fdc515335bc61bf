"""Which route each solver takes, and that the routes added for "auto" take the reference step.

"auto" stays on the Gram route (the smaller side's eigenpairs) whenever the step is damped, at any
rtol; undamped, an rtol below what the squared spectrum resolves takes "lq" (σ from the QR of the
tall one of M, Mᵀ), never a full SVD of M; rows > cols eigendecomposes Mᵀ M (cols × cols).
"""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, LR, STEP_TOLERANCE, Case, per_sample_mse, sven_step
from reference import EPS64, reference_direction, reference_residuals_and_jacobian, relative_error

import sven.opt.pinv as pinv
from sven.cost import SvenCostWarning
from sven.jacobian import DenseJacobian
from sven.opt.basis import ReflectedBasis
from sven.opt.eigen import REFLECTED_EIGH_SIZE, top_eigh
from sven.opt.pinv import truncated_spectrum
from sven.opt.spectrum import RESOLVED_MARGIN, eig_floor, squared_floor

pytestmark = pytest.mark.usefixtures("single_thread")


def reference_jacobian(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    model, batch = case.model_and_batch(torch.float64)
    return reference_residuals_and_jacobian(model, per_sample_mse, batch)


def reference_step_of(case: Case) -> torch.Tensor:
    residuals, jacobian = reference_jacobian(case)
    return -LR * reference_direction(jacobian, residuals, case.k, case.rtol)


class SolverSpy:
    """Records the shapes of the matrices ``torch.linalg.svd`` and the exact eigensolver see."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.svd_shapes: list[tuple[int, ...]] = []
        self.eigen_sizes: list[int] = []
        svd, exact_eigh = torch.linalg.svd, pinv.exact_eigh

        def spy_svd(matrix: torch.Tensor, *args, **kwargs):
            self.svd_shapes.append(tuple(matrix.shape))
            return svd(matrix, *args, **kwargs)

        def spy_eigh(matrix: torch.Tensor, *args):
            self.eigen_sizes.append(matrix.shape[0])
            return exact_eigh(matrix, *args)

        monkeypatch.setattr(torch.linalg, "svd", spy_svd)
        monkeypatch.setattr(pinv, "exact_eigh", spy_eigh)


@pytest.mark.parametrize("damping", [1e-2, "adaptive"])
@pytest.mark.parametrize("case_name", ["mlp_b_lt_p", "duplicated_samples", "b_gt_p"])
def test_auto_stays_on_the_gram_route_with_damping_at_rtol_zero(case_name: str, damping: float | str) -> None:
    """σ/(σ² + λ) is well conditioned: the Gram route is exact at rtol = 0 once λ > 0.

    The step weighs each eigenpair of the smaller side by 1/(σ² + λ); eigh knows each σ² to about
    n·ε·σ_max², so the step may differ by n·ε·σ_max²/λ relative on top of the round-off of STEP_TOLERANCE
    (no floor cut: a direction the eigendecomposition cannot resolve weighs at most 1/λ, not 1/σ²).
    """
    case = Case(CASES[case_name].sizes, CASES[case_name].batch_size, rtol=0.0,
                duplicated=CASES[case_name].duplicated)
    step, optimizer = sven_step(case, torch.float64, "gram", "auto", damping=damping)
    assert optimizer.last_step["svd_mode"] == "gram"
    residuals, jacobian = reference_jacobian(case)
    used = optimizer.last_step["damping"]
    expected = -LR * reference_direction(jacobian, residuals, case.k, 0.0, used)
    sigma_max = float(torch.linalg.matrix_norm(jacobian, ord=2))
    eigenvalue_error = min(jacobian.shape) * EPS64 * sigma_max**2 / used
    assert relative_error(step, expected) <= STEP_TOLERANCE[torch.float64] + eigenvalue_error


@pytest.mark.parametrize("case_name", ["mlp_b_lt_p", "b_gt_p", "duplicated_samples"])
def test_auto_takes_lq_below_the_resolved_rtol_and_never_an_svd_of_m(case_name: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    base = CASES[case_name]
    case = Case(base.sizes, base.batch_size, rtol=1e-8, duplicated=base.duplicated)
    spy = SolverSpy(monkeypatch)
    with pytest.warns(SvenCostWarning, match=r"undamped rtol=1e-08 .* takes 'lq'.* Pass damping > 0") as caught:
        step, optimizer = sven_step(case, torch.float64, "gram", "auto")
    rows, cols = reference_jacobian(case)[1].shape
    assert any(f"the {rows} × {cols} Jacobian is materialised" in str(w.message) for w in caught)
    assert optimizer.last_step["svd_mode"] == "lq"
    smaller = min(reference_jacobian(case)[1].shape)
    assert spy.svd_shapes and all(shape == (smaller, smaller) for shape in spy.svd_shapes)
    monkeypatch.undo()
    assert relative_error(step, reference_step_of(case)) <= STEP_TOLERANCE[torch.float64]


@pytest.mark.parametrize("engine", ["gram", "functorch"])
def test_rows_above_cols_eigendecompose_the_p_by_p_side(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """M is 24 × 13: "auto" takes eigh of Mᵀ M (13 × 13), no SVD of M, and the reference step."""
    case = CASES["b_gt_p"]
    spy = SolverSpy(monkeypatch)
    step, optimizer = sven_step(case, torch.float64, engine, "auto")
    assert optimizer.last_step["svd_mode"] == "gram"
    assert spy.eigen_sizes == [13] and spy.svd_shapes == []
    monkeypatch.undo()
    assert relative_error(step, reference_step_of(case)) <= STEP_TOLERANCE[torch.float64]


def test_auto_keeps_the_gram_route_where_it_resolves_the_cut() -> None:
    _, optimizer = sven_step(CASES["mlp_b_lt_p"], torch.float64, "gram", "auto")
    assert optimizer.last_step["svd_mode"] == "gram"


def psd_with_clusters(size: int, rank: int, seed: int) -> torch.Tensor:
    """A PSD matrix (size, size) of the given rank whose eigenvalues come in pairs of equal values."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(size, rank, generator=generator, dtype=torch.float64)).Q
    values = torch.logspace(0, -6, (rank + 1) // 2, dtype=torch.float64).repeat_interleave(2)[:rank]
    return basis @ torch.diag(values) @ basis.T


@pytest.mark.parametrize("size, k", [(40, 1), (40, 20), (40, 40), (160, 1), (160, 7), (160, 80), (160, 159),
                                     (160, 160)])
def test_top_eigh_gives_all_eigenvalues_and_the_top_k_eigenvectors(size: int, k: int) -> None:
    """eigh below REFLECTED_EIGH_SIZE, tridiagonalisation + divide and conquer with the vectors left as
    reflectors from it: eigh's values, orthonormal vectors with residual ~ n·ε·λ_max, and the basis's
    Vᵀ x and V c equal to those of its dense form."""
    matrix = psd_with_clusters(size, 3 * size // 4, seed=k)
    values, basis = top_eigh(matrix, k)
    assert isinstance(basis, ReflectedBasis) == (size >= REFLECTED_EIGH_SIZE)
    vectors = basis.dense()
    expected = torch.linalg.eigvalsh(matrix)
    scale = float(expected[-1])
    tolerance = size * size * torch.finfo(torch.float64).eps
    assert values.shape == (size,) and vectors.shape == (size, k) and basis.shape == (size, k)
    assert float((values - expected).abs().max()) <= tolerance * scale
    assert float((vectors.T @ vectors - torch.eye(k, dtype=torch.float64)).abs().max()) <= tolerance
    assert float((matrix @ vectors - vectors * values[-k:]).norm()) <= tolerance * scale
    for columns in [(), (3,)]:
        x, c = torch.randn(size, *columns, dtype=torch.float64), torch.randn(k, *columns, dtype=torch.float64)
        assert relative_error(basis.project(x), vectors.T @ x) <= 1e-13
        assert relative_error(basis.combine(c), vectors @ c) <= 1e-13
    assert relative_error(basis.reversed().columns(2).dense(), vectors.flip(1)[:, :2]) <= 1e-13


@pytest.mark.parametrize("rows, cols, k, damping", [(150, 400, 150, 0.0), (150, 400, 40, 0.0), (150, 400, 150, 1e-4),
                                                   (400, 150, 150, 0.0), (400, 150, 40, 0.0), (400, 150, 150, 1e-4)],
                         ids=["rows_all", "rows_top_k", "rows_damped", "cols_all", "cols_top_k", "cols_damped"])
def test_gram_route_with_reflected_eigenvectors_gives_the_reference_step(rows: int, cols: int, k: int,
                                                                         damping: float) -> None:
    """A side of at least REFLECTED_EIGH_SIZE whose spectrum rtol cuts (σ from 1 to 1e-6, rtol 1e-3): the
    eigh route's reflected basis (M Mᵀ when rows ≤ cols, Mᵀ M otherwise) gives the truncated SVD step."""
    generator = torch.Generator().manual_seed(rows + k)
    size = min(rows, cols)
    assert size >= REFLECTED_EIGH_SIZE
    u = torch.linalg.qr(torch.randn(rows, size, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, size, generator=generator, dtype=torch.float64)).Q
    sigma = torch.logspace(0, -6, size, dtype=torch.float64)
    jacobian = u @ torch.diag(sigma) @ v.T
    operator = DenseJacobian(jacobian)
    residuals = torch.randn(rows, generator=generator, dtype=torch.float64)
    spectrum = truncated_spectrum(operator, "gram", k, 1e-3, damping=damping)
    expected = reference_direction(jacobian, residuals, k, 1e-3, damping)
    assert spectrum.rank_kept == min(k, int((sigma > 1e-3).sum()))
    # the squared route's own error, eigh or reflected alike: ε·λ_max over gaps of 10 % at λ ≈ 1e-6, about 1e-10
    assert relative_error(spectrum.direction(operator, residuals, damping), expected) <= 1e-9


@pytest.mark.parametrize("kappa", [1e4, 1e6, 1e8])
def test_lq_is_as_accurate_as_the_svd_where_the_gram_route_is_not(kappa: float) -> None:
    """M = U diag(σ) Vᵀ (60 × 400), σ log-spaced from 1 to 1/κ, rtol below 1/κ: nothing is cut.

    A backward-stable SVD step has relative error about n·ε·κ (the least-squares sensitivity); the
    "lq" route (σ and U from the R factor, step Mᵀ U Σ⁻² Uᵀ r) stays within it, while the Gram route,
    which resolves σ only down to √(n·ε)·σ_max ≈ 1e-7, loses the step at κ = 1e8.
    """
    generator = torch.Generator().manual_seed(0)
    rows, cols = 60, 400
    u = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, rows, generator=generator, dtype=torch.float64)).Q
    sigma = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), rows, dtype=torch.float64)
    operator = DenseJacobian(u @ torch.diag(sigma) @ v.T)
    residuals = torch.randn(rows, generator=generator, dtype=torch.float64)
    exact = v @ ((u.T @ residuals) / sigma)
    svd_bound = rows * torch.finfo(torch.float64).eps * kappa

    def error(mode: str) -> float:
        return relative_error(truncated_spectrum(operator, mode, rows, 1e-12).direction(operator, residuals), exact)

    assert error("lq") <= svd_bound
    if kappa >= 1e8:
        assert error("gram") > 1e3 * svd_bound


def test_the_floor_of_a_squared_route_lifts_only_for_a_damping_it_resolves() -> None:
    """No cut for λ ≥ 100·n·ε·λ_max (eigenvalue errors ≤ 1 % of λ); a smaller λ (adaptive near damping_min) keeps it."""
    size, largest = 256, 4.0
    resolving = (RESOLVED_MARGIN * eig_floor(size)) ** 2 * largest
    assert squared_floor(size, 0.0, largest) == eig_floor(size)
    assert squared_floor(size, 0.5 * resolving, largest) == eig_floor(size)
    assert squared_floor(size, resolving, largest) == 0.0
