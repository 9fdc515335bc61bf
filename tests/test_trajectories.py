"""Regression: 3-step float64 trajectories of many option sets, recorded before the optimizer was recomposed.

``tests/data/trajectories.json`` holds, for each option set, the flat parameters after each of
three steps as the optimizer computed them before its options and step were split into parts.
The recomposed optimizer must reproduce them under the old option names (with a
DeprecationWarning) and under the new ones. The problems are small and well conditioned
(M is 8 × 80 with σ_min/σ_max ≈ 0.1): every route is backward stable, so two correct
implementations that order float64 operations differently agree to a few hundred ε relative
on the step, and three steps keep that — 1e-12 leaves a factor ≥ 10 over that and fails
on any real change of the algorithm. Regenerate (only on purpose) with
``python tests/test_trajectories.py``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import flat_parameters, make_batch, make_mlp, per_sample_mse

from sven.nn import SvenWrapper
from sven.opt import Sven

DATA = Path(__file__).parent / "data" / "trajectories.json"
STEPS = 3
TOLERANCE = 1e-12
SIZES = [3, 6, 6, 2]

OPTION_SETS: dict[str, dict[str, dict[str, Any]]] = {
    "plain": dict(wrapper={}, optimizer=dict(lr=0.5, k=8, rtol=1e-3)),
    "kappa1_microbatches": dict(wrapper=dict(kappa=1.0, microbatch_size=3), optimizer=dict(lr=0.5, k=8)),
    "fixed_damping": dict(wrapper={}, optimizer=dict(lr=0.5, k=8, damping=1e-2)),
    "adaptive_damping": dict(wrapper=dict(kappa=1.0), optimizer=dict(lr=1.0, k=8, damping="adaptive",
                                                                    damping_init=1e-3)),
    "rmsprop_pre": dict(wrapper={}, optimizer=dict(lr=0.2, k=8, use_rmsprop=True, alpha_rmsprop=0.9,
                                                   eps_rmsprop=1e-3)),
    "rmsprop_post": dict(wrapper={}, optimizer=dict(lr=0.2, k=8, use_rmsprop=True, rmsprop_post=True,
                                                    alpha_rmsprop=0.9, eps_rmsprop=1e-3)),
    "momentum": dict(wrapper={}, optimizer=dict(lr=0.3, k=8, mu_rmsprop=0.5)),
    "variable_k": dict(wrapper={}, optimizer=dict(lr=0.5, k=8, variable_k=True)),
    "k_below_rank": dict(wrapper={}, optimizer=dict(lr=0.5, k=4)),
    "functorch_param_fraction": dict(wrapper=dict(param_fraction=0.5, engine="functorch"),
                                     optimizer=dict(lr=0.5, k=8, mu_rmsprop=0.5)),
    **{f"svd_mode_{mode}": dict(wrapper={}, optimizer=dict(lr=0.5, k=k, svd_mode=mode))
       for mode, k in [("torch", 8), ("gram", 8), ("randomized", 8), ("randomized_v2", 8), ("scipy", 3),
                       ("lobpcg", 2)]},
    "svd_mode_auto_tiny_rtol": dict(wrapper={}, optimizer=dict(lr=0.5, k=8, rtol=1e-9)),
}
"""Option sets under the names the optimizer had when the trajectories were recorded."""


def trajectory(option_set: dict[str, dict[str, Any]]) -> list[list[float]]:
    """Flat parameters (P,) after each of ``STEPS`` steps, on a fixed model and three fixed batches."""
    model = make_mlp(SIZES, torch.float64, seed=3)
    torch.manual_seed(11)
    wrapped = SvenWrapper(model, per_sample_mse, **option_set["wrapper"])
    optimizer = Sven(wrapped, **option_set["optimizer"])
    states = []
    for step in range(STEPS):
        wrapped.loss_and_grad(make_batch(8, SIZES[0], SIZES[-1], torch.float64, seed=20 + step))
        optimizer.step()
        states.append(flat_parameters(model).tolist())
    return states


def recorded() -> dict[str, list[list[float]]]:
    return json.loads(DATA.read_text())


@pytest.mark.parametrize("name", OPTION_SETS)
def test_old_option_names_reproduce_the_recorded_trajectory(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        actual = torch.tensor(trajectory(OPTION_SETS[name]), dtype=torch.float64)
    expected = torch.tensor(recorded()[name], dtype=torch.float64)
    start = flat_parameters(make_mlp(SIZES, torch.float64, seed=3))
    for step in range(STEPS):
        moved = (expected[step] - start).norm()
        error = (actual[step] - expected[step]).norm() / moved
        assert error <= TOLERANCE, f"{name}: step {step + 1} differs by {float(error):.2e} of the distance moved"


NEW_NAMES = {"mu_rmsprop": "momentum", "alpha_rmsprop": "rmsprop_alpha", "eps_rmsprop": "rmsprop_eps"}


def with_new_names(options: dict[str, Any]) -> dict[str, Any]:
    """The same options under the current names (rmsprop=None | "pre" | "post", momentum, rmsprop_alpha/eps)."""
    renamed = {NEW_NAMES.get(key, key): value for key, value in options.items()
               if key not in ("use_rmsprop", "rmsprop_post")}
    if options.get("use_rmsprop"):
        renamed["rmsprop"] = "post" if options.get("rmsprop_post") else "pre"
    return renamed


@pytest.mark.parametrize("name", [name for name, options in OPTION_SETS.items()
                                  if with_new_names(options["optimizer"]) != options["optimizer"]])
def test_new_option_names_take_bit_identical_steps_and_old_names_warn(name: str) -> None:
    old = OPTION_SETS[name]
    new = {"wrapper": old["wrapper"], "optimizer": with_new_names(old["optimizer"])}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new_trajectory = trajectory(new)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old_trajectory = trajectory(old)
    assert any(w.category is DeprecationWarning and "deprecated; use" in str(w.message) for w in caught)
    assert new_trajectory == old_trajectory


if __name__ == "__main__":
    DATA.parent.mkdir(exist_ok=True)
    DATA.write_text(json.dumps({name: trajectory(options) for name, options in OPTION_SETS.items()}, indent=0))
    print(f"wrote {DATA}")
