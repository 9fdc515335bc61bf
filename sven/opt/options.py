"""The settings of one Sven step: one frozen, validated description of every option.

``GroupSettings`` holds what may differ between param groups (lr, weight_decay,
decoupled_weight_decay); ``StepSettings`` everything the one pseudoinverse shares. Each
option is listed once (name, default, check). ``Sven`` stores both in every param group
(torch's ``defaults``), so schedulers and ``state_dict`` see them, and rebuilds them from
the groups at each step, which re-validates whatever a user wrote into ``param_groups``.
Deprecated spellings are translated by ``translate_deprecated``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from functools import cache, cached_property
from typing import TYPE_CHECKING, Any, Literal

from sven.opt.damping import DampingSchedule
from sven.opt.pinv import SVD_MODES, SolverOptions

if TYPE_CHECKING:
    from typing_extensions import Self

RMSPROP_MODES = (None, "pre", "post")

DEPRECATED_NAMES = {
    "mu_rmsprop": "momentum",
    "alpha_rmsprop": "rmsprop_alpha",
    "eps_rmsprop": "rmsprop_eps",
}
"""Old option name → new name, for options that only changed their name."""


class ParamGroupFields:
    """Settings stored field by field in torch's param groups."""

    @classmethod
    @cache
    def names(cls) -> tuple[str, ...]:
        """The field names, in order (computed once per class: ``Sven.settings`` reads them at every step)."""
        return tuple(field.name for field in fields(cls))

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> Self:
        """The settings a param group holds (validated again: users may edit param_groups)."""
        return cls(**{name: group[name] for name in cls.names()})


@dataclass(frozen=True)
class GroupSettings(ParamGroupFields):
    """The options one param group may set for its own parameters.

    Attributes:
        lr: step scale (≥ 0).
        weight_decay: λ_g ≥ 0, the coupled decay λ_g‖θ_g + d_g‖² in the step's objective.
        decoupled_weight_decay: λ_dec ≥ 0, θ ← θ + lr·d − lr·λ_dec·θ (AdamW's decoupled decay).
    """

    lr: float = 0.1
    weight_decay: float = 0.0
    decoupled_weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for name in self.names():
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0; got {value!r}")



@dataclass(frozen=True)
class StepSettings(ParamGroupFields):
    """Every option of a Sven step but ``lr`` (which may differ per param group).

    Attributes:
        k: maximal number of singular values kept (≥ 1).
        rtol: relative cut on σ / σ_max (≥ 0).
        svd_mode: one of ``sven.opt.pinv.SVD_MODES``.
        oversampling, power_iterations: for the randomized modes (≥ 0).
        gram_memory: bytes three (rows × rows) float64 matrices may take (the Gram matrix, its shifted copy, its
            Cholesky factor);
            past it a damped full-rank step is solved matrix-free (``sven.opt.matrix_free``).
        damping: λ ≥ 0 (each kept σ filtered as σ/(σ² + λ)) or "adaptive".
        damping_init, damping_increase, damping_decrease, damping_min, damping_max, max_tries:
            the adaptive schedule (see ``sven.opt.damping``).
        rmsprop: None, "pre" (step (M D)⁺ r with RMSProp column scales D) or "post"
            (the update divided by its own running RMS).
        rmsprop_alpha, rmsprop_eps: RMSProp's averaging factor in [0, 1) and ε > 0.
        momentum: heavy-ball factor μ in [0, 1) on the update (0: off).
        variable_k: greedy rank search on the batch loss.
        line_search: backtracking on lr: the update scaled by 1, ½, ¼, … (at most ``max_tries``
            tries, one spectrum) until the batch loss falls; the first such scale is kept.
        fisher_decay: λ_F ≥ 0, the ridge λ_F‖M(θ + d)‖² in the step's objective.
        relative: weight_decay and a fixed damping in units of σ_max² of M Mᵀ at each step.
    """

    k: int = 64
    rtol: float = 1e-3
    svd_mode: str = "auto"
    oversampling: int = 5
    power_iterations: int = 1
    gram_memory: int = 2**29
    damping: float | Literal["adaptive"] = 0.0
    damping_init: float = 1e-3
    damping_increase: float = 10.0
    damping_decrease: float = 0.1
    damping_min: float = 1e-10
    damping_max: float = 1e10
    max_tries: int = 10
    rmsprop: Literal["pre", "post"] | None = None
    rmsprop_alpha: float = 0.99
    rmsprop_eps: float = 1e-8
    momentum: float = 0.0
    variable_k: bool = False
    line_search: bool = False
    fisher_decay: float = 0.0
    relative: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.k, int) and self.k >= 1):
            raise ValueError(f"k must be an integer >= 1; got {self.k!r}")
        if not self.rtol >= 0:
            raise ValueError(f"rtol must be >= 0; got {self.rtol}")
        if self.svd_mode not in SVD_MODES:
            raise ValueError(f"unknown svd_mode {self.svd_mode!r}; expected one of {', '.join(SVD_MODES)}")
        if self.oversampling < 0 or self.power_iterations < 0:
            raise ValueError(
                f"oversampling and power_iterations must be >= 0; got {self.oversampling}, {self.power_iterations}"
            )
        if not (isinstance(self.gram_memory, int) and self.gram_memory >= 0):
            raise ValueError(f"gram_memory must be an integer number of bytes >= 0; got {self.gram_memory!r}")
        if self.svd_mode == "cg" and self.variable_k:
            raise ValueError("svd_mode 'cg' solves the full system without a spectrum; variable_k needs one")
        if not (self.adaptive or (isinstance(self.damping, (int, float)) and self.damping >= 0)):
            raise ValueError(f"damping must be a number >= 0 or 'adaptive'; got {self.damping!r}")
        if self.adaptive and self.variable_k:
            raise ValueError("variable_k and damping='adaptive' both search the step on the batch loss; pick one")
        if not isinstance(self.line_search, bool):
            raise ValueError(f"line_search must be True or False; got {self.line_search!r}")
        if self.line_search and (self.adaptive or self.variable_k):
            raise ValueError("line_search, variable_k and damping='adaptive' each search the step on the batch loss; "
                             "pick one")
        if not self.damping_init > 0:
            raise ValueError(f"damping_init must be > 0; got {self.damping_init}")
        self.schedule  # noqa: B018 (building the schedule validates its fields)
        if self.rmsprop not in RMSPROP_MODES:
            raise ValueError(f"rmsprop must be one of {RMSPROP_MODES}; got {self.rmsprop!r}")
        if not 0 <= self.rmsprop_alpha < 1:
            raise ValueError(f"rmsprop_alpha must be in [0, 1); got {self.rmsprop_alpha}")
        if not self.rmsprop_eps > 0:
            raise ValueError(f"rmsprop_eps must be > 0; got {self.rmsprop_eps}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {self.momentum}")
        if not self.fisher_decay >= 0:
            raise ValueError(f"fisher_decay must be >= 0; got {self.fisher_decay}")
        if not isinstance(self.relative, bool):
            raise ValueError(f"relative must be True or False; got {self.relative!r}")
        if self.relative and self.adaptive:
            raise ValueError("relative=True sets weight_decay and a fixed damping in units of σ_max²; "
                             "damping='adaptive' searches λ itself: pick one")

    @property
    def adaptive(self) -> bool:
        """Whether λ is searched on the batch loss (``damping="adaptive"``)."""
        return self.damping == "adaptive"

    @property
    def searches(self) -> bool:
        """Whether the step tries candidates on the batch loss (and so must be able to undo them)."""
        return self.adaptive or self.variable_k or self.line_search

    @property
    def fixed_damping(self) -> float:
        """λ of a non-adaptive step."""
        return 0.0 if self.adaptive else float(self.damping)

    @cached_property
    def schedule(self) -> DampingSchedule:
        """The adaptive λ schedule, validated and built once per settings (``Sven.settings`` keeps them)."""
        return DampingSchedule(self.damping_increase, self.damping_decrease, self.damping_min, self.damping_max,
                               self.max_tries)

    @cached_property
    def solver_options(self) -> SolverOptions:
        """The solvers' options, built once per settings."""
        return SolverOptions(self.oversampling, self.power_iterations, self.gram_memory)



