"""sven.pde: forward-Laplacian derivatives against torch.func, and exact Sven steps on PDE residuals."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LargestAllocation, flat_parameters, make_mlp
from reference import reference_direction, reference_residuals_and_jacobian, relative_error
from torch import Tensor, nn
from torch.func import hessian, jacrev

from sven.nn import SvenWrapper
from sven.opt import Sven
from sven.pde import CollocationResidual, condition_losses, condition_weights, derivatives, negative_laplacian

pytestmark = pytest.mark.usefixtures("single_thread")

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "softplus": lambda: nn.Softplus(beta=1.5, threshold=1.0),
}


def expected_derivatives(net: nn.Module, x: Tensor, dims: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(value (B, out), gradient (B, out, d), Laplacian over ``dims`` (B, out)) by torch.func."""
    point = lambda xi: net(xi[None])[0]  # noqa: E731
    gradient = torch.vmap(jacrev(point))(x)
    hessians = torch.vmap(hessian(point))(x)
    laplacian = hessians.diagonal(dim1=-2, dim2=-1)[..., dims].sum(dim=-1)
    return net(x).detach(), gradient.detach(), laplacian.detach()


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_derivatives_match_torch_func(activation: str, dims: int) -> None:
    net = make_mlp([dims, 7, 5, 2], activation=ACTIVATIONS[activation])
    x = torch.randn(9, dims, dtype=torch.float64, generator=torch.Generator().manual_seed(dims)) * 2
    laplacian_dims = list(range(dims))[1:] or [0]
    for chosen in (None, laplacian_dims):
        with torch.no_grad():
            taylor = derivatives(net, x, chosen)
        value, gradient, laplacian = expected_derivatives(net, x, chosen or list(range(dims)))
        assert taylor.value.shape == (9, 2) and taylor.gradient.shape == (9, 2, dims)
        assert relative_error(taylor.value, value) <= 1e-12
        assert relative_error(taylor.gradient, gradient) <= 1e-12
        assert relative_error(taylor.laplacian, laplacian) <= 1e-12


def test_softplus_threshold_is_honoured() -> None:
    """Points with β·h above the threshold sit on softplus's linear branch: σ'' = 0 there, as torch computes."""
    net = make_mlp([1, 6, 1], activation=lambda: nn.Softplus(beta=2.0, threshold=0.5))
    x = torch.linspace(-3, 3, 31, dtype=torch.float64)[:, None]
    pre = net[0](x) * 2.0
    assert bool((pre > 0.5).any()) and bool((pre <= 0.5).any())
    with torch.no_grad():
        taylor = derivatives(net, x)
    _, gradient, laplacian = expected_derivatives(net, x, [0])
    assert relative_error(taylor.gradient, gradient) <= 1e-12
    assert relative_error(taylor.laplacian, laplacian) <= 1e-12


@pytest.mark.parametrize("module", [nn.ReLU(), nn.Dropout(0.1), nn.LayerNorm(4)], ids=lambda m: type(m).__name__)
def test_unsupported_module_is_a_type_error_naming_it(module: nn.Module) -> None:
    net = nn.Sequential(nn.Linear(2, 4), module, nn.Linear(4, 1)).double()
    with pytest.raises(TypeError, match=rf"'1' \({type(module).__name__}\); supported: Linear, GELU"):
        derivatives(net, torch.zeros(3, 2, dtype=torch.float64))


def test_non_sequential_and_bad_dims_are_refused() -> None:
    with pytest.raises(TypeError, match="nn.Sequential"):
        derivatives(nn.Linear(2, 1), torch.zeros(3, 2))
    net = make_mlp([2, 4, 1])
    for bad in ([2], [0, 0], []):
        with pytest.raises(ValueError, match="laplacian_dims"):
            derivatives(net, torch.zeros(3, 2, dtype=torch.float64), bad)


def poisson_batch(points: int, boundary: int, seed: int = 0) -> tuple[Tensor, ...]:
    """(x (N, 2), target (N,), weight (N,), on_boundary (N,)) for −Δu = 2π² sin(πx) sin(πy), u = 0 on ∂[0,1]²."""
    generator = torch.Generator().manual_seed(seed)
    inside = torch.rand(points, 2, generator=generator, dtype=torch.float64)
    edge = torch.rand(boundary, 2, generator=generator, dtype=torch.float64)
    edge[:, 0] = torch.where(edge[:, 1] < 0.5, 0.0, 1.0)
    x = torch.cat([inside, edge])
    on_boundary = torch.arange(points + boundary) >= points
    source = 2 * math.pi**2 * torch.sin(math.pi * x[:, 0]) * torch.sin(math.pi * x[:, 1])
    target = torch.where(on_boundary, torch.zeros_like(source), source)
    return x, target, condition_weights(on_boundary), on_boundary


def poisson_model(sizes: list[int]) -> CollocationResidual:
    return CollocationResidual(make_mlp(sizes), negative_laplacian)


