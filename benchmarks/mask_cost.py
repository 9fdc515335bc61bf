"""Cost of a param_fraction step per mask_mode on the Gram engine, against the full step and the functorch path.

    .venv/bin/python benchmarks/mask_cost.py [--fractions 0.5 0.1] [--steps 7] [--threads 1]

MLP 784-128-10 (P = 101,770), B = 256, float32, cross-entropy on random data, Sven with
k = B, rtol = 1e-3, svd_mode="gram". Methods: the full Gram step, then per fraction f the
Gram engine with mask_mode "rows", "tensor", "elementwise" and the functorch engine
(elementwise, as param_fraction ran before masks reached the Gram engine). Steps of all
methods are interleaved round-robin; the time is the median process CPU time per step
(after one warm-up step), robust to other processes' load. Peak memory: glibc's in-use heap
over what existed before, sampled after every aten op (``step_cost.HeapPeak``), over 2 steps.
Writes benchmarks/results/mask_cost_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from step_cost import HeapPeak, per_sample_cross_entropy
from torch import nn

from sven.nn import SvenWrapper
from sven.opt import Sven

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 256


def make_stepper(wrapper: dict) -> Callable[[], None]:
    """One Sven step (loss_and_grad + step) of a fresh seeded MLP 784-128-10 on a fixed random batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(BATCH, 784, generator=generator), torch.randint(0, 10, (BATCH,), generator=generator)
    wrapped = SvenWrapper(model, per_sample_cross_entropy, **wrapper)
    optimizer = Sven(wrapped, lr=0.1, k=BATCH, rtol=1e-3, svd_mode="gram")

    def step() -> None:
        wrapped.loss_and_grad(batch)
        optimizer.step()

    return step


def methods(fractions: list[float]) -> dict[str, dict]:
    table = {"full (gram)": dict(engine="gram")}
    for f in fractions:
        for mode in ("rows", "tensor", "elementwise"):
            table[f"f={f} {mode} (gram)"] = dict(engine="gram", param_fraction=f, mask_mode=mode)
        table[f"f={f} elementwise (functorch)"] = dict(engine="functorch", param_fraction=f)
    return table


def peak_mb(step: Callable[[], None]) -> float:
    step()
    with HeapPeak() as heap:
        for _ in range(2):
            step()
    return (heap.peak - heap.baseline) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.1])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steppers = {name: make_stepper(wrapper) for name, wrapper in methods(args.fractions).items()}
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(args.steps + 1):
        for name, step in steppers.items():
            started = time.process_time()
            step()
            times[name].append(time.process_time() - started)
    full = statistics.median(times["full (gram)"][1:])
    rows = []
    for name, wrapper in methods(args.fractions).items():
        median = statistics.median(times[name][1:])
        rows.append({"method": name, "median_ms": 1e3 * median, "vs_full": median / full,
                     "peak_mb": peak_mb(make_stepper(wrapper))})
    print(f"{'method':34} {'ms':>9} {'× full':>8} {'peak MB':>8}")
    for row in rows:
        print(f"{row['method']:34} {row['median_ms']:9.1f} {row['vs_full']:8.2f} {row['peak_mb']:8.1f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mask_cost_cpu.json").write_text(json.dumps(
        {"threads": args.threads, "steps": args.steps, "batch": BATCH, "clock": "process CPU time", "rows": rows},
        indent=2))


if __name__ == "__main__":
    main()
