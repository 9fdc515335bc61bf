"""``engine="auto"``: the fastest Jacobian engine that gives this model's exact Jacobian, checked once.

Candidates, fastest first: "taylor" (only for a ``sven.pde.CollocationResidual`` whose network it
supports: the forward Laplacian and its reverse written out, ``sven.pde.jacobian``), "gram" (hooks,
never forms M), "functorch" (vmap of per-sample gradients) and "rowwise" (one forward, one
``autograd.grad`` per row: exact for any forward, including one that calls
``torch.autograd.grad(create_graph=True)`` or ``torch.func`` transforms itself). On the first batch
each candidate is run; one that raises is skipped, and one whose M^T c disagrees with the gradient of
Σ_i c_i l_i (one ordinary backward, random c, the same random numbers as the engine's pass) is skipped
too: a forward that uses a weight in a way the Gram engine's hooks cannot see (a second-order use
through ``create_graph``) would otherwise give a wrong step without an error. The last candidate is
taken unchecked; when every candidate raises, the first one's error is raised.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sven.jacobian.operator import JacobianOperator
from sven.jacobian.params import ParamSpace

AUTO_CANDIDATES = ("taylor", "gram", "functorch", "rowwise")
JacobianFn = Callable[[], tuple[Tensor, Tensor, JacobianOperator]]


@dataclass(frozen=True)
class EngineChoice:
    """The engine "auto" settled on and, for every faster one, why it was passed over."""

    engine: str
    passed_over: dict[str, str]


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def mismatch(operator: JacobianOperator, model: nn.Module, loss_fn: Callable[..., Tensor], batch: tuple,
             params: ParamSpace, columns: Tensor | None) -> float:
    """Relative difference between Mᵀc and the gradient of Σ_i c_i l_i (l: one plain batched forward), c random."""
    inputs, targets, *extra = batch
    coeffs = torch.randn(operator.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    coeffs = coeffs.to(operator.device)
    with torch.enable_grad():
        values = loss_fn(model(inputs), targets, *extra)
        grads = torch.autograd.grad(values @ coeffs.to(values.dtype), params.tensors, allow_unused=True)
    expected = params.flatten([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.tensors)])
    expected = (expected if columns is None else expected[columns]).to(torch.float64)
    actual = operator.rmatmul(coeffs).to(torch.float64)
    return float((actual - expected).norm() / expected.norm().clamp(min=torch.finfo(torch.float64).tiny))


def run_and_check(run: JacobianFn, model: nn.Module, loss_fn: Callable[..., Tensor], batch: tuple,
                  params: ParamSpace, columns: Tensor | None) -> tuple[tuple[Tensor, Tensor, JacobianOperator], float]:
    """Run an engine, then ``mismatch`` of its M on the same random numbers (Dropout masks) as its own pass."""
    device = params.tensors[0].device
    before = _rng_state(device)
    result = run()
    after = _rng_state(device)
    _set_rng_state(before, device)
    try:
        return result, mismatch(result[2], model, loss_fn, batch, params, columns)
    finally:
        _set_rng_state(after, device)


def tolerance_for(params: ParamSpace) -> float:
    """√ε of the parameters' dtype: far above rounding differences, far below a missing term."""
    return float(torch.finfo(params.tensors[0].dtype).eps) ** 0.5


def choose_engine(candidates: dict[str, JacobianFn], model: nn.Module, loss_fn: Callable[..., Tensor], batch: tuple,
                  params: ParamSpace, columns: Tensor | None
                  ) -> tuple[EngineChoice | None, tuple[Tensor, Tensor, JacobianOperator]]:
    """Run the candidates in order; return the first whose Jacobian checks out, with its result.

    A batch whose check is not finite (a NaN loss: Sven will skip the step) settles nothing:
    the choice is None and the first candidate that ran gives this batch's result.
    """
    passed_over: dict[str, str] = {}
    first_error: Exception | None = None
    names = list(candidates)
    for name in names:
        try:
            if name == names[-1]:
                return EngineChoice(name, passed_over), candidates[name]()
            result, difference = run_and_check(candidates[name], model, loss_fn, batch, params, columns)
        except (RuntimeError, ValueError, NotImplementedError) as error:
            passed_over[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            first_error = first_error or error
            continue
        if not math.isfinite(difference):
            return None, result
        if difference <= tolerance_for(params):
            return EngineChoice(name, passed_over), result
        passed_over[name] = (f"its Mᵀc differs from autograd's by {difference:.2g} (relative): the forward uses "
                             "parameters in a way this engine cannot see")
    raise first_error


def rowwise_cost(choice: EngineChoice, shape: tuple[int, int]) -> str:
    """What "auto" settling on "rowwise" for M of ``shape`` (rows, cols) costs, why, and what runs faster."""
    rows, cols = shape
    reasons = "; ".join(f"{name}: {reason}" for name, reason in choice.passed_over.items())
    return (f"engine 'auto' took 'rowwise' ({reasons}). It materialises M ({rows} × {cols}) from one backward "
            f"pass per row, about {rows}× an ordinary backward at every step. A PDE residual built on "
            "sven.pde.derivatives (an nn.Sequential of Linear layers and elementwise activations) runs on the Gram "
            "engine (as a sven.pde.CollocationResidual, on the faster Taylor engine), and one written with "
            "torch.func transforms on 'functorch'.")