@pytest.mark.parametrize("engine", ["gram", "functorch"])
def test_gram_engine_jacobian_of_pde_residuals_is_exact(engine: str) -> None:
    """The stacked-token Linear calls give the Gram engine the exact Jacobian (and J Jᵀ) of the residuals."""
    model, batch = poisson_model([2, 8, 8, 1]), poisson_batch(10, 4)
    wrapped = SvenWrapper(model, condition_losses, kappa=1.0, engine=engine)
    assert wrapped.engine_plan()["fallback_parameters"] == ([] if engine == "gram" else list(wrapped.params.names))
    wrapped.loss_and_grad(batch)
    residuals, jacobian = reference_residuals_and_jacobian(model, condition_losses, batch, kappa=1.0)
    operator = wrapped.state.operator
    assert relative_error(wrapped.state.residuals, residuals) <= 1e-13
    assert relative_error(operator.dense(), jacobian) <= 1e-12
    assert relative_error(operator.gram(), jacobian @ jacobian.T) <= 1e-12


@pytest.mark.parametrize("engine", ["gram", "functorch"])
@pytest.mark.parametrize("sizes, points", [([2, 8, 8, 1], (10, 4)), ([2, 6, 1], (30, 10))], ids=["b_lt_p", "b_gt_p"])
def test_sven_step_on_poisson_residuals_is_the_reference_step(sizes: list[int], points: tuple[int, int],
                                                               engine: str) -> None:
    model, batch = poisson_model(sizes), poisson_batch(*points)
    residuals, jacobian = reference_residuals_and_jacobian(model, condition_losses, batch, kappa=1.0)
    expected = -reference_direction(jacobian, residuals, 64, 1e-3)
    wrapped = SvenWrapper(model, condition_losses, kappa=1.0, engine=engine)
    optimizer = Sven(wrapped, lr=1.0, k=64, rtol=1e-3)
    before = flat_parameters(model)
    wrapped.loss_and_grad(batch)
    optimizer.step()
    assert not optimizer.last_step["skipped"]
    assert relative_error(flat_parameters(model) - before, expected) <= 1e-10


def largest_allocation_of_a_poisson_step(engine: str) -> tuple[int, int]:
    """(largest numel any op returned, B·P) over one Sven step on a 2→64→64→1 Poisson residual, B = 32."""
    model, batch = poisson_model([2, 64, 64, 1]), poisson_batch(24, 8)
    wrapped = SvenWrapper(model, condition_losses, kappa=1.0, engine=engine)
    optimizer = Sven(wrapped, lr=1.0, k=64, svd_mode="gram")
    with LargestAllocation() as recorder:
        wrapped.loss_and_grad(batch)
        optimizer.step()
    assert not optimizer.last_step["skipped"]
    return recorder.numel, batch[0].shape[0] * wrapped.params.size


def test_gram_engine_pde_step_allocates_nothing_of_jacobian_size() -> None:
    largest, jacobian_size = largest_allocation_of_a_poisson_step("gram")
    assert largest < jacobian_size // 4, f"largest allocation {largest}; B·P = {jacobian_size}"
    functorch_largest, _ = largest_allocation_of_a_poisson_step("functorch")
    assert functorch_largest >= jacobian_size


def signed_residuals(pred: Tensor, target: Tensor, weight: Tensor, on_boundary: Tensor) -> Tensor:
    """√weight · r (B,), signed: with kappa = 2 the same Gauss–Newton step as kappa = 1 on ``condition_losses``."""
    return weight.sqrt() * (torch.where(on_boundary, pred[:, 1], pred[:, 0]) - target)


def one_step(engine: str, loss_fn, kappa: float, options: dict) -> Tensor:
    """The step (P,) at B = 1024, tanh 2→64→1, from the same initial parameters."""
    model, batch = poisson_model([2, 64, 1]), poisson_batch(904, 120)
    optimizer = Sven(SvenWrapper(model, loss_fn, kappa=kappa, engine=engine), lr=1.0, k=1024, **options)
    start = flat_parameters(model)
    optimizer.step(batch)
    return flat_parameters(model) - start


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"rtol": 0.0, "damping": 1e-2}], ids=["eigh", "cholesky"])
def test_both_engines_and_residual_forms_take_one_step_at_b1024(options: dict) -> None:
    """B = 1024 > P = 257: with rtol = 1e-3 the spectrum is cut (eigh of Mᵀ M); damped with rtol = 0 nothing is,
    and the cols × cols side is solved by Cholesky. benchmarks/pinn_step.py times these steps."""
    forms = ((condition_losses, 1.0), (signed_residuals, 2.0))
    steps = [one_step(engine, loss_fn, kappa, options) for loss_fn, kappa in forms for engine in ("gram", "functorch")]
    assert all(relative_error(step, steps[0]) <= 1e-8 for step in steps)
