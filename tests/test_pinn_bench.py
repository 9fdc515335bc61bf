"""The PINN benchmark: problems, optimizers and the command line, on tiny budgets."""

from __future__ import annotations

import json

import pytest
import torch

from sven.bench.cli import main
from sven.bench.pinn import train_pinn
from sven.bench.pinn_problems import PINN_PROBLEMS
from sven.bench.pinn_steppers import PINN_OPTIMIZERS

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("task", ["poisson2d", "heat1d"])
def test_five_adaptive_sven_steps_lower_the_error(task: str) -> None:
    """Five steps (about a second on one core; the budget only guards a very slow machine)."""
    run = train_pinn(PINN_PROBLEMS[task](), "sven-adaptive", seed=0, budget=20.0, max_steps=5)
    history = run["history"]
    assert not run["diverged"] and history["step"] == [0, 5]
    assert history["rms_error"][-1] < 0.3 * history["rms_error"][0]
    assert history["rel_l2_error"][-1] < 0.3 * history["rel_l2_error"][0]
    assert history["loss"][-1] < 0.1 * history["loss"][0]


def test_sven_with_its_line_search_reaches_a_small_error_in_sixty_steps() -> None:
    """The bench's Sven (undamped, rtol 1e-8, backtracking on lr): 1e-7 after 52 steps, about 5 s on one core."""
    run = train_pinn(PINN_PROBLEMS["poisson2d"](), "sven", seed=0, budget=60.0, max_steps=60)
    assert not run["diverged"] and run["history"]["rms_error"][-1] < 1e-6


@pytest.mark.parametrize("optimizer", ["engd", "lbfgs", "adam", "sven-adaptive", "sven-exact", "sven-ls"])
def test_every_optimizer_steps(optimizer: str) -> None:
    run = train_pinn(PINN_PROBLEMS["poisson2d"](), optimizer, seed=0, budget=60.0, max_steps=4)
    assert run["steps"] == 4 and len(run["history"]["loss"]) >= 2


def test_collocation_data_follow_the_protocol() -> None:
    data = PINN_PROBLEMS["heat1d"]().data(seed=3)
    x, target, weight, on_boundary = data.batch
    assert x.shape == (1020, 2) and int(on_boundary.sum()) == 120 and data.eval_x.shape == (9000, 2)
    edge = x[on_boundary]
    assert bool(((edge[:, 0] == 0) | (edge[:, 1] == 0) | (edge[:, 1] == 1)).all())
    assert torch.allclose(target[on_boundary], torch.where(edge[:, 0] == 0, torch.sin(torch.pi * edge[:, 1]),
                                                           torch.zeros_like(edge[:, 0])))
    assert float(weight[~on_boundary].sum()) == pytest.approx(1020) == float(weight[on_boundary].sum())
    assert torch.equal(PINN_PROBLEMS["heat1d"]().data(seed=3).batch[0], x)


def test_command_line_writes_json_and_plots(tmp_path, capsys) -> None:
    main(["poisson2d", "--budget", "0.5", "--optimizers", "sven,adam", "--out", str(tmp_path), "--no-progress"])
    payload = json.loads((tmp_path / "poisson2d-0.5s.json").read_text())
    assert [run["optimizer"] for run in payload["runs"]] == ["sven", "adam"]
    assert set(payload["runs"][0]["history"]) == {"step", "wall_time", "loss", "rms_error", "rel_l2_error"}
    assert (tmp_path / "poisson2d-0.5s-error-vs-wall-time.png").is_file()
    assert (tmp_path / "poisson2d-0.5s-error-vs-step.png").is_file()
    assert "RMS error" in capsys.readouterr().out


def test_unknown_optimizer_is_refused() -> None:
    with pytest.raises(SystemExit, match="unknown optimizer"):
        main(["heat1d", "--optimizers", "sven,nope"])
    assert "lm" in PINN_OPTIMIZERS
