"""Step cost on a small model, where per-step overheads dominate: Sven (plain and adaptive) against Adam.

The demo's MLP 1→16→16→16→1 (GELU, P = 593), B = 32, float32, one thread. Steps of the three
optimizers are interleaved over the same batches and timed in process CPU time; the table gives
medians over ``--repeats`` rounds and the ratio to Adam measured in the same round. ``--profile``
adds where a Sven step's time goes (cProfile, cumulative, by part of the pipeline).

    python benchmarks/small_step.py [--repeats 7] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import re
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from sven.nn import SvenWrapper
from sven.opt import Sven

BATCH, STEPS = 32, 100
PARTS = {
    "loss_and_grad (forward, hooks, backward to the probes)": "wrapper.py:.*\\(loss_and_grad\\)",
    "Gram matrix M Mᵀ": "operator.py:.*\\(_cached_gram\\)",
    "spectral solve": "solve.py:.*\\(solve_spectrum\\)",
    "step search (direction Mᵀc, apply)": "search.py:.*\\(search_step\\)",
    "re-evaluations of the batch loss": "wrapper.py:.*\\(batch_losses\\)",
}


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    return ((pred - target) ** 2).mean(dim=1)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(),
                         nn.Linear(16, 1))


def batches() -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = 2 * torch.rand(BATCH * STEPS, 1, generator=generator) - 1
    y = torch.exp(-10 * x**2) * torch.sin(2 * x)
    return list(zip(x.split(BATCH), y.split(BATCH)))


def steppers() -> dict[str, Callable[[tuple[Tensor, Tensor]], None]]:
    adam_model = model()
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3)

    def adam_step(batch: tuple[Tensor, Tensor]) -> None:
        adam.zero_grad()
        per_sample_mse(adam_model(batch[0]), batch[1]).mean().backward()
        adam.step()

    plain = Sven(SvenWrapper(model(), per_sample_mse), lr=0.1, k=BATCH)
    adaptive = Sven(SvenWrapper(model(), per_sample_mse, kappa=1.0), lr=1.0, k=BATCH, damping="adaptive")
    return {"adam": adam_step, "sven": lambda batch: plain.step(batch),
            "sven-damped": lambda batch: adaptive.step(batch)}


def timed(step: Callable, data: list) -> float:
    started = time.process_time()
    for batch in data:
        step(batch)
    return (time.process_time() - started) / len(data)


def profile_parts(step: Callable, data: list) -> dict[str, float]:
    """Seconds per step in each part of the pipeline (cumulative time of its function)."""
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [step(batch) for batch in data])
    stats = pstats.Stats(profiler)
    total = stats.total_tt / len(data)
    parts = {"total (profiled)": total}
    for label, pattern in PARTS.items():
        matched = [value[3] for key, value in stats.stats.items() if re.search(pattern, f"{key[0]}:{key[1]}({key[2]})")]
        parts[label] = sum(matched) / len(data)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = batches()
    step = steppers()
    for name in step:
        timed(step[name], data[:10])
    rounds = {name: [] for name in step}
    ratios = {name: [] for name in step}
    for _ in range(args.repeats):
        times = {name: timed(step[name], data) for name in step}
        for name, seconds in times.items():
            rounds[name].append(seconds)
            ratios[name].append(seconds / times["adam"])
    print(f"MLP 1-16-16-16-1 (P = 593), B = {BATCH}, one thread, process CPU time, median of {args.repeats} rounds")
    print("| optimizer | µs / step | × Adam (same round, median) |")
    print("|---|---|---|")
    for name in step:
        print(f"| {name} | {1e6 * statistics.median(rounds[name]):.0f} | {statistics.median(ratios[name]):.2f} |")
    if args.profile:
        for name in ("sven", "sven-damped"):
            print(f"\nwhere a {name} step's time goes (cProfile, µs per step, cumulative):")
            for label, seconds in profile_parts(step[name], data).items():
                print(f"  {label}: {1e6 * seconds:.0f}")


if __name__ == "__main__":
    main()
