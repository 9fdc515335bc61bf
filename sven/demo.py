"""``make demo``: Sven vs Adam on the paper's 1-D regression, y = exp(−10x²)·sin(2x).

Trains the toy1d task of the benchmark (MLP 1→16→16→16→1 GELU, B = 32, 10k train /
10k validation samples) with Sven (the paper's exact step, backtracking on lr, and
with adaptive Levenberg–Marquardt damping) and with Adam(lr=1e-3), each with its default settings
(``sven.bench.grids``; docs/RESULTS.md gives the study behind them), prints the final
validation MSE and wall time of each and writes ``OUT/demo_validation_loss.png`` and
``OUT/demo_results.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from sven.bench.grids import default_settings
from sven.bench.plots import plot_curves
from sven.bench.results import write_json
from sven.bench.tasks import build_task
from sven.bench.timing import final_val_loss, time_to_target
from sven.bench.train import train

DEMO_OPTIMIZERS = ("sven", "sven-damped", "adam")
REFERENCE = "adam"


def summary(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per optimizer: final validation MSE, training seconds and training seconds until its validation MSE first
    reaches the reference's (Adam's) final one (None: never)."""
    target = final_val_loss(runs[REFERENCE])
    return {name: {"final_val_mse": final_val_loss(run), "train_seconds": run["history"]["wall_time"][-1],
                   "seconds_to_adam_final": time_to_target(run, target)} for name, run in runs.items()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | None]]:
    """Run the demo (``--out`` folder, ``--epochs`` 20, ``--seed`` 0, ``--threads`` 1); returns the summary."""
    parser = argparse.ArgumentParser(prog="python -m sven.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the plot (default demo_out)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the model is tiny and extra threads only add overhead)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = build_task("toy1d")
    runs = {}
    for optimizer in DEMO_OPTIMIZERS:
        settings = default_settings(optimizer, task.loss_kind, task.batch_size)
        runs[optimizer] = train(task, optimizer, settings, args.seed, args.epochs)
        print(f"{optimizer:>11} {settings}")
    results = summary(runs)
    for optimizer, result in results.items():
        reached = result["seconds_to_adam_final"]
        when = "never reached" if reached is None else f"reached after {reached:.1f} s"
        print(f"{optimizer:>11}: final validation MSE {result['final_val_mse']:.3e}, {result['train_seconds']:.1f} s "
              f"in optimizer steps; Adam's final MSE {when}")
    path = plot_curves({name: [run] for name, run in runs.items()}, args.out / "demo_validation_loss.png",
                       f"toy1d: y = exp(-10x²)·sin(2x), {args.epochs} epochs, seed {args.seed}")
    write_json(args.out / "demo_results.json", results)
    print(f"wrote {path} and {args.out / 'demo_results.json'}")
    return results


if __name__ == "__main__":
    main()
