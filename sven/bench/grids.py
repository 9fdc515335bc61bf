"""Every hyper-parameter the benchmark uses, in one place: default settings, search grids and study sweeps.

Keys are optimizer names, optionally suffixed ``:cross_entropy`` for settings that
apply to the cross-entropy tasks only. The Sven variants:

- "sven": the paper's exact step (kappa = 2: the losses themselves are the residuals);
- "sven-gn": kappa = 1, the Gauss–Newton residuals r = l^(1/2), no damping;
- "sven-gn-fixed": kappa = 1 with a fixed Tikhonov damping λ, the Levenberg–Marquardt step in kernel form;
- "sven-damped" (kappa = 2) and "sven-gn-damped" (kappa = 1): Levenberg–Marquardt control of λ
  (``damping="adaptive"``);
- "sven-rmsprop": the paper's cross-entropy step, the exact step on RMSProp-scaled columns (``rmsprop="pre"``)
  with a large lr; its default lr is the best of RMSPROP_LR_STUDY on mnist-ce (seed 0, 2 epochs).

``kappa`` is a setting of ``SvenWrapper``; the benchmark's Sven stepper routes it there.
The regression defaults of "sven" and "sven-damped" are the demo's, chosen by the ``demo`` study (DEMO_STUDY):
"sven" backtracks on lr (``line_search``: the exact direction scaled by 1, ½, ¼, … until the batch loss falls).
The cross-entropy grid of "sven" and the grid of "sven-rmsprop" are the paper's (PAPER_CROSS_ENTROPY_GRID:
RMSProp-scaled, large lr); without a grid search the cross-entropy default of "sven" is the plain exact step
with a small lr.
The strings "B", "B/2", "B/4" and "B*x" stand for the batch size of the task, its half, its quarter and x times it.
"""

from __future__ import annotations

import itertools
from typing import Any

FIXED_DAMPING = (0.1, 1.0, 10.0)
RMSPROP_LR = 100.0
"""The default lr of "sven-rmsprop": the best of RMSPROP_LR_STUDY on mnist-ce (docs/RESULTS.md, mnist-ce-rmsprop_lr)."""
LM_START = "B*0.001"
"""B × the starting λ of torch-levenberg-marquardt (1e-3): Sven's λ is B × LM's, so both take the same first step."""

PAPER_CROSS_ENTROPY_GRID: dict[str, tuple[Any, ...]] = {
    "lr": (1.0, 10.0, 50.0, 100.0), "k": (1, 2, 4, 8, 16, 32, "B/2", "B"), "rtol": (1e-4, 1e-3, 1e-2),
    "rmsprop": ("pre",),
}

