"""The Sven optimizer: θ ← θ − lr · M⁺ r with the truncated pseudoinverse of the residual Jacobian."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from sven.cost import regularized_cost, warn_cost
from sven.jacobian.checks import all_finite
from sven.jacobian.operator import JacobianOperator
from sven.nn.wrapper import JacobianState, SvenWrapper
from sven.opt.candidate import CandidateSteps
from sven.opt.options import (
    GroupSettings,
    StepSettings,
    check_regularized_combination,
    settings_from_options,
    translate_deprecated,
)
from sven.opt.regularized import RegularizedSolve
from sven.opt.report import StepReport, history_entry
from sven.opt.rmsprop import BUFFER_DTYPE, rmsprop_step
from sven.opt.search import search_step
from sven.opt.solve import SolveOutcome, solve_spectrum
from sven.opt.spectrum import Spectrum

ParamGroups = Iterable[Tensor] | Iterable[dict[str, Any]]
Closure = Callable[[], Any]


class Sven(torch.optim.Optimizer):
    """Singular Value dEsceNt, a ``torch.optim.Optimizer``.

    Each step takes the Jacobian M (G × n) of the residuals r that
    ``wrapped.loss_and_grad`` computed and moves the parameters by
    ``-lr · M⁺ r``, where M⁺ keeps at most ``k`` singular values and only those
    with σ > rtol · σ_max. See docs/OPTIMIZER.md for the options' mathematics.

    Args:
        wrapped: the ``SvenWrapper`` whose model is optimised.
        lr: step scale (≥ 0); lives in ``param_groups[i]["lr"]`` so schedulers drive it.
        params: optional param groups covering exactly the wrapped model's trainable
            parameters; only ``lr``, ``weight_decay`` and ``decoupled_weight_decay`` may
            differ between groups (lr scales that group's part of the one step).
        track_svd_info: keep every step's spectrum in ``svd_history`` for plots.
        **options: ``weight_decay`` and ``decoupled_weight_decay`` (defaults of every group,
            ``sven.opt.options.GroupSettings``) and the step's settings,
            ``sven.opt.options.StepSettings`` (k, rtol, svd_mode, oversampling,
            power_iterations, damping and its adaptive schedule, rmsprop, rmsprop_alpha,
            rmsprop_eps, momentum, variable_k, line_search, fisher_decay, relative). The names ``use_rmsprop``,
            ``rmsprop_post``, ``alpha_rmsprop``, ``eps_rmsprop`` and ``mu_rmsprop`` still
            work and warn (DeprecationWarning).
    """

    def __init__(self, wrapped: SvenWrapper, lr: float = 0.1, params: ParamGroups | None = None,
                 track_svd_info: bool = False, **options: Any) -> None:
        if not isinstance(wrapped, SvenWrapper):
            raise TypeError(f"Sven needs a SvenWrapper; got {type(wrapped).__name__}")
        group_defaults, settings = settings_from_options({"lr": lr, **translate_deprecated(options)})
        self.wrapped = wrapped
        self._groups_fixed = False
        self._validated: tuple[tuple, StepSettings] | None = None
        super().__init__(_param_groups(wrapped, params), {**asdict(group_defaults), **asdict(settings)})
        self.settings()
        self._groups_fixed = True
        self.track_svd_info = track_svd_info
        self.svd_history: list[dict[str, Any]] = []
        self.last_step: StepReport = StepReport({})
        self.step_count = 0
        self.current_damping = float(settings.damping_init)
        self.square_avg: Tensor | None = None
        self.momentum: Tensor | None = None
        self._solver_generator: torch.Generator | None = None

    @property
    def solver_generator(self) -> torch.Generator:
        """The generator the randomized solvers draw from, seeded from torch's global RNG on first use."""
        if self._solver_generator is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            self._solver_generator = torch.Generator(device=self.wrapped.device).manual_seed(seed)
        return self._solver_generator

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused after construction: Sven steps exactly the parameters its wrapper differentiates."""
        if self._groups_fixed:
            count = len(list(param_group.get("params", []))) if isinstance(param_group, dict) else "?"
            raise ValueError(
                f"Sven cannot add a param group (got one with {count} tensor(s)): its Jacobian covers exactly "
                "the trainable parameters of the wrapped model, fixed when the SvenWrapper was built. "
                "Build a new SvenWrapper and Sven(wrapped, params=[...]) with all groups instead."
            )
        super().add_param_group(param_group)

    def settings(self) -> StepSettings:
        """The validated settings of the next step, read from the param groups (which must agree).

        Validated again only when a group's values changed since the last call.
        """
        key = tuple(tuple(group[name] for name in (*StepSettings.names(), *GroupSettings.names()))
                    for group in self.param_groups)
        if self._validated is None or self._validated[0] != key:
            self._validated = (key, self._validated_settings())
        return self._validated[1]

    def _validated_settings(self) -> StepSettings:
        first = StepSettings.from_group(self.param_groups[0])
        for group in self.param_groups[1:]:
            other = StepSettings.from_group(group)
            if other != first:
                differing = [name for name in StepSettings.names() if getattr(other, name) != getattr(first, name)]
                raise ValueError(f"param groups differ in {differing}; only {', '.join(GroupSettings.names())} may "
                                 "differ between groups (one pseudoinverse couples all parameters)")
        check_regularized_combination(first, self._group_settings())
        return first

    def _with_missing_settings(self, group: dict[str, Any]) -> dict[str, Any]:
        """A saved param group with the step settings it predates (e.g. ``gram_memory``) taken from this optimizer."""
        return {**{name: self.defaults[name] for name in StepSettings.names() if name not in group}, **group}

    def _group_settings(self) -> list[GroupSettings]:
        return [GroupSettings.from_group(group) for group in self.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict (param_groups carry lr and every step setting) plus a ``"sven"`` entry.

        ``"sven"`` holds the step count, the adaptive λ, the flat RMSProp and momentum
        buffers (P,), the state of the randomized solvers' generator and that of the
        wrapper's param_fraction generator.
        """
        state = super().state_dict()
        clone = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        generator_state = lambda g: None if g is None else g.get_state()  # noqa: E731
        state["sven"] = {
            "step_count": self.step_count,
            "damping": self.current_damping,
            "square_avg": clone(self.square_avg),
            "momentum": clone(self.momentum),
            "solver_rng": generator_state(self._solver_generator),
            "param_fraction_rng": generator_state(self.wrapped.generator),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved; the next step is then bit-identical to the saved run's.

        Param groups saved under deprecated option names are translated (with a DeprecationWarning); settings
        added since the state_dict was saved take this optimizer's values.
        """
        state_dict = dict(state_dict)
        if "sven" not in state_dict:
            raise ValueError(f"not a Sven state_dict: expected a 'sven' entry; got keys {sorted(state_dict)}")
        extra = state_dict.pop("sven")
        size = self.wrapped.params.size
        for name in ("square_avg", "momentum"):
            buffer = extra[name]
            if buffer is not None and tuple(buffer.shape) != (size,):
                raise ValueError(f"state_dict buffer {name!r} has shape {tuple(buffer.shape)}; expected ({size},)")
        state_dict["param_groups"] = [self._with_missing_settings(translate_deprecated(group))
                                      for group in state_dict["param_groups"]]
        super().load_state_dict(state_dict)
        to_device = lambda t: None if t is None else t.to(self.wrapped.device, BUFFER_DTYPE)  # noqa: E731
        self.step_count = int(extra["step_count"])
        self.current_damping = float(extra["damping"])
        self.square_avg = to_device(extra["square_avg"])
        self.momentum = to_device(extra["momentum"])
        if extra.get("solver_rng") is not None:
            self.solver_generator.set_state(extra["solver_rng"])
        if self.wrapped.generator is not None and extra["param_fraction_rng"] is not None:
            self.wrapped.generator.set_state(extra["param_fraction_rng"])

    @torch.no_grad()
    def step(self, batch: tuple | list | Closure | None = None, closure: Closure | None = None) -> Any:
        """Apply the step for the Jacobian of the last ``wrapped.loss_and_grad``.

        - ``step()``: uses the Jacobian of the last ``wrapped.loss_and_grad(batch)``; returns the
          per-sample losses (B,) of that batch (before the step).
        - ``step(batch)``: first calls ``wrapped.loss_and_grad(batch)``; returns those losses.
        - ``step(closure)`` / ``step(closure=closure)``: calls ``closure()``, which must call
          ``wrapped.loss_and_grad(batch)``, then steps; returns what the closure returned.

        A step whose losses or Jacobian are not finite, whose spectrum keeps nothing, or
        whose solver fails changes no parameter and no optimizer state and is reported in
        ``last_step``.
        """
        if callable(batch):
            batch, closure = None, batch
        if closure is not None and batch is not None:
            raise TypeError("Sven.step takes a batch or a closure, not both")
        with torch.enable_grad():
            returned = closure() if closure is not None else None
            if batch is not None:
                self.wrapped.loss_and_grad(batch)
        state = self.wrapped.state
        if state is None:
            raise RuntimeError(
                "Sven.step() needs a Jacobian: call wrapped.loss_and_grad(batch) before each step() (or in the "
                "closure passed to step(closure)), or pass the batch, step(batch)"
            )
        self.wrapped.state = None
        losses = self._step(state, self.settings())
        return returned if closure is not None else losses

    def _step(self, state: JacobianState, settings: StepSettings) -> Tensor:
        """Check, scale columns, solve once, search the update, apply it, keep the buffers, report."""
        started = time.perf_counter()
        if not (all_finite(state.residuals) and state.operator.all_rows_finite()):
            bad = ~torch.isfinite(state.residuals) | state.operator.nonfinite_rows()
            return self._skip(f"{int(bad.sum())} of {bad.numel()} samples have a non-finite loss or Jacobian row",
                              state.losses, int(bad.sum()))
        rmsprop = rmsprop_step(settings.rmsprop, state.operator, self.square_avg, self.wrapped.params.size,
                               state.columns, settings.rmsprop_alpha, settings.rmsprop_eps)
        solved = self._solve(rmsprop.operator, state.columns, settings)
        solve_time = time.perf_counter() - started
        if solved.spectrum is None:
            return self._skip(solved.note, state.losses)
        if solved.spectrum.rank_kept == 0:
            return self._skip(_nothing_kept_reason(solved.spectrum), state.losses)
        mean_loss = float(state.losses.double().mean())
        candidates = CandidateSteps(
            self.wrapped, rmsprop.operator, state.residuals, state.batch, state.columns, rmsprop.direction_scaling,
            self._per_param("lr"), self._per_param("decoupled_weight_decay"),
            (self.momentum, settings.momentum) if settings.momentum else None,
            undoable=settings.searches,
        )
        try:
            outcome = search_step(candidates, solved.spectrum, settings, self.current_damping, mean_loss)
        except torch.linalg.LinAlgError as error:  # raised while building a direction: no try is left applied
            return self._skip(f"the direction's solve failed ({str(error).splitlines()[0]})", state.losses)
        if outcome.failure is not None:
            return self._skip(outcome.failure, state.losses)
        self._commit(rmsprop.square_avg_after(outcome.update is not None),
                     outcome.update if settings.momentum else None, outcome.next_damping)
        self.last_step = StepReport({
            "skipped": False, "svd_mode": solved.mode, "solver_note": solved.note,
            "rank_kept": outcome.spectrum.rank_kept,
            "step_norm": 0.0 if outcome.update is None else candidates.step_norm(outcome.update),
            "mean_loss": mean_loss, "solve_time": solve_time, "step_time": time.perf_counter() - started,
            **outcome.report, **outcome.spectrum.diagnostics,
        }, outcome.spectrum)
        if self.track_svd_info:
            self.svd_history.append(history_entry(self.step_count, outcome.spectrum))
        return state.losses

    def _solve(self, operator: JacobianOperator, columns: Tensor | None, settings: StepSettings) -> SolveOutcome:
        """The spectrum of the step: the exact regularised solve when a weight or Fisher decay is on, else
        the truncated spectrum of ``settings.svd_mode`` (with a relative fixed damping in units of σ_max²)."""
        if settings.fisher_decay > 0 or any(group["weight_decay"] for group in self.param_groups):
            decay = self._per_column("weight_decay", columns)
            theta = self.wrapped.params.flatten([p.detach() for p in self.wrapped.params.tensors])
            theta = theta if columns is None else theta[columns]
            cost = regularized_cost(operator.shape[0], settings.gram_memory)
            if cost is not None:
                warn_cost(cost)
            return SolveOutcome(RegularizedSolve(operator, theta, decay, settings.fisher_decay, settings.relative),
                                "regularized")
        generator = self.solver_generator if settings.svd_mode in ("randomized", "randomized_v2") else None
        return solve_spectrum(operator, settings, generator)

    def _skip(self, reason: str, losses: Tensor, bad_samples: int = 0) -> Tensor:
        warnings.warn(f"Sven skipped the step: {reason}; no parameter was changed", RuntimeWarning, stacklevel=4)
        self.last_step = StepReport({"skipped": True, "reason": reason, "bad_samples": bad_samples,
                                     "mean_loss": float(losses.double().mean())})
        return losses

    def _commit(self, square_avg: Tensor | None, momentum: Tensor | None, next_damping: float | None) -> None:
        """Store the state of a step that was taken; None leaves an entry as it was."""
        self.step_count += 1
        if square_avg is not None:
            self.square_avg = square_avg
        if momentum is not None:
            self.momentum = momentum
        if next_damping is not None:
            self.current_damping = next_damping

    def _per_param(self, name: str) -> list[float]:
        """The group setting ``name`` (lr, weight_decay, …) of each wrapped parameter, in ParamSpace order."""
        if len(self.param_groups) == 1:
            return [self.param_groups[0][name]] * len(self.wrapped.params.tensors)
        value_of = {id(p): group[name] for group in self.param_groups for p in group["params"]}
        return [value_of[id(p)] for p in self.wrapped.params.tensors]

    def _per_column(self, name: str, columns: Tensor | None) -> Tensor:
        """The group setting ``name`` per flat parameter (P,), or at ``columns`` (n,), float64."""
        return self.wrapped.params.per_entry(self._per_param(name), columns, self.wrapped.device)


def _nothing_kept_reason(spectrum: Spectrum) -> str:
    if spectrum.sigma_max == 0:
        return "the Jacobian is zero (σ_max = 0): no parameter moves any loss (frozen model or dead units)"
    cut = spectrum.rtol_used * spectrum.sigma_max
    return (f"no singular value is above the cut rtol·σ_max = {spectrum.rtol_used:.3g}·{spectrum.sigma_max:.3g} "
            f"= {cut:.3g}; lower rtol")


def _param_groups(wrapped: SvenWrapper, params: ParamGroups | None) -> list[dict[str, Any]]:
    """Validated param groups covering exactly the wrapper's trainable parameters, each once."""
    trainable = wrapped.params.tensors
    if params is None:
        return [{"params": list(trainable)}]
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors or of dicts with a 'params' entry; got a Tensor")
    groups = list(params)
    if not groups:
        raise ValueError("params is empty; expected groups covering the wrapped model's trainable parameters")
    if not all(isinstance(group, dict) for group in groups):
        groups = [{"params": groups}]
    groups = [dict(group) for group in groups]
    for group in groups:
        unsupported = sorted(set(group) - {"params", *GroupSettings.names()})
        if unsupported:
            raise ValueError(f"a param group may only set {', '.join(GroupSettings.names())} (one pseudoinverse "
                             f"couples all parameters); got {unsupported}")
        GroupSettings(**{name: group[name] for name in GroupSettings.names() if name in group})
        tensors = group["params"]
        group["params"] = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    given = [id(p) for group in groups for p in group["params"]]
    wanted = {id(p) for p in trainable}
    if len(given) != len(set(given)):
        raise ValueError("a parameter appears more than once in params; each must be in exactly one group")
    if set(given) != wanted:
        raise ValueError(
            f"params must cover exactly the wrapped model's {len(wanted)} trainable tensors; got "
            f"{len(wanted - set(given))} missing and {len(set(given) - wanted)} not in the model "
            "(frozen parameters, requires_grad=False, are not part of Sven's parameter space)"
        )
    return groups
