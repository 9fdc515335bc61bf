"""Step cost of a small Transformer: SGD, Sven with attention on the Gram engine's fast path, and
Sven with nn.MultiheadAttention on the functorch fallback (its Gram rule removed while planning).

    .venv/bin/python benchmarks/attention_step.py [--batch 32] [--tokens 32] [--steps 20] [--threads 1]

Model: Linear(16 → 64) → 2 × nn.TransformerEncoderLayer(d_model 64, 4 heads, feed-forward 256,
dropout 0, batch_first) → mean over tokens → Linear(64 → 10); cross-entropy on random data.
Steps interleaved round-robin after warm-up, medians; the clock is the process's CPU time
(``--clock cpu``, robust to other processes on a shared machine) unless ``--clock wall``.
Writes benchmarks/results/attention_step_cpu.json.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import step_cost
import torch
from step_cost import RESULTS, per_sample_cross_entropy, summary, timed
from torch import Tensor, nn

from sven.bench.results import environment, write_json
from sven.jacobian.layers import registry
from sven.nn import SvenWrapper
from sven.opt import Sven

METHODS = ("sgd", "sven", "sven_attention_fallback")


class SmallTransformer(nn.Module):
    """(B, T, 16) → (B, 10) through two encoder layers of width 64."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=256, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def make_stepper(method: str, batch: tuple[Tensor, Tensor]) -> tuple[Callable[[], None], dict[str, list[str]]]:
    """One full training step of ``method`` on ``batch``, and the Gram engine's plan (empty for SGD)."""
    torch.manual_seed(0)
    model = SmallTransformer()
    if method == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=step_cost.SGD_LR)

        def sgd_step() -> None:
            optimizer.zero_grad()
            per_sample_cross_entropy(model(batch[0]), batch[1]).mean().backward()
            optimizer.step()

        return sgd_step, {}
    with mock.patch.dict(registry._RULES):
        if method == "sven_attention_fallback":
            registry._RULES.pop(nn.MultiheadAttention, None)
        wrapped = SvenWrapper(model, per_sample_cross_entropy, engine="gram")
    sven = Sven(wrapped, lr=step_cost.SVEN_LR, k=batch[1].shape[0], rtol=step_cost.RTOL, svd_mode="gram")

    def sven_step() -> None:
        wrapped.loss_and_grad(batch)
        sven.step()

    return sven_step, wrapped.engine_plan()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(step_cost.CLOCKS), default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "attention_step_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    step_cost.clock = step_cost.CLOCKS[args.clock]
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(args.batch, args.tokens, 16, generator=generator),
             torch.randint(0, 10, (args.batch,), generator=generator))
    steppers = {method: make_stepper(method, batch) for method in METHODS}
    for step, _ in steppers.values():
        for _ in range(args.warmup):
            step()
    samples: dict[str, list[float]] = {method: [] for method in METHODS}
    for _ in range(args.steps):
        for method, (step, _) in steppers.items():
            samples[method].append(timed(step, device))
    timings = {method: summary(times) for method, times in samples.items()}
    median = {method: timings[method]["median_ms"] for method in METHODS}
    payload = {
        "environment": environment(device), "clock": args.clock, "threads": args.threads,
        "batch_size": args.batch, "tokens": args.tokens,
        "params": sum(p.numel() for p in SmallTransformer().parameters()), "timings": timings,
        "plans": {method: plan for method, (_, plan) in steppers.items() if plan},
        "ratios": {"sven/sgd": median["sven"] / median["sgd"],
                   "fallback/sven": median["sven_attention_fallback"] / median["sven"],
                   "fallback/sgd": median["sven_attention_fallback"] / median["sgd"]},
    }
    write_json(args.out, payload)
    for method in METHODS:
        print(f"{method:>24}: median {median[method]:8.2f} ms (min {timings[method]['min_ms']:.2f})")
    print({name: round(value, 2) for name, value in payload["ratios"].items()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
