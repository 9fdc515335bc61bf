"""The Sven optimizer: θ ← θ − lr · M⁺ r with the truncated pseudoinverse of the residual Jacobian."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from sven.jacobian.operator import JacobianOperator
from sven.nn.wrapper import JacobianState, SvenWrapper
from sven.opt.candidate import CandidateSteps
from sven.opt.damping import DampingSchedule, search_damping
from sven.opt.pinv import SVD_MODES, SolverOptions, Spectrum, resolve_mode, truncated_spectrum
from sven.opt.report import StepReport, spectrum_entries
from sven.opt.rmsprop import ColumnScaledJacobian, UpdateScaling, column_scale, updated_square_average
from sven.opt.variable_k import greedy_rank, leading

SHARED_SETTINGS = (
    "k", "rtol", "svd_mode", "oversampling", "power_iterations", "damping", "damping_init", "damping_increase",
    "damping_decrease", "damping_min", "damping_max", "max_tries", "use_rmsprop", "rmsprop_post",
    "alpha_rmsprop", "eps_rmsprop", "mu_rmsprop", "variable_k",
)
"""Settings of the one pseudoinverse that couples all parameters: equal in every param group."""

BUFFER_DTYPE = torch.float64
"""dtype of the flat RMSProp and momentum buffers, whatever the model's dtype."""

ParamGroups = Iterable[Tensor] | Iterable[dict[str, Any]]


