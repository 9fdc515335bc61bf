"""The Levenberg–Marquardt baseline: the PyPI package ``torch-levenberg-marquardt``, when it is installed.

It is an optional extra (``pip install sven[lm]``), never a dependency. To keep the
installed torch build, install it without dependencies:
``pip install --no-deps torch-levenberg-marquardt pytorch-lightning torchmetrics lightning-utilities pyyaml``
(the package imports pytorch-lightning and torchmetrics at import time).

The package solves (JJᵀ/B + λI) c = e/B for the prediction residuals e = f(x) − y, so
its λ is Sven's λ divided by the batch size B: its step with λ equals
``Sven(SvenWrapper(model, per_sample_mse, kappa=1), lr=1, damping=B·λ)`` (tests/test_damping.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any

from torch import Tensor, nn

LM_PACKAGE = "torch-levenberg-marquardt"


class LevenbergMarquardtUnavailable(ImportError):
    """``torch-levenberg-marquardt`` (or a package it imports) is not installed."""


def import_lm() -> ModuleType:
    """The ``torch_levenberg_marquardt`` module, or a LevenbergMarquardtUnavailable that says how to install it."""
    try:
        import torch_levenberg_marquardt
    except ImportError as error:
        raise LevenbergMarquardtUnavailable(
            f"the 'lm' baseline needs the optional package {LM_PACKAGE} ({error}). Install it with "
            "`pip install sven[lm]`, or, keeping your torch build: `pip install --no-deps "
            "torch-levenberg-marquardt pytorch-lightning torchmetrics lightning-utilities pyyaml`"
        ) from error
    return torch_levenberg_marquardt


class LevenbergMarquardtStepper:
    """One ``LevenbergMarquardtModule.training_step`` per batch, with the package's MSE residuals e = f(x) − y.

    Args:
        model: the model to train in place (the package rebinds its parameters to one flat tensor).
        per_sample_loss: ``(pred, y) -> (B,)``, only to report the batch loss before each step.
        settings: keyword arguments of ``LevenbergMarquardtModule`` (learning_rate, attempts_per_step,
            solve_method, …) and of ``StandardDampingStrategy`` (starting_value, dec_factor, inc_factor,
            min_value, max_value, …); the package's defaults otherwise.
    """

    def __init__(self, model: nn.Module, per_sample_loss: Callable[[Tensor, Tensor], Tensor],
                 settings: dict[str, Any] | None = None) -> None:
        lm = import_lm()
        settings = dict(settings or {})
        module_keys = set(inspect.signature(lm.training.LevenbergMarquardtModule).parameters)
        module_keys -= {"model", "loss_fn", "damping_strategy"}
        damping_keys = set(inspect.signature(lm.damping.StandardDampingStrategy).parameters)
        unknown = sorted(set(settings) - module_keys - damping_keys)
        if unknown:
            raise ValueError(f"unknown Levenberg–Marquardt settings {unknown}; expected some of "
                             f"{sorted(module_keys | damping_keys)}")
        damping = lm.damping.StandardDampingStrategy(**{k: v for k, v in settings.items() if k in damping_keys})
        self.module = lm.training.LevenbergMarquardtModule(
            model, damping_strategy=damping, **{k: v for k, v in settings.items() if k in module_keys}
        )
        self.per_sample_loss = per_sample_loss
        self.last_logs: dict[str, Any] = {}

    def step(self, x: Tensor, y: Tensor) -> float:
        """One LM step on (x (B, ...), y (B, d)); returns the mean batch loss before the step."""
        outputs, _, _, logs = self.module.training_step(x, y)
        self.last_logs = {"damping": float(logs["damping"]), "attempts": int(logs["attempts"])}
        return float(self.per_sample_loss(outputs, y).double().mean())

    def singular_values(self) -> list[float] | None:
        """LM computes no spectrum."""
        return None