HYPERPARAMETERS: dict[str, dict[str, dict[str, Any]]] = {
    "sven": {
        "default": {"lr": 0.5, "k": "B/2", "rtol": 1e-3, "line_search": True},
        "grid": {"lr": (0.05, 0.1, 0.5, 1.0), "k": (1, 2, 4, 8, 16, 32, "B/2", "B"), "rtol": (1e-4, 1e-3, 1e-2)},
    },
    "sven:cross_entropy": {
        "default": {"lr": 0.1, "k": "B", "rtol": 1e-3},
        "grid": PAPER_CROSS_ENTROPY_GRID,
    },
    "sven-rmsprop": {
        "default": {"lr": RMSPROP_LR, "k": "B", "rtol": 1e-3, "rmsprop": "pre"},
        "grid": PAPER_CROSS_ENTROPY_GRID,
    },
    "sven-gn": {
        "default": {"lr": 0.1, "k": "B", "rtol": 1e-3, "kappa": 1},
        "grid": {"lr": (0.05, 0.1, 0.5), "k": (16, "B"), "rtol": (1e-4, 1e-3, 1e-2), "kappa": (1,)},
    },
    "sven-gn-fixed": {
        "default": {"lr": 1.0, "k": "B", "rtol": 1e-3, "kappa": 1, "damping": FIXED_DAMPING[1]},
        "grid": {"lr": (0.5, 1.0), "k": ("B",), "rtol": (1e-3,), "kappa": (1,), "damping": FIXED_DAMPING},
    },
    "sven-damped": {
        "default": {"lr": 0.5, "k": "B/2", "rtol": 1e-4, "damping": "adaptive", "damping_init": 1e-3},
        "grid": {"lr": (0.5, 1.0), "k": (16, 32, "B/2", "B"), "rtol": (1e-4, 1e-3, 1e-2), "damping": ("adaptive",)},
    },
    "sven-gn-damped": {
        "default": {"lr": 1.0, "k": "B", "rtol": 1e-3, "kappa": 1, "damping": "adaptive", "damping_init": LM_START},
        "grid": {"lr": (0.5, 1.0), "k": ("B",), "rtol": (0.0, 1e-4, 1e-3), "kappa": (1,), "damping": ("adaptive",),
                 "damping_init": (LM_START,)},
    },
    "adam": {"default": {"lr": 1e-3}, "grid": {"lr": (1e-4, 1e-3, 1e-2, 1e-1)}},
    "sgd": {"default": {"lr": 1e-2}, "grid": {"lr": (1e-4, 1e-3, 1e-2, 1e-1)}},
    "rmsprop": {"default": {"lr": 1e-3}, "grid": {"lr": (1e-4, 1e-3, 1e-2, 1e-1)}},
    "lbfgs": {
        "default": {"lr": 1.0, "max_iter": 5, "history_size": 10},
        "grid": {"lr": (1.0,), "max_iter": (2, 5, 10), "history_size": (2, 5, 10)},
    },
    "polyak": {"default": {"f_star": 0.0, "max_lr": 1.0}, "grid": {"f_star": (0.0,), "max_lr": (1.0,)}},
    "lm": {"default": {}, "grid": {"learning_rate": (0.1, 0.5, 1.0)}},
}

STUDY_SWEEPS: dict[str, tuple[Any, ...]] = {
    "k": (1, 2, 4, 8, 16, 32, "B/2", "B"),
    "rtol": (1e-4, 1e-3, 1e-2, 1e-1),
    "microbatch_size": (1, 2, 4, 8),
    "param_fraction": (0.25, 0.5, 0.75, 1.0),
}


def _entry(optimizer: str, loss_kind: str) -> dict[str, dict[str, Any]]:
    key = f"{optimizer}:{loss_kind}"
    if key in HYPERPARAMETERS:
        return HYPERPARAMETERS[key]
    if optimizer not in HYPERPARAMETERS:
        names = sorted({name.split(":")[0] for name in HYPERPARAMETERS})
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(names)}")
    return HYPERPARAMETERS[optimizer]