class Sven(torch.optim.Optimizer):
    """Singular Value dEsceNt, a ``torch.optim.Optimizer``.

    Each step takes the Jacobian M (G × n) of the residuals r that
    ``wrapped.loss_and_grad`` computed and moves the parameters by
    ``-lr · M⁺ r``, where M⁺ keeps at most ``k`` singular values and only those
    with σ > rtol · σ_max. See docs/OPTIMIZER.md for the options' mathematics.

    Args:
        wrapped: the ``SvenWrapper`` whose model is optimised.
        lr: step scale (≥ 0); lives in ``param_groups[i]["lr"]`` so schedulers drive it.
        k: maximal number of singular values kept (≥ 1).
        rtol: relative cut on σ / σ_max (≥ 0); a cut that keeps nothing skips the step.
        svd_mode: one of ``sven.opt.pinv.SVD_MODES``; "auto" is the cheapest exact route.
        oversampling, power_iterations: for the randomized modes.
        damping: λ ≥ 0 filters each kept σ as σ/(σ² + λ) (0: the exact paper step), or
            "adaptive": Levenberg–Marquardt control of λ from ``damping_init`` — after each
            try the batch loss is re-evaluated (one forward pass); a try that does not lower
            it is undone bit-identically and retried with λ·``damping_increase`` from the same
            spectrum, at most ``max_tries`` times; an accepted try sets λ·``damping_decrease``
            for the next step; λ stays in [``damping_min``, ``damping_max``].
        use_rmsprop: scale M's columns by D = 1/(√v + ``eps_rmsprop``) and step ``(M D)⁺ r`` (the
            paper's pre-scaling), with v the running average (factor ``alpha_rmsprop``) of the squared
            mean Jacobian row g = Mᵀ1 / G. ``rmsprop_post=True`` scales the update instead, as the
            paper's code: d = M⁺ r, v ← α·v + (1 − α)·d², step ``d / (√v + eps)``.
        mu_rmsprop: heavy-ball momentum on the step, b ← μ·b + d, θ ← θ − lr·b (0: off).
        variable_k: greedy rank — add singular directions one at a time while the batch loss
            falls (one extra forward pass per direction tried, at most rank_kept).
        track_svd_info: keep every step's spectrum in ``svd_history`` for plots.
        params: optional param groups covering exactly the wrapped model's trainable
            parameters; only ``lr`` may differ between groups (it scales that group's
            part of the one step M⁺ r).
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
        damping: float | str = 0.0,
        damping_init: float = 1e-3,
        damping_increase: float = 10.0,
        damping_decrease: float = 0.1,
        damping_min: float = 1e-10,
        damping_max: float = 1e10,
        max_tries: int = 10,
        use_rmsprop: bool = False,
        rmsprop_post: bool = False,
        alpha_rmsprop: float = 0.99,
        eps_rmsprop: float = 1e-8,
        mu_rmsprop: float = 0.0,
        variable_k: bool = False,
        track_svd_info: bool = False,
        params: ParamGroups | None = None,
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
        if not (damping == "adaptive" or (isinstance(damping, (int, float)) and damping >= 0)):
            raise ValueError(f"damping must be a number >= 0 or 'adaptive'; got {damping!r}")
        if damping == "adaptive" and variable_k:
            raise ValueError("variable_k and damping='adaptive' both search the step on the batch loss; pick one")
        if not damping_init > 0:
            raise ValueError(f"damping_init must be > 0; got {damping_init}")
        DampingSchedule(damping_increase, damping_decrease, damping_min, damping_max, max_tries)
        if rmsprop_post and not use_rmsprop:
            raise ValueError("rmsprop_post=True chooses where the RMSProp scaling acts; it needs use_rmsprop=True")
        if not 0 <= alpha_rmsprop < 1:
            raise ValueError(f"alpha_rmsprop must be in [0, 1); got {alpha_rmsprop}")
        if not eps_rmsprop > 0:
            raise ValueError(f"eps_rmsprop must be > 0; got {eps_rmsprop}")
        if not 0 <= mu_rmsprop < 1:
            raise ValueError(f"mu_rmsprop must be in [0, 1); got {mu_rmsprop}")
        self.wrapped = wrapped
        defaults = dict(
            lr=lr, k=k, rtol=rtol, svd_mode=svd_mode, oversampling=oversampling, power_iterations=power_iterations,
            damping=damping, damping_init=damping_init, damping_increase=damping_increase,
            damping_decrease=damping_decrease, damping_min=damping_min, damping_max=damping_max,
            max_tries=max_tries, use_rmsprop=use_rmsprop, rmsprop_post=rmsprop_post, alpha_rmsprop=alpha_rmsprop,
            eps_rmsprop=eps_rmsprop, mu_rmsprop=mu_rmsprop, variable_k=variable_k,
        )
        self._groups_fixed = False
        super().__init__(_param_groups(wrapped, params), defaults)
        self._groups_fixed = True
        self.track_svd_info = track_svd_info
        self.svd_history: list[dict[str, Any]] = []
        self.last_step: StepReport = StepReport({})
        self.step_count = 0
        self.current_damping = float(damping_init)
        self.square_avg: Tensor | None = None
        self.momentum: Tensor | None = None

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

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict (param_groups carry lr, k, rtol, svd_mode, … per group) plus a ``"sven"`` entry.

        ``"sven"`` holds the step count, the adaptive λ, the flat RMSProp and momentum
        buffers (P,) and the state of the wrapper's param_fraction generator.
        """
        state = super().state_dict()
        clone = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        state["sven"] = {
            "step_count": self.step_count,
            "damping": self.current_damping,
            "square_avg": clone(self.square_avg),
            "momentum": clone(self.momentum),
            "param_fraction_rng": None if self.wrapped.generator is None else self.wrapped.generator.get_state(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved; the next step is then bit-identical to the saved run's."""
        state_dict = dict(state_dict)
        if "sven" not in state_dict:
            raise ValueError(f"not a Sven state_dict: expected a 'sven' entry; got keys {sorted(state_dict)}")
        extra = state_dict.pop("sven")
        size = self.wrapped.params.size
        for name in ("square_avg", "momentum"):
            buffer = extra[name]
            if buffer is not None and tuple(buffer.shape) != (size,):
                raise ValueError(f"state_dict buffer {name!r} has shape {tuple(buffer.shape)}; expected ({size},)")
        super().load_state_dict(state_dict)
        to_device = lambda t: None if t is None else t.to(self.wrapped.device, BUFFER_DTYPE)  # noqa: E731
        self.step_count = int(extra["step_count"])
        self.current_damping = float(extra["damping"])
        self.square_avg = to_device(extra["square_avg"])
        self.momentum = to_device(extra["momentum"])
        if self.wrapped.generator is not None and extra["param_fraction_rng"] is not None:
            self.wrapped.generator.set_state(extra["param_fraction_rng"])

    def _settings(self) -> dict[str, Any]:
        first = self.param_groups[0]
        for group in self.param_groups[1:]:
            differing = [key for key in SHARED_SETTINGS if group[key] != first[key]]
            if differing:
                raise ValueError(
                    f"param groups differ in {differing}; only lr may differ between groups "
                    "(one pseudoinverse couples all parameters)"
                )
        return first

    def _skip(self, reason: str, losses: Tensor, bad_samples: int = 0) -> Tensor:
        warnings.warn(f"Sven skipped the step: {reason}; no parameter was changed", RuntimeWarning, stacklevel=3)
        self.last_step = StepReport({"skipped": True, "reason": reason, "bad_samples": bad_samples,
                                     "mean_loss": float(losses.double().mean())})
        return losses

    @torch.no_grad()
    def step(self, batch: tuple | list | None = None, closure: None = None) -> Tensor:
        """Apply the step for the Jacobian of the last ``wrapped.loss_and_grad`` (or of ``batch``).

        ``step(batch)`` first calls ``wrapped.loss_and_grad(batch)``. Returns the
        per-sample losses (B,) of that batch (before the step). A step whose losses
        or Jacobian are not finite, whose spectrum keeps nothing, or whose solver
        fails changes no parameter and no optimizer state and is reported in ``last_step``.
        """
        if closure is not None or callable(batch):
            raise TypeError("Sven.step() takes no closure: call wrapped.loss_and_grad(batch) first, "
                            "or pass the batch itself, step((x, y, *extra))")
        if batch is not None:
            with torch.enable_grad():
                self.wrapped.loss_and_grad(batch)
        state = self.wrapped.state
        if state is None:
            raise RuntimeError(
                "Sven.step() needs a Jacobian: call wrapped.loss_and_grad(batch) before each step(), or step(batch)"
            )
        self.wrapped.state = None
        return self._step(state, self._settings())

    def _step(self, state: JacobianState, settings: dict[str, Any]) -> Tensor:
        """Check, scale, solve once, pick the update (plain, greedy rank or adaptive λ), apply it, report."""
        started = time.perf_counter()
        operator, residuals = state.operator, state.residuals
        bad = ~torch.isfinite(residuals) | operator.nonfinite_rows()
        if bool(bad.any()):
            return self._skip(f"{int(bad.sum())} of {bad.numel()} samples have a non-finite loss or Jacobian row",
                              state.losses, int(bad.sum()))
        square_avg, scale = self._gradient_scale(operator, state.columns, settings)
        update_scaling = self._update_scaling(state.columns, settings)
        solve_operator = operator if scale is None else ColumnScaledJacobian(operator, scale)
        spectrum, mode, solver_note = self._solve(solve_operator, settings)
        solve_time = time.perf_counter() - started
        if spectrum is None:
            return self._skip(solver_note, state.losses)
        if spectrum.rank_kept == 0:
            return self._skip(_nothing_kept_reason(spectrum), state.losses)
        mean_loss = float(state.losses.double().mean())
        uses_momentum = settings["mu_rmsprop"] != 0
        candidates = CandidateSteps(
            self.wrapped, solve_operator, residuals, state.batch, state.columns, update_scaling, self._lr_per_param(),
            (self.momentum, settings["mu_rmsprop"]) if uses_momentum else None,
            undoable=settings["damping"] == "adaptive" or settings["variable_k"],
        )
        if settings["damping"] == "adaptive":
            update, report = self._adaptive_step(candidates, spectrum, mean_loss, settings)
        else:
            if settings["variable_k"]:
                spectrum = self._greedy_spectrum(candidates, spectrum, settings["damping"])
            update = candidates.update(spectrum, settings["damping"])
            if not bool(torch.isfinite(update).all()):
                return self._skip("the solver returned a non-finite direction", state.losses)
            candidates.apply(update)
            report = {"damping": settings["damping"], "tries": 1, "accepted": True}
        if update_scaling is not None and update is not None:
            square_avg = update_scaling.square_avg
        self._commit(square_avg, update if uses_momentum else None)
        self.last_step = StepReport({
            "skipped": False,
            "svd_mode": mode,
            "solver_note": solver_note,
            "rank_kept": spectrum.rank_kept,
            "step_norm": 0.0 if update is None else candidates.step_norm(update),
            "mean_loss": mean_loss,
            "solve_time": solve_time,
            "step_time": time.perf_counter() - started,
            **report,
        }, spectrum)
        if self.track_svd_info:
            self.svd_history.append({"step": self.step_count, "rank_kept": spectrum.rank_kept,
                                     **spectrum_entries(spectrum), "singular_values": spectrum.sigma_all.cpu()})
        return state.losses

    def _commit(self, square_avg: Tensor | None, momentum: Tensor | None) -> None:
        """Store the buffers of a step that was taken (momentum only when an update was applied)."""
        self.step_count += 1
        if square_avg is not None:
            self.square_avg = square_avg
        if momentum is not None:
            self.momentum = momentum

    def _gradient_scale(
        self, operator: JacobianOperator, columns: Tensor | None, settings: dict[str, Any]
    ) -> tuple[Tensor | None, Tensor | None]:
        """RMSProp pre-scaling: (new flat running average (P,), column scale D (n,)), else (None, None).

        The averaged statistic is the squared mean Jacobian row g = Mᵀ1 / G (n,), the gradient of
        mean(r) (of the mean loss when kappa = 2), as in the paper's code.
        """
        if not settings["use_rmsprop"] or settings["rmsprop_post"]:
            return None, None
        ones = torch.ones(operator.shape[0], dtype=BUFFER_DTYPE, device=self.wrapped.device)
        gradient = operator.rmatmul(ones).to(BUFFER_DTYPE) / operator.shape[0]
        buffer = self._square_avg_buffer()
        current = buffer if columns is None else buffer[columns]
        updated = updated_square_average(current, gradient, settings["alpha_rmsprop"])
        new_buffer = updated if columns is None else buffer.index_copy(0, columns, updated)
        return new_buffer, column_scale(updated, settings["eps_rmsprop"])

    def _update_scaling(self, columns: Tensor | None, settings: dict[str, Any]) -> UpdateScaling | None:
        """RMSProp post-scaling of each candidate direction by its running RMS, else None."""
        if not (settings["use_rmsprop"] and settings["rmsprop_post"]):
            return None
        return UpdateScaling(self._square_avg_buffer(), columns, settings["alpha_rmsprop"], settings["eps_rmsprop"])

    def _square_avg_buffer(self) -> Tensor:
        """The flat RMSProp running average (P,) float64; zeros before the first step."""
        if self.square_avg is not None:
            return self.square_avg
        return torch.zeros(self.wrapped.params.size, dtype=BUFFER_DTYPE, device=self.wrapped.device)

    def _solve(self, operator: JacobianOperator, settings: dict[str, Any]) -> tuple[Spectrum | None, str, str | None]:
        """(spectrum, solver used, note); an eigensolver failure falls back to the float64 SVD of M ("torch")."""
        mode = resolve_mode(settings["svd_mode"], operator.shape, settings["rtol"])
        solve: Callable[[str], Spectrum] = lambda name: truncated_spectrum(  # noqa: E731
            operator, name, settings["k"], settings["rtol"],
            SolverOptions(settings["oversampling"], settings["power_iterations"]),
        )
        try:
            return solve(mode), mode, None
        except torch.linalg.LinAlgError as error:
            failure = f"svd_mode {mode!r} failed ({str(error).splitlines()[0]})"
        if mode == "torch":
            return None, mode, failure
        try:
            spectrum = solve("torch")
        except torch.linalg.LinAlgError as error:
            return None, "torch", f"{failure} and its float64 SVD fallback failed too ({str(error).splitlines()[0]})"
        note = f"{failure}; fell back to the float64 SVD of M (svd_mode 'torch')"
        warnings.warn(f"Sven: {note}", RuntimeWarning, stacklevel=4)
        return spectrum, "torch", note

    def _lr_per_param(self) -> list[float]:
        """lr of each wrapped parameter's group, in ParamSpace order."""
        lr_of = {id(p): group["lr"] for group in self.param_groups for p in group["params"]}
        return [lr_of[id(p)] for p in self.wrapped.params.tensors]

    def _adaptive_step(self, candidates: CandidateSteps, spectrum: Spectrum, mean_loss: float,
                       settings: dict[str, Any]) -> tuple[Tensor | None, dict[str, Any]]:
        """Try λ, 10λ, … from one spectrum until the batch loss falls; (applied update or None, report)."""
        tried: list[Tensor] = []

        def try_step(damping: float) -> bool:
            tried.append(candidates.update(spectrum, damping))
            if bool(torch.isfinite(tried[-1]).all()) and candidates.loss_after(tried[-1]) < mean_loss:
                return True
            candidates.undo()
            return False

        outcome = search_damping(_schedule(settings), self.current_damping, try_step)
        self.current_damping = outcome.next_damping
        report = {"damping": outcome.damping_used, "tries": outcome.tries, "accepted": outcome.accepted,
                  "next_damping": outcome.next_damping}
        return (tried[-1] if outcome.accepted else None), report

    @staticmethod
    def _greedy_spectrum(candidates: CandidateSteps, spectrum: Spectrum, damping: float) -> Spectrum:
        """``spectrum`` cut to the rank ``greedy_rank`` picks (one forward pass per rank tried)."""

        def loss_with_rank(rank: int) -> float:
            loss = candidates.loss_after(candidates.update(leading(spectrum, rank), damping))
            candidates.undo()
            return loss

        return leading(spectrum, greedy_rank(spectrum, loss_with_rank))


def _schedule(settings: dict[str, Any]) -> DampingSchedule:
    return DampingSchedule(settings["damping_increase"], settings["damping_decrease"], settings["damping_min"],
                           settings["damping_max"], settings["max_tries"])


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
        unsupported = sorted(set(group) - {"params", "lr"})
        if unsupported:
            raise ValueError(
                f"a param group may only set 'lr' (one pseudoinverse couples all parameters); got {unsupported}"
            )
        if "lr" in group and not group["lr"] >= 0:
            raise ValueError(f"a param group's lr must be >= 0; got {group['lr']}")
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
