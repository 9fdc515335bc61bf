"""One training step for every optimizer of the benchmark, behind a common ``Stepper`` interface."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from sven.bench.lm_baseline import LevenbergMarquardtStepper, LevenbergMarquardtUnavailable
from sven.bench.tasks import REGRESSION, Task
from sven.nn import SvenWrapper
from sven.opt import PolyakSGD, Sven

WRAPPER_SETTINGS = ("microbatch_size", "param_fraction", "kappa", "engine")


class OptimizerUnavailable(RuntimeError):
    """The optimizer (or one of its settings) is not available in this installation."""


class Stepper(Protocol):
    """Takes one optimisation step on a batch and returns the mean batch loss before the step."""

    def step(self, x: Tensor, y: Tensor) -> float: ...

    def singular_values(self) -> list[float] | None: ...


class SvenStepper:
    """Sven: ``wrapped.loss_and_grad((x, y))`` then ``optimizer.step()``.

    Settings named in ``WRAPPER_SETTINGS`` go to ``SvenWrapper``, the rest to ``Sven``.
    """

    def __init__(self, model: nn.Module, task: Task, device: torch.device, settings: dict[str, Any]) -> None:
        wrapper_settings = {key: value for key, value in settings.items() if key in WRAPPER_SETTINGS}
        optimizer_settings = {key: value for key, value in settings.items() if key not in WRAPPER_SETTINGS}
        self.wrapped = SvenWrapper(model, task.per_sample_loss, device, **wrapper_settings)
        try:
            self.optimizer = Sven(self.wrapped, **optimizer_settings)
        except TypeError as error:
            raise OptimizerUnavailable(f"this version of sven.opt.Sven refuses these settings: {error}") from error

    def step(self, x: Tensor, y: Tensor) -> float:
        losses, _ = self.wrapped.loss_and_grad((x, y))
        self.optimizer.step()
        return float(losses.double().mean())

    def singular_values(self) -> list[float] | None:
        """The singular values the last step kept (descending), from ``optimizer.last_step``."""
        sigma = self.optimizer.last_step.get("kept_singular_values")
        return None if sigma is None else [float(value) for value in sigma]


class ClosureStepper:
    """Any ``torch.optim.Optimizer`` stepped with a closure computing the mean batch loss and its gradient.

    ``per_batch_state`` clears the optimizer's state before each batch. L-BFGS needs it on mini-batches:
    otherwise its first curvature pair of a batch is the difference of two batches' gradients, whose
    s·y can be barely positive (it only has to exceed 1e-10), giving a huge inverse-Hessian direction
    on which the line search overflows to NaN. Cleared, each step runs ``max_iter`` L-BFGS iterations
    with the strong-Wolfe line search on its own batch.
    """

    def __init__(self, model: nn.Module, task: Task, optimizer: torch.optim.Optimizer,
                 per_batch_state: bool = False) -> None:
        self.model, self.task, self.optimizer, self.per_batch_state = model, task, optimizer, per_batch_state

    def step(self, x: Tensor, y: Tensor) -> float:
        if self.per_batch_state:
            self.optimizer.state.clear()

        def closure() -> Tensor:
            self.optimizer.zero_grad()
            loss = self.task.per_sample_loss(self.model(x), y).mean()
            loss.backward()
            return loss

        return float(self.optimizer.step(closure).detach())

    def singular_values(self) -> list[float] | None:
        return None


TorchFactory = Callable[[list[nn.Parameter], dict[str, Any]], torch.optim.Optimizer]
TORCH_OPTIMIZERS: dict[str, TorchFactory] = {
    "adam": lambda params, settings: torch.optim.Adam(params, **settings),
    "sgd": lambda params, settings: torch.optim.SGD(params, **settings),
    "rmsprop": lambda params, settings: torch.optim.RMSprop(params, **settings),
    "lbfgs": lambda params, settings: torch.optim.LBFGS(params, line_search_fn="strong_wolfe", **settings),
    "polyak": lambda params, settings: PolyakSGD(params, **settings),
}
PER_BATCH_STATE = ("lbfgs",)
"""Torch optimizers whose state is cleared before every batch (see ``ClosureStepper``)."""
SVEN_VARIANTS = ("sven", "sven-gn", "sven-gn-fixed", "sven-damped", "sven-gn-damped", "sven-rmsprop")
DEFAULT_OPTIMIZERS = (*SVEN_VARIANTS, *TORCH_OPTIMIZERS)
OPTIMIZER_NAMES = (*DEFAULT_OPTIMIZERS, "lm")


def make_lm_stepper(model: nn.Module, task: Task, settings: dict[str, Any]) -> Stepper:
    """The Levenberg–Marquardt baseline (squared-error residuals only); OptimizerUnavailable without its package."""
    if task.loss_kind != REGRESSION:
        raise OptimizerUnavailable(f"the lm baseline fits squared-error residuals; task {task.name} uses "
                                   f"{task.loss_kind}")
    try:
        return LevenbergMarquardtStepper(model, task.per_sample_loss, settings)
    except LevenbergMarquardtUnavailable as missing:
        raise OptimizerUnavailable(str(missing)) from missing


def make_stepper(name: str, model: nn.Module, task: Task, device: torch.device, settings: dict[str, Any]) -> Stepper:
    """The stepper for optimizer ``name`` (one of ``OPTIMIZER_NAMES``) training ``model`` on ``task``."""
    if name in SVEN_VARIANTS:
        return SvenStepper(model, task, device, settings)
    if name == "lm":
        return make_lm_stepper(model, task, settings)
    if name not in TORCH_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
    optimizer = TORCH_OPTIMIZERS[name](list(model.parameters()), settings)
    return ClosureStepper(model, task, optimizer, per_batch_state=name in PER_BATCH_STATE)
