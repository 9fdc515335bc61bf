"""The Gram engine's fast path never allocates a tensor of the size of the Jacobian (B × P).

A ``TorchDispatchMode`` records the number of elements of every tensor each aten op
returns (forward, autograd backward and the solver alike). On an MLP where B·P is far
larger than every activation and weight, ``loss_and_grad`` + ``step`` must stay below
B·P / 4 — and the functorch engine, which materialises J, must trip the same detector.
A module without a Gram rule (the functorch fallback) holds at most ``chunk_numel``
per-sample gradient entries at once, never B × P_module. The matrix-free route (svd_mode "cg" past
``gram_memory``) allocates no B × B tensor either.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import LargestAllocation, make_batch, make_mlp, per_sample_mse
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from sven.jacobian import MaskedJacobian
from sven.nn import SvenWrapper
from sven.opt import Sven, matrix_free

SIZES = [64, 256, 256, 8]
BATCH = 32


class SquareAllocation(LargestAllocation):
    """Also records the ops that return a tensor with two dims of size ``rows`` (a rows × rows matrix)."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.rows = rows
        self.square_ops: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and list(leaf.shape).count(self.rows) >= 2:
                self.square_ops.add(str(func))
        return out


def recorded_step(engine: str, svd_mode: str, k: int, model: nn.Module | None = None,
                  recorder: LargestAllocation | None = None, options: dict | None = None,
                  **wrapper: Any) -> tuple[LargestAllocation, int]:
    """The recorder over one ``loss_and_grad`` + ``step`` of Sven on ``engine`` (after a first step), and B·P."""
    model = make_mlp(SIZES, torch.float32) if model is None else model
    batch = make_batch(BATCH, SIZES[0], SIZES[-1], torch.float32)
    wrapped = SvenWrapper(model, per_sample_mse, engine=engine, **wrapper)
    optimizer = Sven(wrapped, lr=0.1, k=k, svd_mode=svd_mode, **(options or {}))
    wrapped.loss_and_grad(batch)
    optimizer.step()
    recorder = LargestAllocation() if recorder is None else recorder
    with recorder:
        wrapped.loss_and_grad(batch)
        optimizer.step()
    assert not optimizer.last_step["skipped"]
    return recorder, BATCH * wrapped.params.size


def largest_allocation_of_a_step(
    engine: str, svd_mode: str, k: int, model: nn.Module | None = None, **wrapper: Any
) -> tuple[int, str, int]:
    """(largest numel, its op, B·P) over one ``loss_and_grad`` + ``step`` of Sven on ``engine``."""
    recorder, jacobian_size = recorded_step(engine, svd_mode, k, model, **wrapper)
    return recorder.numel, recorder.op, jacobian_size


def test_the_model_makes_b_times_p_far_larger_than_any_weight_or_activation() -> None:
    model = make_mlp(SIZES)
    parameters = sum(p.numel() for p in model.parameters())
    largest_layer = max(p.numel() for p in model.parameters())
    assert BATCH * parameters >= 40 * max(largest_layer, BATCH * max(SIZES))
    assert BATCH * largest_layer >= BATCH * parameters // 4, "a per-sample gradient of one layer must trip too"


@pytest.mark.parametrize("svd_mode, k", [("gram", 64), ("gram", 8), ("auto", 64), ("randomized", 16),
                                         ("randomized_v2", 16), ("lobpcg", 8), ("scipy", 8)],
                         ids=["cholesky_route", "eigh_route", "auto", "randomized", "randomized_v2", "lobpcg", "scipy"])
def test_gram_engine_step_allocates_nothing_of_jacobian_size(svd_mode: str, k: int) -> None:
    largest, op, jacobian_size = largest_allocation_of_a_step("gram", svd_mode, k)
    weights = max(p.numel() for p in make_mlp(SIZES).parameters())
    assert weights <= largest < jacobian_size // 4, f"{op} returned {largest} elements; B·P = {jacobian_size}"


