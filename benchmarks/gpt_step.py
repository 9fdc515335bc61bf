"""Step cost of a small GPT: SGD against Sven on the Gram engine, with where Sven's time goes.

    .venv/bin/python benchmarks/gpt_step.py [--batch 32] [--tokens 32] [--block torch|custom] [--steps 15]

Model (``sven.bench.gpt.TinyGPT``): token + position Embedding (vocabulary 64, width 64), two causal
blocks (4 heads, feed-forward 256; ``nn.TransformerEncoderLayer`` or a hand-written Linear +
nn.MultiheadAttention + LayerNorm block), final LayerNorm, LM head (untied, P = 110,400; ``--tied``: its
weight is the token Embedding's, P = 106,304). Loss: per-token
cross-entropy averaged per sample, on random tokens. Steps interleaved round-robin after warm-up, medians,
process CPU time (``--clock cpu``) unless ``--clock wall``. The breakdown times, per layer, its share of
the Gram matrix (``block.gram()``) and of the update (``block.weighted_sum(c)``), and the step's phases.
Writes benchmarks/results/gpt_step_<block>[_tied]_cpu.json.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import step_cost
import torch
from step_cost import RESULTS, summary, timed
from torch import Tensor

from sven.bench.gpt import TinyGPT, per_sample_token_cross_entropy
from sven.bench.results import environment, write_json
from sven.jacobian.blocks import GradientBlock
from sven.nn import SvenWrapper
from sven.opt import Sven
from sven.opt.pinv import truncated_spectrum

Batch = tuple[Tensor, Tensor]


def sgd_stepper(model: TinyGPT, batch: Batch) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=step_cost.SGD_LR)

    def sgd_step() -> None:
        optimizer.zero_grad()
        per_sample_token_cross_entropy(model(batch[0]), batch[1]).mean().backward()
        optimizer.step()

    return sgd_step


def sven_stepper(wrapped: SvenWrapper, batch: Batch) -> Callable[[], None]:
    sven = Sven(wrapped, lr=step_cost.SVEN_LR, k=batch[0].shape[0], rtol=step_cost.RTOL, svd_mode="gram")

    def sven_step() -> None:
        wrapped.loss_and_grad(batch)
        sven.step()

    return sven_step


def block_label(block: GradientBlock, names: dict[int, str]) -> str:
    """The layer a block belongs to (its first parameter's module path) and the block's type."""
    return f"{names[id(block.params[0])].rsplit('.', 1)[0]} ({type(block).__name__})"


def step_parts(wrapped: SvenWrapper, batch: Batch, names: dict[int, str], device: torch.device) -> dict[str, float]:
    """Seconds of each phase of one Sven step (no update applied) and of each layer's Gram and update shares."""
    times = {"loss_and_grad (forward + backprops + rules)": timed(lambda: wrapped.loss_and_grad(batch), device)}
    operator, residuals = wrapped.state.operator, wrapped.state.residuals
    times["finite check (blocks' factors)"] = timed(operator.all_rows_finite, device)
    coeffs = torch.randn(operator.shape[0], dtype=operator.dtype)
    for block in operator.blocks:
        label = block_label(block, names)
        times[f"gram {label}"] = timed(block.gram, device)
        times[f"update {label}"] = timed(lambda block=block: block.weighted_sum(coeffs), device)
    times["gram (all layers, float64)"] = timed(operator.gram, device)
    spectra = []
    times["solve"] = timed(lambda: spectra.append(truncated_spectrum(operator, "gram", 10**9, step_cost.RTOL)), device)
    times["update Mᵀc (all layers)"] = timed(lambda: spectra[0].direction(operator, residuals), device)
    return times


def breakdown(wrapped: SvenWrapper, batch: Batch, steps: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Median ms of each of ``step_parts`` over ``steps`` steps."""
    names = {id(p): n for n, p in wrapped.model.named_parameters()}
    samples: dict[str, list[float]] = {}
    for _ in range(steps):
        for name, seconds in step_parts(wrapped, batch, names, device).items():
            samples.setdefault(name, []).append(seconds)
    return {name: {"median_ms": 1e3 * statistics.median(values)} for name, values in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--block", choices=["torch", "custom"], default="torch")
    parser.add_argument("--tied", action="store_true", help="the LM head's weight is the token Embedding's")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(step_cost.CLOCKS), default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    step_cost.clock = step_cost.CLOCKS[args.clock]
    device = torch.device("cpu")
    tokens = torch.randint(0, 64, (args.batch, args.tokens + 1), generator=torch.Generator().manual_seed(0))
    batch = (tokens[:, :-1], tokens[:, 1:])
    models = {}
    for method in ("sgd", "sven"):
        torch.manual_seed(0)
        models[method] = TinyGPT(context=args.tokens, block=args.block, tied=args.tied)
    wrapped = SvenWrapper(models["sven"], per_sample_token_cross_entropy, engine="gram")
    steppers = {"sgd": sgd_stepper(models["sgd"], batch), "sven": sven_stepper(wrapped, batch)}
    for step in steppers.values():
        for _ in range(args.warmup):
            step()
    samples: dict[str, list[float]] = {method: [] for method in steppers}
    for _ in range(args.steps):
        for method, step in steppers.items():
            samples[method].append(timed(step, device))
    timings = {method: summary(times) for method, times in samples.items()}
    parts = breakdown(wrapped, batch, args.steps, device)
    payload = {
        "environment": environment(device), "clock": args.clock, "threads": args.threads,
        "block": args.block, "tied": args.tied,
        "batch_size": args.batch, "tokens": args.tokens, "params": sum(p.numel() for p in models["sgd"].parameters()),
        "plan": wrapped.engine_plan(), "timings": timings, "breakdown": parts,
        "ratios": {"sven/sgd": timings["sven"]["median_ms"] / timings["sgd"]["median_ms"]},
    }
    write_json(args.out or RESULTS / f"gpt_step_{args.block}{'_tied' if args.tied else ''}_cpu.json", payload)
    for method, timing in timings.items():
        print(f"{method:>6}: median {timing['median_ms']:8.2f} ms (min {timing['min_ms']:.2f})")
    print(f"sven/sgd {payload['ratios']['sven/sgd']:.2f}")
    for name, part in parts.items():
        print(f"  {part['median_ms']:7.2f} ms  {name}")


if __name__ == "__main__":
    main()
