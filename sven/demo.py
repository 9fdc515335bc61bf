"""``make demo``: Sven vs Adam on the paper's 1-D regression, y = exp(−10x²)·sin(2x).

Trains the toy1d task of the benchmark (MLP 1→16→16→16→1 GELU, B = 32, 10k train /
10k validation samples) with Sven (the paper's exact step, and with adaptive
Levenberg–Marquardt damping) and with Adam(lr=1e-3), prints the final validation
MSE and wall time of each and writes ``OUT/demo_validation_loss.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sven.bench.grids import default_settings
from sven.bench.plots import plot_curves
from sven.bench.tasks import build_task
from sven.bench.train import train

DEMO_OPTIMIZERS = ("sven", "sven-damped", "adam")


def main(argv: list[str] | None = None) -> None:
    """Run the demo; ``--out`` is the folder for the PNG, ``--epochs`` the number of epochs (20)."""
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
        started = time.perf_counter()
        runs[optimizer] = train(task, optimizer, settings, args.seed, args.epochs)
        total = time.perf_counter() - started
        steps = runs[optimizer]["history"]["wall_time"][-1]
        print(f"{optimizer:>5} {settings}: final validation MSE {runs[optimizer]['history']['val_loss'][-1]:.3e}, "
              f"wall time {steps:.1f} s in optimizer steps ({total:.1f} s with evaluation)")
    for sven_variant in DEMO_OPTIMIZERS[:-1]:
        ratio = runs["adam"]["history"]["val_loss"][-1] / runs[sven_variant]["history"]["val_loss"][-1]
        print(f"Adam's final validation MSE is {ratio:.2g}x that of {sven_variant}")
    path = plot_curves({name: [run] for name, run in runs.items()}, args.out / "demo_validation_loss.png",
                       f"toy1d: y = exp(-10x²)·sin(2x), {args.epochs} epochs, seed {args.seed}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