@pytest.mark.parametrize("mask_mode", ["elementwise", "rows", "tensor"])
def test_param_fraction_on_the_gram_engine_allocates_nothing_of_jacobian_size(mask_mode: str) -> None:
    """f = 0.5: the B × n Jacobian of the kept columns (B·P/2) would trip the detector."""
    largest, op, jacobian_size = largest_allocation_of_a_step("gram", "gram", 64, param_fraction=0.5,
                                                              mask_mode=mask_mode)
    assert largest < jacobian_size // 4, f"{op} returned {largest} elements; B·P = {jacobian_size}"


@pytest.mark.parametrize("mask_mode", [None, "rows", "elementwise"])
@pytest.mark.parametrize("gram_memory, squares", [(0, False), (2**30, True)], ids=["matrix_free", "cholesky"])
def test_the_matrix_free_route_allocates_no_b_by_b_tensor(monkeypatch, gram_memory: int, squares: bool,
                                                          mask_mode: str | None) -> None:
    """svd_mode "cg" past the budget: nothing B × B and nothing B × P; within it (Cholesky) the detector trips.

    The Nyström sketch takes 2 columns (no dimension of the model, nor 2·d_out, is B; the masked operator multiplies
    through Mᵀ U, P × 2 < B·P / 4). With param_fraction the finiteness check must not form the masked Gram matrix.
    """
    monkeypatch.setattr(matrix_free, "PRECONDITIONER_RANK", 2)
    masks = {} if mask_mode is None else dict(param_fraction=0.5, mask_mode=mask_mode)
    recorder, jacobian_size = recorded_step("gram", "cg", BATCH, recorder=SquareAllocation(BATCH),
                                            options=dict(damping=1e-3, gram_memory=gram_memory), **masks)
    assert bool(recorder.square_ops) == squares, f"B × B tensors from {sorted(recorder.square_ops)}"
    assert recorder.numel < jacobian_size // 4, f"{recorder.op} returned {recorder.numel} elements"


def test_the_detector_trips_on_the_functorch_engine() -> None:
    """The same recorder sees the functorch engine's materialised Jacobian (B·P elements)."""
    largest, _, jacobian_size = largest_allocation_of_a_step("functorch", "gram", 64)
    assert largest >= jacobian_size


class TwoMatrices(nn.Module):
    """A layer without a Gram rule: x ↦ tanh(x A) B for two (width, width) matrices."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.first = nn.Parameter(torch.randn(width, width) / width**0.5)
        self.second = nn.Parameter(torch.randn(width, width) / width**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.first) @ self.second


@pytest.mark.parametrize("chunks_per_matrix", [1, 4], ids=["one_matrix_a_chunk", "sample_groups"])
def test_fallback_holds_at_most_chunk_numel_per_sample_gradient_entries(chunks_per_matrix: int) -> None:
    """B × (one 64 × 64 matrix), or a quarter of it (groups of 4 samples), never B × P_module."""
    torch.manual_seed(0)
    width = SIZES[0]
    model = nn.Sequential(TwoMatrices(width), nn.Tanh(), nn.Linear(width, SIZES[-1]))
    chunk_numel = BATCH * width * width // chunks_per_matrix
    wrapped_plan = SvenWrapper(model, per_sample_mse, engine="gram").engine_plan()
    assert wrapped_plan["fallback_parameters"] == ["0.first", "0.second"]
    largest, op, _ = largest_allocation_of_a_step("gram", "gram", 64, model, fallback_chunk_numel=chunk_numel)
    assert largest <= chunk_numel < BATCH * 2 * width * width, f"{op} returned {largest} elements"


def test_a_masked_jacobian_materialises_only_the_blocks_holding_its_columns() -> None:
    """M[:, columns] for the last bias (8 columns) reads one small block: nothing near B·P, and rows > columns
    (the Mᵀ M side's route) needs no more."""
    model = make_mlp(SIZES, torch.float32)
    wrapped = SvenWrapper(model, per_sample_mse, engine="gram")
    wrapped.loss_and_grad(make_batch(BATCH, SIZES[0], SIZES[-1], torch.float32))
    operator = wrapped.state.operator
    columns = torch.arange(operator.shape[1] - SIZES[-1], operator.shape[1])
    with LargestAllocation() as recorder:
        kept = MaskedJacobian(operator, columns).dense()
    assert recorder.numel < BATCH * operator.shape[1] // 4, f"{recorder.op} returned {recorder.numel} elements"
    assert torch.equal(kept, operator.dense()[:, columns])
