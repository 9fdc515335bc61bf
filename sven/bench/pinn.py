"""PINN benchmark: ``python -m sven.bench poisson2d|poisson2d-large|heat1d --budget SECONDS``.

Every optimizer trains, full batch, from the same initial weights and collocation points per seed
until its training clock (evaluation excluded) reaches the budget. Every ``EVAL_EVERY[optimizer]``
steps the history records wall_time, loss (interior mean of r² + boundary mean of r²), rms_error
and rel_l2_error of u against u* on the 9000 held-out points.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from sven.bench.optimizers import OptimizerUnavailable
from sven.bench.pinn_problems import PINN_PROBLEMS, CollocationData, PinnProblem
from sven.bench.pinn_steppers import PINN_OPTIMIZERS, batch_loss
from sven.bench.plots import group_runs, plot_curves
from sven.bench.results import command_line, environment, load_average, write_json
from sven.bench.tables import text_table

EVAL_EVERY = {"sven": 2, "sven-adaptive": 5, "sven-exact": 5, "sven-ls": 2, "adam": 200, "lbfgs": 2, "engd": 2, "lm": 5}
DEFAULT_PINN_OPTIMIZERS = ("sven", "adam")


@torch.no_grad()
def evaluate(problem_model: torch.nn.Module, data: CollocationData) -> dict[str, float]:
    """loss on the training batch, RMS and relative L2 error of u − u* on the held-out points."""
    error = problem_model.net(data.eval_x)[:, 0] - data.eval_u
    return {"loss": float(batch_loss(problem_model, data.batch)),
            "rms_error": float(error.square().mean().sqrt()),
            "rel_l2_error": float(error.norm() / data.eval_u.norm())}


def train_pinn(problem: PinnProblem, optimizer: str, seed: int, budget: float,
               max_steps: int | None = None) -> dict[str, Any]:
    """Train a fresh network (initialised from ``seed``) for ``budget`` seconds of training clock."""
    data = problem.data(seed)
    torch.manual_seed(seed)
    model = problem.build_model()
    stepper = PINN_OPTIMIZERS[optimizer](model, data.batch)
    every = EVAL_EVERY[optimizer]
    history: dict[str, list[float]] = {key: [] for key in ("step", "wall_time", "loss", "rms_error", "rel_l2_error")}

    def record(step: int, clock: float) -> bool:
        values = {"step": step, "wall_time": clock, **evaluate(model, data)}
        for key, value in values.items():
            history[key].append(value)
        return math.isfinite(values["loss"])

    clock, step, finite = 0.0, 0, record(0, 0.0)
    while finite and clock < budget and (max_steps is None or step < max_steps):
        started = time.perf_counter()
        stepper.step()
        clock += time.perf_counter() - started
        step += 1
        if step % every == 0 or clock >= budget or step == max_steps:
            finite = record(step, clock)
    return {"task": problem.name, "optimizer": optimizer, "label": optimizer, "seed": seed, "budget": budget,
            "eval_every": every, "steps": step, "diverged": not finite, "history": history}


def pinn_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sven.bench", description="PINN benchmark (Poisson, heat).")
    parser.add_argument("task", choices=list(PINN_PROBLEMS))
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds per run (default 60)")
    parser.add_argument("--optimizers", default=",".join(DEFAULT_PINN_OPTIMIZERS),
                        help=f"comma-separated subset of {','.join(PINN_OPTIMIZERS)}")
    parser.add_argument("--seeds", type=int, default=1, help="seeds FIRST..FIRST+N-1 (default 1)")
    parser.add_argument("--first-seed", type=int, default=0, help="FIRST (default 0)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for JSON and PNG")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--tag", default="", help="suffix of the result names (TASK-BUDGETs-TAG)")
    parser.add_argument("--no-progress", action="store_true", help="print nothing per run")
    return parser


def summary_rows(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per run: optimizer, seed, steps, training seconds, final loss, RMS and relative L2 error."""
    rows = [[run["optimizer"], str(run["seed"]), str(run["steps"]), f"{run['history']['wall_time'][-1]:.1f}",
             *(f"{run['history'][key][-1]:.2e}" for key in ("loss", "rms_error", "rel_l2_error"))] for run in runs]
    return ["optimizer", "seed", "steps", "seconds", "loss", "RMS error", "rel. L2 error"], rows


def run_pinn(argv: list[str]) -> Path:
    """Run the PINN study the arguments describe; write OUT/TASK-BUDGETs[-TAG].json and two error plots."""
    args = pinn_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    problem = PINN_PROBLEMS[args.task]()
    names = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    unknown = [name for name in names if name not in PINN_OPTIMIZERS]
    if unknown or not names:
        raise SystemExit(f"error: unknown optimizer(s) {unknown}; expected some of {','.join(PINN_OPTIMIZERS)}")
    name = "-".join(filter(None, (args.task, f"{args.budget:g}s", args.tag)))
    started, load_at_start = time.perf_counter(), load_average()
    runs, skipped = [], {}
    for optimizer in names:
        try:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                runs.append(train_pinn(problem, optimizer, seed, args.budget))
                if not args.no_progress:
                    print(text_table(*summary_rows(runs[-1:])))
        except OptimizerUnavailable as error:
            skipped[optimizer] = str(error)
            print(f"skipped {optimizer}: {error}")
    payload = {"name": name, "task": args.task, "study": "pinn", "options": {**vars(args), "out": str(args.out)},
               "layer_sizes": list(problem.sizes), "runs": runs, "skipped": skipped,
               "command": command_line(argv), "environment": environment("cpu"),
               "total_seconds": time.perf_counter() - started,
               "load_average": {"start": load_at_start, "end": load_average()}}
    path = args.out / f"{name}.json"
    write_json(path, payload)
    if runs:
        title = f"{args.task}: tanh {'→'.join(map(str, problem.sizes))}, {args.budget:g} s per run"
        for x in ("wall_time", "step"):
            plot_curves(group_runs(runs), args.out / f"{name}-error-vs-{x.replace('_', '-')}.png", title,
                        y="rms_error", xs=(x,))
        print(text_table(*summary_rows(runs)))
    print(f"wrote {path}")
    return path
