"""Every error of the core API, with its message; the closure forms of step()."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_batch, make_mlp, per_sample_mse
from torch import Tensor, nn

from sven.nn import SvenWrapper
from sven.opt import Sven
from sven.opt.pinv import SVD_MODES

pytestmark = pytest.mark.usefixtures("single_thread")

ENGINES = ("gram", "functorch")
BATCH_SIZE = 32


def wrapped_mlp(loss_fn=per_sample_mse, out_features: int = 2, **options) -> SvenWrapper:
    return SvenWrapper(make_mlp([3, 8, out_features]), loss_fn, **options)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "loss_fn, out_features, received",
    [
        (nn.MSELoss(), 2, "()"),
        (nn.MSELoss(reduction="none"), 1, "(32, 1)"),
        (nn.MSELoss(reduction="none"), 3, "(32, 3)"),
    ],
    ids=["scalar", "b_by_1", "b_by_c"],
)
def test_losses_not_of_shape_b_are_rejected(loss_fn: nn.Module, out_features: int, received: str, engine: str) -> None:
    wrapped = wrapped_mlp(loss_fn, out_features, engine=engine)
    expected = re.escape(f"got shape {received}; expected (B,) = ({BATCH_SIZE},)")
    with pytest.raises(ValueError, match=expected) as raised:
        wrapped.loss_and_grad(make_batch(BATCH_SIZE, 3, out_features))
    assert "reduction='none'" in str(raised.value)
    assert wrapped.state is None


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(k=0), "k must be an integer >= 1; got 0"),
        (dict(k=2.5), "k must be an integer >= 1; got 2.5"),
        (dict(rtol=-1e-3), "rtol must be >= 0; got -0.001"),
        (dict(lr=-0.1), "lr must be a number >= 0; got -0.1"),
    ],
)
def test_optimizer_rejects_bad_settings_at_construction(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Sven(wrapped_mlp(), **options)


def test_unknown_svd_mode_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown svd_mode 'svd'") as raised:
        Sven(wrapped_mlp(), svd_mode="svd")
    for mode in ("auto", "torch", "gram", "randomized", "randomized_v2", "scipy", "lobpcg"):
        assert mode in SVD_MODES and re.search(rf"\b{mode}\b", str(raised.value)), mode


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(param_fraction=0.0), "param_fraction must be in (0, 1]; got 0.0"),
        (dict(param_fraction=1.5), "param_fraction must be in (0, 1]; got 1.5"),
        (dict(param_fraction=-0.2), "param_fraction must be in (0, 1]; got -0.2"),
        (dict(microbatch_size=0), "microbatch_size must be an integer >= 1; got 0"),
        (dict(microbatch_size=2.5), "microbatch_size must be an integer >= 1; got 2.5"),
        (dict(engine="jax"), "engine must be one of ('auto', 'taylor', 'gram', 'functorch', 'rowwise'); got 'jax'"),
        (dict(param_fraction=0.5, mask_mode="columns"),
         "mask_mode must be one of ('elementwise', 'rows', 'tensor'); got 'columns'"),
        (dict(kappa=0.0), "kappa must be > 0; got 0.0"),
        (dict(kappa=-1.0), "kappa must be > 0; got -1.0"),
    ],
)
def test_wrapper_rejects_bad_settings_at_construction(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        wrapped_mlp(**options)


def signed_error(pred: Tensor, target: Tensor) -> Tensor:
    """A per-sample loss that can be negative: mean of (pred − target), (B,)."""
    return (pred - target).mean(dim=1)


@pytest.mark.parametrize("engine", ENGINES)
def test_negative_loss_needs_kappa_2(engine: str) -> None:
    batch = make_batch(BATCH_SIZE, 3, 2)
    with pytest.raises(ValueError, match=r"kappa=1\.0 .* needs losses >= 0; got \d+ negative per-sample loss"):
        wrapped_mlp(signed_error, kappa=1.0, engine=engine).loss_and_grad(batch)
    losses, _ = wrapped_mlp(signed_error, kappa=2.0, engine=engine).loss_and_grad(batch)
    assert bool((losses < 0).any())


def test_step_needs_a_loss_and_grad_first() -> None:
    wrapped = wrapped_mlp()
    optimizer = Sven(wrapped)
    with pytest.raises(RuntimeError, match=r"call wrapped\.loss_and_grad\(batch\) before each step\(\)"):
        optimizer.step()
    wrapped.loss_and_grad(make_batch(8, 3, 2))
    optimizer.step()
    with pytest.raises(RuntimeError, match=r"loss_and_grad"):
        optimizer.step()


def test_step_runs_a_closure_and_returns_what_it_returned() -> None:
    """step(closure) — the form LBFGS loops and Lightning use — equals loss_and_grad then step()."""
    batch = make_batch(8, 3, 2)
    by_closure, by_call = wrapped_mlp(), wrapped_mlp()
    optimizer = Sven(by_closure, lr=0.5)

    def closure() -> Tensor:
        losses, _ = by_closure.loss_and_grad(batch)
        return losses.mean()

    returned = optimizer.step(closure)
    assert torch.equal(returned, by_call.loss_and_grad(batch)[0].mean())
    Sven(by_call, lr=0.5).step()
    assert all(torch.equal(a, b) for a, b in zip(by_closure.model.parameters(), by_call.model.parameters()))
    assert optimizer.step(closure=closure).shape == ()


def test_a_closure_that_computes_no_jacobian_or_comes_with_a_batch_is_refused() -> None:
    wrapped = wrapped_mlp()
    batch = make_batch(8, 3, 2)
    with pytest.raises(RuntimeError, match=r"in the closure passed to step\(closure\)"):
        Sven(wrapped).step(lambda: torch.tensor(0.0))
    with pytest.raises(TypeError, match="a batch or a closure, not both"):
        Sven(wrapped).step(batch, closure=lambda: wrapped.loss_and_grad(batch))
