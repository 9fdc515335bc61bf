"""The Sven optimizer: θ ← θ − lr · M⁺ r with the truncated pseudoinverse of the residual Jacobian."""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import Tensor

from sven.nn.wrapper import SvenWrapper
from sven.opt.pinv import SVD_MODES, SolverOptions, pinv_direction, resolve_mode, truncated_spectrum


class Sven(torch.optim.Optimizer):
    """Singular Value dEsceNt.

    Each step takes the Jacobian M (G × n) of the residuals r that
    ``wrapped.loss_and_grad`` computed and moves the parameters by
    ``-lr · M⁺ r``, where M⁺ keeps at most ``k`` singular values and only those
    with σ > rtol · σ_max.

    Args:
        wrapped: the ``SvenWrapper`` whose model is optimised.
        lr: step scale (≥ 0); lives in ``param_groups[0]["lr"]`` so schedulers drive it.
        k: maximal number of singular values kept (≥ 1).
        rtol: relative cut on σ / σ_max (≥ 0).
        svd_mode: one of ``sven.opt.pinv.SVD_MODES``; "auto" is the cheapest exact route.
        oversampling, power_iterations: for the randomized modes.
    """

    def __init__(
        self,
        wrapped: SvenWrapper,
        lr: float = 0.1,
        k: int = 64,
        rtol: float = 1e-3,
        svd_mode: str = "auto",
        oversampling: int = 5,
        power_iterations: int = 1,
    ) -> None:
        if not isinstance(wrapped, SvenWrapper):
            raise TypeError(f"Sven needs a SvenWrapper; got {type(wrapped).__name__}")
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"k must be an integer >= 1; got {k!r}")
        if not rtol >= 0:
            raise ValueError(f"rtol must be >= 0; got {rtol}")
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0; got {lr}")
        if svd_mode not in SVD_MODES:
            raise ValueError(f"unknown svd_mode {svd_mode!r}; expected one of {', '.join(SVD_MODES)}")
        if oversampling < 0 or power_iterations < 0:
            raise ValueError(
                f"oversampling and power_iterations must be >= 0; got {oversampling}, {power_iterations}"
            )
        self.wrapped = wrapped
        defaults = dict(lr=lr, k=k, rtol=rtol, svd_mode=svd_mode,
                        oversampling=oversampling, power_iterations=power_iterations)
        super().__init__(list(wrapped.params.tensors), defaults)
        self.last_step: dict[str, Any] = {}

    def _settings(self) -> dict[str, Any]:
        return self.param_groups[0]

    def _skip(self, reason: str, bad_samples: int, state_losses: Tensor) -> None:
        warnings.warn(f"Sven skipped the step: {reason}; no parameter was changed", RuntimeWarning, stacklevel=3)
        self.last_step = {"skipped": True, "reason": reason, "bad_samples": bad_samples,
                          "mean_loss": float(state_losses.double().mean())}

    @torch.no_grad()
    def step(self, closure: None = None) -> Tensor:
        """Apply the step for the Jacobian computed by the last ``wrapped.loss_and_grad``.

        Returns the per-sample losses of that batch. A step whose losses or
        Jacobian are not finite changes nothing and is reported in ``last_step``.
        """
        if closure is not None:
            raise TypeError("Sven.step() takes no closure: call wrapped.loss_and_grad(batch) first")
        state = self.wrapped.state
        if state is None:
            raise RuntimeError(
                "Sven.step() needs a Jacobian: call wrapped.loss_and_grad(batch) before each step()"
            )
        self.wrapped.state = None
        settings = self._settings()
        started = time.perf_counter()
        operator, residuals = state.operator, state.residuals
        bad = ~torch.isfinite(residuals) | operator.nonfinite_rows()
        if bool(bad.any()):
            self._skip(f"{int(bad.sum())} of {bad.numel()} samples have a non-finite loss or Jacobian row",
                       int(bad.sum()), state.losses)
            return state.losses
        options = SolverOptions(settings["oversampling"], settings["power_iterations"])
        spectrum = truncated_spectrum(operator, settings["svd_mode"], settings["k"], settings["rtol"], options)
        direction = pinv_direction(spectrum, operator, residuals)
        if not bool(torch.isfinite(direction).all()):
            self._skip("the solver returned a non-finite direction", 0, state.losses)
            return state.losses
        lr_of = {id(p): group["lr"] for group in self.param_groups for p in group["params"]}
        scales = [-lr_of[id(p)] for p in self.wrapped.params.tensors]
        self.wrapped.params.add_flat_(direction, scales, state.columns)
        self.last_step = {
            "skipped": False,
            "svd_mode": resolve_mode(settings["svd_mode"], operator.shape, settings["rtol"]),
            "rank_kept": spectrum.rank_kept,
            "sigma_max": spectrum.sigma_max,
            "singular_values": spectrum.sigma.cpu(),
            "rtol_cut": spectrum.rtol_used * spectrum.sigma_max,
            "step_norm": float(direction.double().norm()) * settings["lr"],
            "mean_loss": float(state.losses.double().mean()),
            "solve_time": time.perf_counter() - started,
        }
        return state.losses
