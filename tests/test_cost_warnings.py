"""Options far off the fast path warn before they pay (``sven.cost``), and still take the reference step."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import CASES, make_batch, make_mlp, per_sample_mse, reference_step, sven_step
from reference import reference_residuals_and_jacobian, relative_error

import sven.cost
from sven.cost import SvenCostWarning, entrywise_gram_cost, route_cost
from sven.jacobian import OuterProductBlock
from sven.nn import SvenWrapper
from sven.opt import Sven

pytestmark = pytest.mark.usefixtures("single_thread")

BUDGET = 2**29


@pytest.mark.parametrize("mode", sven.cost.SIDE_MODES)
def test_a_side_route_past_gram_memory_states_its_memory_and_flops(mode: str) -> None:
    message = route_cost(mode, (16384, 101770), 8192, 0.0, BUDGET)
    assert f"svd_mode {mode!r} forms the 16384 × 16384 float64 side" in message
    assert "2.0 GiB" in message and "4.4e+12 flops" in message and "gram_memory = 512 MiB" in message
    assert "rank cut (k < rows)" in message


def test_a_damped_full_rank_step_is_pointed_to_the_matrix_free_route() -> None:
    assert "svd_mode 'cg' (what 'auto' takes for this step)" in route_cost("gram", (16384, 101770), 16384, 1e-3,
                                                                           BUDGET)


def test_routes_within_gram_memory_and_the_matrix_free_route_stay_silent() -> None:
    assert route_cost("gram", (4729, 101770), 4729, 0.0, BUDGET) is None
    assert route_cost("cg", (16384, 101770), 16384, 1e-3, BUDGET) is None
    assert route_cost("lq", (1024, 50890), 1024, 0.0, BUDGET) is None


def test_a_dense_route_past_gram_memory_states_the_size_of_m() -> None:
    message = route_cost("lq", (4096, 101770), 4096, 0.0, BUDGET)
    assert "materialises M (4096 × 101770: 3.1 GiB in float64" in message


def test_many_rows_over_few_columns_are_told_to_take_fewer_rows() -> None:
    assert "use fewer rows per step" in route_cost("gram", (100000, 9000), 9000, 0.0, BUDGET)


@pytest.mark.parametrize("damping, warns", [(0.0, True), (1e-3, False)], ids=["undamped", "damped"])
def test_a_step_past_gram_memory_warns_and_still_takes_the_reference_step(damping: float, warns: bool) -> None:
    """Undamped, "auto" must form the Gram matrix and says so; damped, it goes matrix-free ("cg") silently."""
    case = CASES["mlp_b_lt_p"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, optimizer = sven_step(case, torch.float64, "gram", "auto", gram_memory=64, damping=damping)
    cost_warnings = [w for w in caught if w.category is SvenCostWarning]
    assert len(cost_warnings) == int(warns)
    if warns:
        assert "svd_mode 'gram' forms the 12 × 12 float64 side of M" in str(cost_warnings[0].message)
        assert relative_error(step, reference_step(case, torch.float64)) <= 1e-8
    else:
        assert optimizer.last_step["svd_mode"] == "cg"


def test_entrywise_entries_count_what_the_masked_gram_sums_one_by_one() -> None:
    """Whole rows (with the bias kept on exactly those rows) are factored; the other kept entries are counted."""
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.zeros(3, 4), torch.zeros(3)
    block = OuterProductBlock(weight, bias, torch.randn(5, 1, 4, generator=generator),
                              torch.randn(5, 1, 3, generator=generator))
    rows = torch.tensor([[True] * 4, [True, False, True, False], [False] * 4])
    assert block.entrywise_entries([rows.reshape(-1), torch.tensor([True, False, False])]) == 2
    assert block.entrywise_entries([rows.reshape(-1), torch.tensor([False, True, True])]) == 4


def test_entrywise_gram_cost_is_silent_up_to_the_limit() -> None:
    assert entrywise_gram_cost(1024, 25445) is None
    message = entrywise_gram_cost(4096, 25445)
    assert "4096² · 25445 = 4.3e+11 float64 multiply-adds, about 43 s per step" in message
    assert "mask_mode='rows'" in message


@pytest.mark.parametrize("mode, warns", [("elementwise", True), ("rows", False), ("tensor", False)])
def test_an_entrywise_masked_gram_past_the_limit_warns_and_stays_exact(
    mode: str, warns: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sven.cost, "ENTRYWISE_GRAM_LIMIT", 100)
    model = make_mlp([4, 6, 3])
    batch = make_batch(8, 4, 3)
    wrapped = SvenWrapper(model, per_sample_mse, engine="gram", param_fraction=0.5, mask_mode=mode)
    wrapped.loss_and_grad(batch)
    _, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch, columns=wrapped.state.columns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gram = wrapped.state.operator.gram()
    cost_warnings = [str(w.message) for w in caught if w.category is SvenCostWarning]
    assert len(cost_warnings) == int(warns)
    if warns:
        assert "mask_mode='elementwise'" in cost_warnings[0]
    assert relative_error(gram, jacobian @ jacobian.T) <= 1e-12


def test_weight_decay_past_gram_memory_warns_with_its_matrices_and_the_decoupled_alternative() -> None:
    """The regularised solve forms rows × rows matrices; past gram_memory it says so before it pays."""
    model = make_mlp([3, 6, 2])
    wrapped = SvenWrapper(model, per_sample_mse)
    optimizer = Sven(wrapped, lr=0.1, weight_decay=1e-3, gram_memory=64)
    wrapped.loss_and_grad(make_batch(12, 3, 2))
    with pytest.warns(SvenCostWarning, match=r"weight_decay / fisher_decay .* 12 × 12 float64 .*decoupled"):
        optimizer.step()
    assert sven.cost.regularized_cost(4729, BUDGET) is None