def translate_deprecated(options: dict[str, Any], stacklevel: int = 3) -> dict[str, Any]:
    """``options`` with deprecated names replaced by the current ones, each with a DeprecationWarning.

    ``use_rmsprop`` / ``rmsprop_post`` become ``rmsprop=None | "pre" | "post"``; ``mu_rmsprop``,
    ``alpha_rmsprop`` and ``eps_rmsprop`` become ``momentum``, ``rmsprop_alpha``, ``rmsprop_eps``.
    """
    options = dict(options)
    for old, new in DEPRECATED_NAMES.items():
        if old in options:
            if new in options:
                raise ValueError(f"got both {old!r} (deprecated) and {new!r}; pass only {new!r}")
            warnings.warn(f"Sven option {old!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=stacklevel)
            options[new] = options.pop(old)
    if "use_rmsprop" in options or "rmsprop_post" in options:
        if "rmsprop" in options:
            raise ValueError("got both use_rmsprop/rmsprop_post (deprecated) and rmsprop; pass only rmsprop")
        use, post = bool(options.pop("use_rmsprop", False)), bool(options.pop("rmsprop_post", False))
        if post and not use:
            raise ValueError("rmsprop_post=True chooses where the RMSProp scaling acts; it needs use_rmsprop=True")
        options["rmsprop"] = ("post" if post else "pre") if use else None
        warnings.warn(f"Sven options 'use_rmsprop'/'rmsprop_post' are deprecated; use rmsprop={options['rmsprop']!r}",
                      DeprecationWarning, stacklevel=stacklevel)
    return options


def settings_from_options(options: dict[str, Any]) -> tuple[GroupSettings, StepSettings]:
    """Validated default group settings and step settings from keyword options (current names).

    Unknown names are a TypeError listing the valid ones.
    """
    known = (*GroupSettings.names(), *StepSettings.names())
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"Sven got unknown option(s) {unknown}; expected params, track_svd_info or one of "
                        f"{', '.join(known)}")
    group = GroupSettings(**{name: options[name] for name in GroupSettings.names() if name in options})
    return group, StepSettings(**{name: options[name] for name in StepSettings.names() if name in options})


def check_regularized_combination(step: StepSettings, groups: list[GroupSettings]) -> None:
    """Refuse options that the exact regularised solve (any weight_decay or fisher_decay > 0) cannot combine with."""
    if not (step.fisher_decay > 0 or any(group.weight_decay > 0 for group in groups)):
        return
    if step.rmsprop == "pre":
        raise ValueError("weight_decay / fisher_decay solve the regularised problem in the parameters themselves; "
                         "rmsprop='pre' rescales the columns of M (another problem): use rmsprop='post' or None")
    if step.variable_k:
        raise ValueError("weight_decay / fisher_decay take the exact minimiser over the full spectrum; "
                         "variable_k cuts the spectrum by rank: pick one")