def resolve(value: Any, batch_size: int) -> Any:
    """``value`` with "B", "B/2", "B/4" and "B*x" replaced by the batch size, its half, its quarter and x times it."""
    if not isinstance(value, str):
        return value
    if value.startswith("B*"):
        return batch_size * float(value[2:])
    return {"B": batch_size, "B/2": max(1, batch_size // 2), "B/4": max(1, batch_size // 4)}.get(value, value)


def entry_settings(optimizer: str, overrides: dict[str, Any], loss_kind: str, batch_size: int) -> dict[str, Any]:
    """The defaults of ``optimizer`` with ``overrides`` (batch-size strings resolved) on top."""
    resolved = {name: resolve(value, batch_size) for name, value in overrides.items()}
    return {**default_settings(optimizer, loss_kind, batch_size), **resolved}


def default_settings(optimizer: str, loss_kind: str, batch_size: int) -> dict[str, Any]:
    """The default hyper-parameters of ``optimizer`` for a task with this loss kind and batch size."""
    return {name: resolve(value, batch_size) for name, value in _entry(optimizer, loss_kind)["default"].items()}


def grid_settings(optimizer: str, loss_kind: str, batch_size: int) -> list[dict[str, Any]]:
    """Every configuration of the search grid (duplicates from "B"/"B/2" removed), in a fixed order."""
    grid = _entry(optimizer, loss_kind)["grid"]
    axes = {name: list(dict.fromkeys(resolve(value, batch_size) for value in values)) for name, values in grid.items()}
    return [dict(zip(axes, combination)) for combination in itertools.product(*axes.values())]


def sweep_values(parameter: str, batch_size: int) -> list[Any]:
    """The values a study sweeps ``parameter`` over (duplicates removed)."""
    if parameter not in STUDY_SWEEPS:
        raise ValueError(f"no sweep for {parameter!r}; expected one of {', '.join(STUDY_SWEEPS)}")
    return list(dict.fromkeys(resolve(value, batch_size) for value in STUDY_SWEEPS[parameter]))


LM_STUDY: tuple[tuple[str, dict[str, Any]], ...] = (
    ("sven", {}),
    ("sven-gn", {}),
    *(("sven-gn-fixed", {"damping": value}) for value in FIXED_DAMPING),
    ("sven-gn-fixed", {"rtol": 0.0}),
    ("sven-damped", {}),
    ("sven-damped", {"rtol": 0.0}),
    ("sven-gn-damped", {}),
    ("sven-gn-damped", {"rtol": 0.0}),
    ("lm", {}),
    ("adam", {"lr": 1e-3}),
    ("adam", {"lr": 1e-2}),
    ("lbfgs", {}),
)
"""The ``lm`` study: (optimizer, settings overriding its defaults) per entry. The damped Sven variants
also run without the rtol cut (rtol = 0): λ then regularises the small singular values on its own. Adam runs at
lr = 1e-3 (the time reference of the bar) and at lr = 1e-2, the best of its grid on toy1d-compare and
poly-compare."""
LM_REFERENCE = "lm"
TIME_REFERENCE = "adam lr=0.001"

DEMO_STUDY: tuple[tuple[str, dict[str, Any]], ...] = (
    ("adam", {}),
    ("sven", {"lr": 0.1, "k": "B", "rtol": 1e-3, "line_search": False}),
    ("sven", {"lr": 0.05, "k": "B", "rtol": 1e-3, "line_search": False}),
    ("sven", {"lr": 0.05, "k": "B/2", "rtol": 1e-3, "line_search": False}),
    ("sven", {"lr": 0.05, "k": "B/2", "rtol": 1e-2, "line_search": False}),
    ("sven", {"lr": 0.1, "k": "B/4", "rtol": 1e-3, "line_search": False}),
    ("sven", {"lr": 0.075, "k": "B/2", "rtol": 1e-3, "line_search": False}),
    ("sven", {"lr": 0.05, "k": "B/2", "rtol": 3e-4, "line_search": False}),
    ("sven", {"lr": 0.5, "k": "B/2", "rtol": 1e-3, "line_search": True}),
    ("sven", {"lr": 1.0, "k": "B/2", "rtol": 1e-3, "line_search": True}),
    ("sven-damped", {"lr": 1.0, "k": "B", "rtol": 1e-3, "damping_init": 1e-3}),
    ("sven-damped", {"lr": 1.0, "k": "B", "rtol": 1e-4, "damping_init": 1e-3}),
    ("sven-damped", {"lr": 1.0, "k": "B", "rtol": 1e-4, "damping_init": "B*0.001"}),
    ("sven-damped", {"lr": 0.5, "k": "B/2", "rtol": 1e-4, "damping_init": 1e-3}),
)
"""The ``demo`` study: the settings tried for the demo's ``sven`` and ``sven-damped`` on toy1d against its Adam, per
entry (optimizer, settings overriding its defaults). The first entry of each Sven variant is the first default; the
``sven`` entries run before the default turned ``line_search`` on say it is off (their labels do not name a switch
that is off: ``studies.switched_on``)."""
DEMO_REFERENCE = "adam"

RMSPROP_LR_STUDY: tuple[tuple[str, dict[str, Any]], ...] = tuple(
    ("sven-rmsprop", {"lr": lr}) for lr in PAPER_CROSS_ENTROPY_GRID["lr"]
)
"""The ``rmsprop_lr`` study: "sven-rmsprop" (k = B, rtol = 1e-3) at each lr of the paper's cross-entropy grid; the
best sets RMSPROP_LR."""
