"""sven.pde: forward-Laplacian derivatives against torch.func, and exact Sven steps on PDE residuals."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LargestAllocation, flat_parameters, make_mlp
from reference import reference_direction, reference_residuals_and_jacobian, relative_error
from torch import Tensor, nn
from torch.func import hessian, jacrev

from sven.jacobian.params import ParamSpace
from sven.nn import SvenWrapper
from sven.opt import Sven
from sven.pde import CollocationResidual, condition_losses, condition_weights, derivatives, negative_laplacian
from sven.pde.activations import activation_rule, third_derivative_rule
from sven.pde.jacobian import taylor_engine_refusal, taylor_jacobian, taylor_predictions

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


ENGINES = ["taylor", "gram", "functorch"]


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_give_the_exact_jacobian_of_pde_residuals(engine: str) -> None:
    """The Taylor engine's written-out passes, and the stacked-token Linear calls the Gram engine sees, give the
    exact Jacobian (and J Jᵀ) of the residuals."""
    model, batch = poisson_model([2, 8, 8, 1]), poisson_batch(10, 4)
    wrapped = SvenWrapper(model, condition_losses, kappa=1.0, engine=engine)
    fast = engine != "functorch"
    assert wrapped.engine_plan()["fallback_parameters"] == ([] if fast else list(wrapped.params.names))
    wrapped.loss_and_grad(batch)
    residuals, jacobian = reference_residuals_and_jacobian(model, condition_losses, batch, kappa=1.0)
    operator = wrapped.state.operator
    assert relative_error(wrapped.state.residuals, residuals) <= 1e-13
    assert relative_error(operator.dense(), jacobian) <= 1e-12
    assert relative_error(operator.gram(), jacobian @ jacobian.T) <= 1e-12


@pytest.mark.parametrize("engine", ENGINES)
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


@pytest.mark.parametrize("engine", ["taylor", "gram"])
def test_fast_engines_pde_step_allocates_nothing_of_jacobian_size(engine: str) -> None:
    largest, jacobian_size = largest_allocation_of_a_poisson_step(engine)
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
    steps = [one_step(engine, loss_fn, kappa, options) for loss_fn, kappa in forms for engine in ENGINES]
    assert all(relative_error(step, steps[0]) <= 1e-8 for step in steps)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_third_derivatives_match_torch_func(activation: str) -> None:
    module = ACTIVATIONS[activation]()
    h = torch.linspace(-4, 4, 81, dtype=torch.float64)
    expected = torch.vmap(torch.func.grad(torch.func.grad(torch.func.grad(module))))(h)
    third = third_derivative_rule(module)(module, h, activation_rule(module)(module, h))
    assert relative_error(third, expected) <= 1e-12


def heat_operator(taylor) -> Tensor:
    """u_t − ¼ u_xx with t the first coordinate and the Laplacian over the second."""
    return taylor.gradient[:, 0, 0] - 0.25 * taylor.laplacian[:, 0]


def shared_layer_net() -> nn.Sequential:
    """2 → 5 → 5 → 5 → 1 with the same 5 → 5 Linear twice."""
    torch.manual_seed(3)
    hidden = nn.Linear(5, 5)
    return nn.Sequential(nn.Linear(2, 5), nn.Tanh(), hidden, nn.SiLU(), hidden, nn.GELU(), nn.Linear(5, 1)).double()


TAYLOR_CASES = {
    **{f"poisson_{name}": lambda name=name: CollocationResidual(
        make_mlp([2, 6, 5, 1], activation=ACTIVATIONS[name]), negative_laplacian) for name in ACTIVATIONS},
    "heat_dims": lambda: CollocationResidual(make_mlp([2, 6, 5, 1]), heat_operator, laplacian_dims=[1]),
    "shared_layer": lambda: CollocationResidual(shared_layer_net(), negative_laplacian),
    "activation_first": lambda: CollocationResidual(nn.Sequential(nn.Tanh(), *make_mlp([2, 6, 1])),
                                                    negative_laplacian),
    "no_activation": lambda: CollocationResidual(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)).double(),
                                                 heat_operator),
    "three_dims": lambda: CollocationResidual(make_mlp([3, 6, 1], activation=nn.Sigmoid), negative_laplacian),
}


@pytest.mark.parametrize("case", TAYLOR_CASES)
def test_taylor_engine_matches_the_dense_reference(case: str) -> None:
    model = TAYLOR_CASES[case]()
    d = model.net[0].in_features if isinstance(model.net[0], nn.Linear) else model.net[1].in_features
    x, target, weight, on_boundary = poisson_batch(9, 3)
    x = torch.cat([x, torch.rand(12, d - 2, dtype=torch.float64)], dim=1) if d > 2 else x
    batch = (x, target, weight, on_boundary)
    params = ParamSpace.of_module(model)
    assert taylor_engine_refusal(model, params) is None
    losses, _, operator = taylor_jacobian(model, condition_losses, batch, params)
    _, jacobian = reference_residuals_and_jacobian(model, condition_losses, batch, kappa=2.0)
    with torch.no_grad():
        expected_losses = condition_losses(model(x), target, weight, on_boundary)
    assert relative_error(losses, expected_losses) <= 1e-13
    assert relative_error(operator.dense(), jacobian) <= 1e-12
    assert relative_error(operator.gram(), jacobian @ jacobian.T) <= 1e-12


def test_taylor_engine_leaves_frozen_parameters_out() -> None:
    model = poisson_model([2, 6, 1])
    model.net[0].weight.requires_grad_(False)
    batch = poisson_batch(8, 2)
    params = ParamSpace.of_module(model)
    _, _, operator = taylor_jacobian(model, condition_losses, batch, params)
    _, jacobian = reference_residuals_and_jacobian(model, condition_losses, batch, kappa=2.0)
    assert operator.shape == (10, params.size) and relative_error(operator.dense(), jacobian) <= 1e-12


class ScaledResidual(CollocationResidual):
    """A residual with a trainable coefficient outside the network: the Taylor engine cannot see it."""

    def __init__(self) -> None:
        super().__init__(make_mlp([2, 6, 1]), negative_laplacian)
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def compose(self, taylor) -> Tensor:
        return super().compose(taylor) * self.scale


def test_auto_takes_the_taylor_engine_where_it_applies_and_the_gram_engine_elsewhere() -> None:
    batch = poisson_batch(10, 4)
    wrapped = SvenWrapper(poisson_model([2, 6, 1]), condition_losses, kappa=1.0)
    wrapped.loss_and_grad(batch)
    plan = wrapped.engine_plan()
    assert plan["engine"] == "taylor" and plan["passed_over"] == {}
    assert plan["fast_layers"] == ["net.0 (Linear)", "net.2 (Linear)"] and plan["fallback_parameters"] == []
    scaled = SvenWrapper(ScaledResidual(), condition_losses, kappa=1.0)
    assert taylor_engine_refusal(scaled.model, scaled.params) == (
        "parameters ['scale'] are not weights or biases of the network's Linear layers")
    scaled.loss_and_grad(batch)
    assert scaled.engine_plan()["engine"] == "gram"


class ShiftedResidual(CollocationResidual):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + x.sum(dim=1, keepdim=True)


def test_taylor_engine_is_refused_for_a_model_it_cannot_differentiate() -> None:
    with pytest.raises(ValueError, match=r"engine='taylor' cannot differentiate this model: the model is a "
                                         r"Sequential, not a sven.pde.CollocationResidual; use engine='auto'"):
        SvenWrapper(make_mlp([2, 4, 1]), condition_losses, engine="taylor")
    with pytest.raises(ValueError, match=r"ShiftedResidual overrides CollocationResidual.forward"):
        SvenWrapper(ShiftedResidual(make_mlp([2, 4, 1]), negative_laplacian), condition_losses, engine="taylor")
    relu = CollocationResidual(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)).double(), negative_laplacian)
    with pytest.raises(ValueError, match=r"module '1' \(ReLU\) of its network has no Taylor rule"):
        SvenWrapper(relu, condition_losses, engine="taylor")


def vector_residuals(pred: Tensor, target: Tensor, weight: Tensor, on_boundary: Tensor) -> Tensor:
    """(B, 2): √weight · r and ½u per point, two conditions per sample."""
    residual = weight.sqrt() * (torch.where(on_boundary, pred[:, 1], pred[:, 0]) - target)
    return torch.stack([residual, 0.5 * pred[:, 1]], dim=1)


@pytest.mark.parametrize("residual_fn", [signed_residuals, vector_residuals], ids=["signed", "vector"])
def test_taylor_engine_steps_residual_fn_rows_as_the_functorch_engine(residual_fn) -> None:
    steps = []
    for engine in ("taylor", "functorch"):
        model = poisson_model([2, 8, 8, 1])
        optimizer = Sven(SvenWrapper(model, residual_fn=residual_fn, engine=engine), lr=1.0, k=64, rtol=1e-3)
        before = flat_parameters(model)
        optimizer.step(poisson_batch(10, 4))
        steps.append(flat_parameters(model) - before)
    assert relative_error(steps[0], steps[1]) <= 1e-9


def test_losses_between_taylor_jacobians_round_as_the_jacobians_losses() -> None:
    """On the Taylor engine the loss-only pass (line search, adaptive damping) runs its forward, not the module's:
    the same numbers bit for bit as the losses loss_and_grad returns, and the module's to rounding."""
    model, batch = poisson_model([2, 8, 8, 1]), poisson_batch(10, 4)
    wrapped = SvenWrapper(model, condition_losses, kappa=1.0)
    losses, _ = wrapped.loss_and_grad(batch)
    assert wrapped.engine_plan()["engine"] == "taylor"
    assert torch.equal(wrapped.batch_losses(batch), losses)
    with torch.no_grad():
        assert relative_error(taylor_predictions(model, batch[0]), model(batch[0])) <= 1e-13
