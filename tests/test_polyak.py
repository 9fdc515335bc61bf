"""PolyakSGD: θ ← θ − η g with η = min((loss − f_star) / (‖g‖² + eps), max_lr)."""

from __future__ import annotations

import pytest
import torch
from conftest import flat_parameters, make_batch, make_mlp

from sven.opt import PolyakSGD

pytestmark = pytest.mark.usefixtures("single_thread")


def loss_and_gradient(model: torch.nn.Module, batch: tuple) -> tuple[float, torch.Tensor]:
    """The mean squared error of the model on the batch and its gradient (P,), float64."""
    x, y = batch
    loss = ((model(x) - y) ** 2).mean()
    gradient = torch.autograd.grad(loss, list(model.parameters()))
    return float(loss.detach()), torch.cat([g.reshape(-1) for g in gradient])


@pytest.mark.parametrize(
    "f_star, max_lr, clipped",
    [(0.0, 10.0, False), (0.3, 10.0, False), (0.0, 1e-3, True)],
    ids=["polyak_step", "polyak_step_with_f_star", "clipped_at_max_lr"],
)
def test_step_size_is_the_clipped_polyak_step(f_star: float, max_lr: float, clipped: bool) -> None:
    model = make_mlp([3, 8, 2])
    batch = make_batch(16, 3, 2)
    loss, gradient = loss_and_gradient(model, batch)
    eps = 1e-8
    polyak = (loss - f_star) / (float(gradient.pow(2).sum()) + eps)
    assert (polyak > max_lr) == clipped and loss > f_star
    expected = flat_parameters(model) - min(polyak, max_lr) * gradient

    optimizer = PolyakSGD(model.parameters(), f_star=f_star, max_lr=max_lr, eps=eps)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        x, y = batch
        mean_loss = ((model(x) - y) ** 2).mean()
        mean_loss.backward()
        return mean_loss

    returned = optimizer.step(closure)
    assert float(returned.detach()) == loss
    assert torch.allclose(flat_parameters(model), expected, rtol=1e-13, atol=1e-15)


def test_step_needs_a_closure() -> None:
    optimizer = PolyakSGD(make_mlp([3, 8, 2]).parameters())
    with pytest.raises(TypeError, match="needs a closure"):
        optimizer.step()


@pytest.mark.parametrize(
    "options, message", [(dict(max_lr=-1.0), r"max_lr must be >= 0; got -1\.0"), (dict(eps=0.0), r"eps must be > 0")]
)
def test_bad_settings_are_rejected(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PolyakSGD(make_mlp([3, 8, 2]).parameters(), **options)
