"""Cost of one training step: SGD, Sven on the Gram engine, and Sven on the reference SVD path.

    .venv/bin/python benchmarks/step_cost.py [--device cpu|cuda] [--steps 20] [--warmup 3]
                                             [--knobs | --large-batch | --table [--max-batch B]]

Methods (each on its own copy of the same model, random data, no download):
  sgd         forward + backward of the mean loss + torch.optim.SGD.step
  sven        SvenWrapper(engine="gram") + Sven(svd_mode="gram", k=B): the Gram engine; with k ≥ B the
              solve is the Cholesky-certified route when nothing is cut (else eigh)
  sven_k64    the same with k = 64 < B: the top-64 eigenpairs (sven.opt.eigen.top_eigh; B > 64 only)
  torch_path  SvenWrapper(engine="functorch") + Sven(svd_mode="torch", k=B): J (B × P) and its full SVD;
              skipped where its steps would take over a minute, else as many steps (≥ 3) as fit in one
Steps of SGD and Sven are interleaved round-robin, so a load change on the shared machine
hits every method alike (the reference path runs after them: its seconds-long steps would
chill the caches of the steps that follow); the ratios Sven/SGD and torch_path/Sven use medians of one run
(also given from the fastest step of each method, and with the 1-min load average).
On a shared machine, 2 threads can wait on each other at every parallel region while a
third process holds a core; ``--threads 1 --clock cpu`` measures the same work by the
process's CPU time, which other processes' load does not inflate.
Peak memory: what 3 steps add at their peak to what was allocated before them (model, data,
optimizer state after one step): CUDA — torch.cuda.max_memory_allocated; CPU — glibc's
in-use heap bytes (mallinfo2: arena + mmapped blocks) sampled after every aten op by a
TorchDispatchMode (forward, autograd backward and solver ops alike).
The "breakdown" section times the phases of the Sven step separately (medians).
``--knobs`` instead times the settings of ``KNOBS`` (k < B, the randomized, scipy and lobpcg modes,
rtol = 0 with damping, a tiny undamped rtol, rows > P), each interleaved with SGD and the default
step on its model, with the route "auto" took and the peak memory.
``--large-batch`` instead takes Sven steps with damping 1e-3 and k = B on MLP 784-64-10 for
B = 1024 … 16384 (``LARGE_BATCHES``), each B in a fresh process: "auto" (the Gram route while the Gram
matrix, its shifted copy and factor fit in ``gram_memory``, 512 MiB: B ≤ 4729; matrix-free "cg" past it) and
the matrix-free route forced (gram_memory = 0) where auto does not take it; ms per step (median of
``--large-steps``), the ratio to an SGD step on the same batch, the normal-equation residual and the peak RSS growth
(``resource.getrusage`` high-water mark after the steps minus before them).
``--table`` (``--threads 1 --clock cpu`` advised) times every knob of ``TABLE_KNOBS`` (param_fraction 0.5 per
mask_mode, k = B/2 exact and by each iterative mode, rtol = 0 with damping, the matrix-free "cg" route) at
B = 64 … 16384 (``TABLE_BATCHES``; MLP 784-128-10 up to 256, 784-64-10 from 1024 on), interleaved with SGD and
the default step, with fewer steps at large B (``TABLE_REPEATS``): median ms, the ratios to SGD and to the
default step, one step's peak memory and the route. A knob whose first step raises ``SvenCostWarning`` (the
library's "far off the fast path" warning, given before the costly part) is skipped with the warning as the
reason; warnings of the timed steps (a later param_fraction draw, say) are recorded and the route marked.
With CUDA available the same table is measured on the GPU and printed as more columns.
Writes benchmarks/results/step_cost_<device>.json (step_cost_knobs_…, step_cost_large_batch_…, step_cost_table_…)
and prints a table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import resource
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from sven.bench.results import environment, write_json
from sven.cost import SvenCostWarning
from sven.nn import SvenWrapper
from sven.opt import Sven
from sven.opt.pinv import truncated_spectrum

RESULTS = Path(__file__).resolve().parent / "results"
TORCH_PATH_BUDGET_S = 60.0
MIN_TORCH_PATH_STEPS = 3
MEMORY_STEPS = 3
SGD_LR = 0.01
SVEN_LR = 0.1
RTOL = 1e-3


@dataclass(frozen=True)
class Config:
    """A model by name on a batch size: ``build()`` gives the module, inputs are ``input_shape`` per sample."""

    name: str
    batch_size: int
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    classes: int = 10


def mlp(*sizes: int) -> Callable[[], nn.Module]:
    """Builder of a ReLU MLP sizes[0] → … → sizes[-1]."""

    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers += [nn.ReLU()] if i else []
            layers.append(nn.Linear(d_in, d_out))
        return nn.Sequential(*layers)

    return build


def small_cnn() -> nn.Module:
    """Conv(1→8, 3, stride 2) → GroupNorm → Conv(8→16, 3, stride 2) → Linear, on 28×28 inputs (P ≈ 7.5k)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    )


CONFIGS = [
    *(Config("mlp_784-128-10", b, mlp(784, 128, 10), (784,)) for b in (64, 256, 1024)),
    *(Config("mlp_784-1024-1024-10", b, mlp(784, 1024, 1024, 10), (784,)) for b in (64, 256)),
    Config("cnn_28x28", 256, small_cnn, (1, 28, 28)),
]
METHODS = ("sgd", "sven", "sven_k64", "torch_path")


def per_sample_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """(B, classes), (B,) → (B,)."""
    return F.cross_entropy(logits, labels, reduction="none")


def make_batch(config: Config, device: torch.device) -> tuple[Tensor, Tensor]:
    """Random inputs (B, *input_shape) and labels (B,), seeded."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(config.batch_size, *config.input_shape, generator=generator)
    y = torch.randint(0, config.classes, (config.batch_size,), generator=generator)
    return x.to(device), y.to(device)


def make_model(config: Config, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return config.build().to(device)


def make_stepper(method: str, config: Config, device: torch.device) -> Callable[[], None]:
    """A closure that takes one full training step of ``method`` on a fixed batch."""
    if method == "sgd":
        model = make_model(config, device)
        batch = make_batch(config, device)
        optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)

        def sgd_step() -> None:
            optimizer.zero_grad()
            per_sample_cross_entropy(model(batch[0]), batch[1]).mean().backward()
            optimizer.step()

        return sgd_step
    engine, svd_mode, k = {
        "sven": ("gram", "gram", config.batch_size),
        "sven_k64": ("gram", "gram", 64),
        "torch_path": ("functorch", "torch", config.batch_size),
    }[method]
    return sven_stepper(config, device, engine, dict(k=k, rtol=RTOL, svd_mode=svd_mode))[0]


def sven_stepper(config: Config, device: torch.device, engine: str, options: dict[str, Any],
                 wrapper_options: dict[str, Any] | None = None) -> tuple[Callable[[], None], Sven]:
    """A closure taking one Sven step with ``options`` on ``engine`` (fixed batch), and its optimizer."""
    model = make_model(config, device)
    batch = make_batch(config, device)
    wrapped = SvenWrapper(model, per_sample_cross_entropy, engine=engine, **(wrapper_options or {}))
    sven = Sven(wrapped, lr=SVEN_LR, **options)

    def sven_step() -> None:
        wrapped.loss_and_grad(batch)
        sven.step()

    return sven_step, sven


def limit_threads(threads: int) -> None:
    """torch's CPU threads and the BLAS threads of numpy and scipy to ``threads``.

    ``sven.opt.eigen.top_eigh`` runs scipy's LAPACK, whose OpenBLAS threads ignore ``torch.set_num_threads``;
    on a loaded machine they spin and the top-k eigenpairs of B = 256 take 38 ms of CPU time instead of 6.
    """
    import scipy.linalg  # noqa: F401  (loads scipy's BLAS, so that the limit reaches it)
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def timed(step: Callable[[], None], device: torch.device) -> float:
    """Seconds one call of ``step`` takes on ``clock`` (device work included)."""
    synchronize(device)
    started = clock()
    step()
    synchronize(device)
    return clock() - started


def methods_for(config: Config) -> list[str]:
    return [m for m in METHODS if m != "sven_k64" or config.batch_size > 64]


def predicted_torch_path_step_s(config: Config, device: torch.device) -> float:
    """Seconds of one reference-path step, predicted from the fastest of 4 SVDs of a (64 × 16384) float64 matrix.

    A thin SVD of (B × P) costs ∝ B²·P and dominates the step; the first step, timed, then
    sets how many steps fit in the minute.
    """
    probe_rows, probe_cols = 64, 16384
    matrix = torch.randn(probe_rows, probe_cols, dtype=torch.float64, device=device)
    seconds = min(timed(lambda: torch.linalg.svd(matrix, full_matrices=False), device) for _ in range(4))
    params = sum(p.numel() for p in make_model(config, torch.device("cpu")).parameters())
    return seconds * (config.batch_size / probe_rows) ** 2 * (params / probe_cols)


def summary(times: list[float]) -> dict[str, Any]:
    """Median, fastest and slowest step (ms) and the number of steps."""
    return {"median_ms": 1e3 * statistics.median(times), "steps": len(times),
            "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times)}


def time_methods(config: Config, device: torch.device, steps: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Step times per method: the fast methods interleaved round-robin, then the reference path.

    The reference path runs after them, not between their steps: its seconds-long, memory-heavy
    steps would leave every following fast step with cold caches.
    """
    fast = {m: make_stepper(m, config, device) for m in methods_for(config) if m != "torch_path"}
    for step in fast.values():
        for _ in range(warmup):
            timed(step, device)
    samples: dict[str, list[float]] = {m: [] for m in fast}
    for _ in range(steps):
        for method, step in fast.items():
            samples[method].append(timed(step, device))
    results = {method: summary(times) for method, times in samples.items()}
    predicted = predicted_torch_path_step_s(config, device)
    if predicted * (1 + MIN_TORCH_PATH_STEPS) > TORCH_PATH_BUDGET_S:
        results["torch_path"] = {"skipped": f"predicted {predicted:.0f} s per step (> 1 min for the steps)"}
        return results
    reference = make_stepper("torch_path", config, device)
    first = timed(reference, device)
    wanted = max(MIN_TORCH_PATH_STEPS, min(steps, int(TORCH_PATH_BUDGET_S / first) - 1))
    results["torch_path"] = summary([timed(reference, device) for _ in range(wanted)])
    return results


PHASES = ("loss_and_grad (forward + backprops)", "gram (per-layer, float64)", "solve (certificate or eigh)",
          "update Mᵀc", "eigh of the Gram matrix (for comparison)")


def phase_times(
    wrapped: SvenWrapper, batch: tuple[Tensor, Tensor], k: int, device: torch.device
) -> tuple[list[float], str]:
    """Seconds of each of ``PHASES`` for one Sven step, and the solve route taken."""
    times = [timed(lambda: wrapped.loss_and_grad(batch), device)]
    operator, residuals = wrapped.state.operator, wrapped.state.residuals
    times.append(timed(operator.gram, device))
    spectra = []
    times.append(timed(lambda: spectra.append(truncated_spectrum(operator, "gram", k, RTOL)), device))
    times.append(timed(lambda: spectra[0].direction(operator, residuals), device))
    times.append(timed(lambda: torch.linalg.eigh(operator.gram()), device))
    return times, type(spectra[0]).__name__


def breakdown(config: Config, device: torch.device, steps: int) -> dict[str, Any]:
    """Median ms of each phase of the Sven step (k = B) over ``steps`` steps after one warm-up."""
    model = make_model(config, device)
    batch = make_batch(config, device)
    wrapped = SvenWrapper(model, per_sample_cross_entropy, engine="gram")
    measured = [phase_times(wrapped, batch, config.batch_size, device) for _ in range(steps + 1)][1:]
    per_phase = zip(*(times for times, _ in measured))
    return {"solve_route": measured[-1][1],
            **{name: 1e3 * statistics.median(times) for name, times in zip(PHASES, per_phase)}}


class HeapPeak(TorchDispatchMode):
    """Peak of glibc's in-use heap bytes (``mallinfo2``: arena + mmapped), sampled after every aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = self.baseline = _heap_in_use()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _heap_in_use())
        return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_in_use() -> int:
    """Bytes glibc malloc has handed out and not taken back (small-block arena + mmapped blocks)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def peak_memory_mb(method: str, config: Config, device: torch.device) -> float:
    """Peak memory (MB) that ``MEMORY_STEPS`` steps of ``method`` add to what existed before them."""
    return step_peak_memory_mb(make_stepper(method, config, device), device)


def peak_memory_of(run: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """What ``run()`` returns and the peak memory (MB) it adds to what existed before it (the CUDA allocator's
    peak on a GPU, ``HeapPeak`` on the CPU)."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = run()
        synchronize(device)
        return result, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with HeapPeak() as heap:
        result = run()
    return result, (heap.peak - heap.baseline) / 2**20


def step_peak_memory_mb(step: Callable[[], None], device: torch.device) -> float:
    """Peak memory (MB) that ``MEMORY_STEPS`` calls of ``step`` add to what existed after a first call."""
    step()

    def steps() -> None:
        for _ in range(MEMORY_STEPS):
            step()

    return peak_memory_of(steps, device)[1]


def ratios(timings: dict[str, dict[str, Any]], statistic: str = "median_ms") -> dict[str, float | None]:
    """Sven/SGD (k = B and k = 64) and torch_path/Sven from one statistic of the step times."""
    value = {m: t.get(statistic) for m, t in timings.items()}

    def ratio(top: str, bottom: str) -> float | None:
        return value[top] / value[bottom] if value.get(top) and value.get(bottom) else None

    return {"sven/sgd": ratio("sven", "sgd"), "sven_k64/sgd": ratio("sven_k64", "sgd"),
            "torch_path/sven": ratio("torch_path", "sven")}


def table(rows: list[dict[str, Any]]) -> str:
    """The results as a fixed-width text table."""
    head = (f"{'model':22} {'B':>5} {'P':>9} {'sgd ms':>8} {'sven ms':>8} {'k64 ms':>8} {'torch ms':>9} "
            f"{'sven/sgd':>8} {'k64/sgd':>8} {'torch/sven':>10}  {'solve route':24} peak MB sgd/sven/k64/torch")
    lines = [head, "-" * len(head)]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for row in rows:
        t, r, mem = row["timings"], row["ratios"], row["peak_memory_mb"]
        ms = {m: t.get(m, {}).get("median_ms") for m in METHODS}
        lines.append(
            f"{row['model']:22} {row['batch_size']:>5} {row['params']:>9} {fmt(ms['sgd'], '8.2f')} "
            f"{fmt(ms['sven'], '8.2f')} {fmt(ms['sven_k64'], '8.2f')} {fmt(ms['torch_path'], '9.1f')} "
            f"{fmt(r['sven/sgd'], '8.2f')} {fmt(r['sven_k64/sgd'], '8.2f')} {fmt(r['torch_path/sven'], '10.0f')}  "
            f"{row['breakdown']['solve_route']:24} " + "/".join(fmt(mem.get(m), ".0f") for m in METHODS)
        )
    return "\n".join(lines)


def run(device: torch.device, steps: int, warmup: int, out: Path) -> list[dict[str, Any]]:
    rows = []
    for config in CONFIGS:
        load_before = os.getloadavg()[0]
        timings = time_methods(config, device, steps, warmup)
        rows.append({
            "model": config.name, "batch_size": config.batch_size,
            "params": sum(p.numel() for p in make_model(config, torch.device("cpu")).parameters()),
            "load_average_1min": [load_before, os.getloadavg()[0]],
            "timings": timings, "ratios": ratios(timings), "ratios_of_fastest_steps": ratios(timings, "min_ms"),
            "breakdown": breakdown(config, device, steps),
            "peak_memory_mb": {m: peak_memory_mb(m, config, device) for m in timings if "skipped" not in timings[m]},
        })
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    payload = {"environment": environment(device), "clock": clock.__name__, "steps": steps, "warmup": warmup,
               "rtol": RTOL,
               "memory_method": "cuda max_memory_allocated" if device.type == "cuda"
               else "peak of glibc in-use heap bytes (mallinfo2) sampled after every aten op", "rows": rows}
    write_json(out, payload)
    return rows


@dataclass(frozen=True)
class Knob:
    """A setting a user turns on: a label, the model and batch it runs on, and Sven's options (Gram engine)."""

    label: str
    config: Config
    options: dict[str, Any]
    max_steps: int | None = None
    """Fewer timed steps for a knob whose steps take seconds (its median then comes from these)."""


MLP_256 = Config("mlp_784-128-10", 256, mlp(784, 128, 10), (784,))
MLP_64_1024 = Config("mlp_784-64-10", 1024, mlp(784, 64, 10), (784,))
ROWS_ABOVE_P = Config("mlp_2-16-16-10", 1024, mlp(2, 16, 16, 10), (2,))
KNOBS = [
    Knob("k = B/2 (top-k eigh)", MLP_256, dict(k=128)),
    Knob("k = B/4 (top-k eigh)", MLP_256, dict(k=64)),
    Knob("randomized, k = B/2", MLP_256, dict(k=128, svd_mode="randomized")),
    Knob("randomized_v2, k = B/2", MLP_256, dict(k=128, svd_mode="randomized_v2")),
    Knob("scipy (eigsh), k = B/2", MLP_256, dict(k=128, svd_mode="scipy")),
    Knob("lobpcg, k = B/8", MLP_256, dict(k=32, svd_mode="lobpcg"), max_steps=5),
    Knob("rtol = 0, damping = 1e-3", MLP_256, dict(k=256, rtol=0.0, damping=1e-3)),
    Knob("rtol = 1e-8, undamped (lq)", MLP_256, dict(k=256, rtol=1e-8), max_steps=5),
    Knob("rtol = 0, damping = 1e-3", MLP_64_1024, dict(k=1024, rtol=0.0, damping=1e-3)),
    Knob("rtol = 0, undamped (lq)", MLP_64_1024, dict(k=1024, rtol=0.0), max_steps=1),
    Knob("rows > P: the full SVD of M (\"torch\") against the default Mᵀ M side", ROWS_ABOVE_P,
         dict(k=1024, svd_mode="torch")),
]
"""The knobs of the knob table, each against SGD and the default step (``Sven(wrapped)``, k = B) on its model."""


def knob_row(knob: Knob, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Median step of SGD, the default Sven step and the knob's, interleaved; the knob's route and peak memory."""
    config = knob.config
    default_options = dict(k=config.batch_size)
    steppers = {"sgd": make_stepper("sgd", config, device),
                "default": sven_stepper(config, device, "gram", default_options)[0]}
    knob_step, knob_optimizer = sven_stepper(config, device, "gram", knob.options)
    steppers["knob"] = knob_step
    for name, step in steppers.items():
        for _ in range(1 if name == "knob" and knob.max_steps else warmup):
            timed(step, device)
    samples: dict[str, list[float]] = {name: [] for name in steppers}
    for index in range(steps):
        for name, step in steppers.items():
            if name != "knob" or knob.max_steps is None or index < knob.max_steps:
                samples[name].append(timed(step, device))
    ms = {name: 1e3 * statistics.median(times) for name, times in samples.items()}
    return {
        "knob": knob.label, "model": config.name, "batch_size": config.batch_size,
        "params": sum(p.numel() for p in make_model(config, torch.device("cpu")).parameters()),
        "options": knob.options, "knob_steps": len(samples["knob"]),
        "route": knob_optimizer.last_step["svd_mode"], "median_ms": ms,
        "knob/sgd": ms["knob"] / ms["sgd"], "knob/default": ms["knob"] / ms["default"],
        "peak_memory_mb": {"default": step_peak_memory_mb(steppers["default"], device),
                           "knob": step_peak_memory_mb(knob_step, device)},
    }


def knob_table(rows: list[dict[str, Any]]) -> str:
    """The knob results as a markdown table."""
    lines = ["| knob | model | B | P | route | SGD ms | default ms | knob ms | knob/SGD | knob/default "
             "| peak MB default / knob |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ms, mem = row["median_ms"], row["peak_memory_mb"]
        lines.append(f"| {row['knob']} | {row['model']} | {row['batch_size']} | {row['params']} | {row['route']} "
                     f"| {ms['sgd']:.2f} | {ms['default']:.2f} | {ms['knob']:.2f} | {row['knob/sgd']:.2f} "
                     f"| {row['knob/default']:.2f} | {mem['default']:.1f} / {mem['knob']:.1f} |")
    return "\n".join(lines)


def run_knobs(device: torch.device, steps: int, warmup: int, out: Path) -> list[dict[str, Any]]:
    rows = []
    for knob in KNOBS:
        rows.append(knob_row(knob, device, steps, warmup))
        print(knob_table(rows).splitlines()[-1], flush=True)
    write_json(out, {"environment": environment(device), "clock": clock.__name__, "steps": steps,
                     "warmup": warmup, "rows": rows})
    return rows


TABLE_BATCHES = (64, 256, 1024, 4096, 16384)
TABLE_REPEATS = {64: 20, 256: 20, 1024: 5, 4096: 1, 16384: 1}
"""Timed steps of each knob at B (the median of these); with one, that step is also the memory step."""
SGD_SAMPLES = 20
"""SGD steps timed at every B (spread over the rounds): its medians set every ratio."""
TABLE_DAMPING = 1e-3


def table_config(batch_size: int) -> Config:
    """MLP 784-128-10 up to B = 256, 784-64-10 (the large-batch model) from B = 1024 on."""
    hidden = 128 if batch_size <= 256 else 64
    return Config(f"mlp_784-{hidden}-10", batch_size, mlp(784, hidden, 10), (784,))


@dataclass(frozen=True)
class TableKnob:
    """A row of the knob table: Sven's options at batch size B and the wrapper's options (Gram engine)."""

    label: str
    options: Callable[[int], dict[str, Any]]
    wrapper: dict[str, Any] = field(default_factory=dict)


TABLE_KNOBS = [
    TableKnob("default (k = B)", lambda b: dict(k=b)),
    *(TableKnob(f"param_fraction 0.5, {mode}", lambda b: dict(k=b), dict(param_fraction=0.5, mask_mode=mode))
      for mode in ("rows", "tensor", "elementwise")),
    TableKnob("k = B/2 (top-k eigh)", lambda b: dict(k=b // 2)),
    *(TableKnob(f"{mode}, k = B/2", lambda b, mode=mode: dict(k=b // 2, svd_mode=mode))
      for mode in ("randomized", "randomized_v2", "lobpcg", "scipy")),
    TableKnob("rtol = 0, damping = 1e-3", lambda b: dict(k=b, rtol=0.0, damping=TABLE_DAMPING)),
    TableKnob("cg (matrix-free), damping = 1e-3", lambda b: dict(k=b, damping=TABLE_DAMPING, svd_mode="cg",
                                                                 gram_memory=0)),
]
"""The knobs of the full table (``--table``), each at every B of ``TABLE_BATCHES``."""


def probe(step: Callable[[], None]) -> str | None:
    """Take a first step with ``SvenCostWarning`` raised: the warning's text when the library warns, else None.

    The warnings are raised before the costly part (the n × n solve, the entrywise masked Gram), so a cell the
    library calls far off the fast path costs one forward and backward here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", SvenCostWarning)
        try:
            step()
        except SvenCostWarning as warning:
            return str(warning)
    return None


def recording(step: Callable[[], None], log: list[str]) -> Callable[[], None]:
    """``step`` with the warnings it gives appended to ``log`` ("Category: message") instead of printed."""

    def run() -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SvenCostWarning)
            step()
        log.extend(f"{warning.category.__name__}: {warning.message}" for warning in caught)

    return run


def timed_with_peak(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Seconds of one call of ``step`` and the peak memory (MB) it added (``peak_memory_of``)."""
    return peak_memory_of(lambda: timed(step, device), device)


def table_rows(batch_size: int, device: torch.device, warmup: int) -> list[dict[str, Any]]:
    """SGD and every knob of ``TABLE_KNOBS`` at ``batch_size``: probed, then timed round-robin.

    Per knob: median ms of ``TABLE_REPEATS[B]`` steps, its ratio to SGD's median and to the default step's,
    the peak memory of one step, the route taken; a knob whose first step warns (``probe``) is skipped with
    the warning as the reason.
    """
    config = table_config(batch_size)
    repeats = TABLE_REPEATS[batch_size]
    steppers: dict[str, Callable[[], None]] = {"SGD": make_stepper("sgd", config, device)}
    optimizers: dict[str, Sven] = {}
    skipped: dict[str, str] = {}
    logs: dict[str, list[str]] = {}
    for knob in TABLE_KNOBS:
        step, optimizer = sven_stepper(config, device, "gram", knob.options(batch_size), knob.wrapper)
        reason = probe(step)
        if reason is None:
            logs[knob.label] = []
            steppers[knob.label], optimizers[knob.label] = recording(step, logs[knob.label]), optimizer
        else:
            skipped[knob.label] = reason
    for step in steppers.values():
        for _ in range(warmup if repeats > 1 else 0):
            timed(step, device)
    samples: dict[str, list[float]] = {name: [] for name in steppers}
    peaks: dict[str, float] = {}
    for _ in range(repeats):
        for name, step in steppers.items():
            if name == "SGD":
                samples[name] += [timed(step, device) for _ in range(-(-SGD_SAMPLES // repeats))]
            elif repeats == 1:
                seconds, peaks[name] = timed_with_peak(step, device)
                samples[name].append(seconds)
            else:
                samples[name].append(timed(step, device))
    for name, step in steppers.items():
        if name not in peaks:
            peaks[name] = timed_with_peak(step, device)[1]
    ms = {name: 1e3 * statistics.median(times) for name, times in samples.items()}
    default = ms.get(TABLE_KNOBS[0].label)
    params = sum(p.numel() for p in make_model(config, torch.device("cpu")).parameters())
    rows = []
    for name in ["SGD", *(knob.label for knob in TABLE_KNOBS)]:
        row: dict[str, Any] = {"batch_size": batch_size, "model": config.name, "params": params, "knob": name,
                               "device": device.type}
        if name in skipped:
            rows.append({**row, "skipped": skipped[name]})
            continue
        report = optimizers[name].last_step if name in optimizers else {}
        route = report.get("svd_mode", "-")
        rows.append({**row, "route": report.get("normal_equation_route", route) if route == "cg" else route,
                     "median_ms": ms[name], "steps": len(samples[name]), "ratio_to_sgd": ms[name] / ms["SGD"],
                     "ratio_to_default": ms[name] / default if default else None, "peak_mb": peaks[name],
                     "warnings": sorted(set(logs.get(name, [])))})
    return rows


def run_table(batches: list[int], devices: list[torch.device], cpu_clock: str, warmup: int, out: Path
              ) -> list[dict[str, Any]]:
    """``table_rows`` at every B on every device (the CPU on ``cpu_clock``, a GPU on the wall clock)."""
    global clock
    rows = []
    for device in devices:
        clock = CLOCKS[cpu_clock if device.type == "cpu" else "wall"]
        for batch_size in batches:
            load_before = os.getloadavg()[0]
            measured = table_rows(batch_size, device, warmup)
            load = [load_before, os.getloadavg()[0]]
            rows += [{**row, "load_average_1min": load} for row in measured]
            print(f"{device.type} B = {batch_size} done (1-min load {load[0]:.1f}–{load[1]:.1f})", flush=True)
    write_json(out, {"environment": environment(devices[-1]), "cpu_clock": cpu_clock, "warmup": warmup,
                     "repeats": TABLE_REPEATS, "sgd_samples": SGD_SAMPLES, "rows": rows})
    return rows


def full_table(rows: list[dict[str, Any]]) -> str:
    """The full knob table as markdown: a row per (B, knob), the CPU columns and, where measured, the GPU's."""
    gpu = {(row["batch_size"], row["knob"]): row for row in rows if row["device"] == "cuda"}
    cells = lambda row: (["skipped (warns)"] + ["-"] * 4 if "skipped" in row else [  # noqa: E731
        row["route"] + (" (warned)" if row["warnings"] else ""), f"{row['median_ms']:.1f}",
        f"{row['ratio_to_sgd']:.1f}",
        "-" if row["ratio_to_default"] is None else f"{row['ratio_to_default']:.2f}", f"{row['peak_mb']:.1f}"])
    head = "| B | model | knob | route | ms | ÷ SGD | ÷ default | peak MB |"
    if gpu:
        head += " GPU route | GPU ms | GPU ÷ SGD | GPU ÷ default | GPU peak MB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        if row["device"] != "cpu":
            continue
        columns = [str(row["batch_size"]), row["model"], row["knob"], *cells(row)]
        if gpu:
            columns += cells(gpu[(row["batch_size"], row["knob"])])
        lines.append("| " + " | ".join(columns) + " |")
    return "\n".join(lines)


def skip_reasons(rows: list[dict[str, Any]]) -> str:
    """Each skipped cell and the warning the library gave for it; the warnings of the timed steps."""
    return "\n".join(f"- B = {row['batch_size']}, {row['knob']} ({row['device']}): "
                     + (f"skipped: {row['skipped']}" if "skipped" in row else "; ".join(row["warnings"]))
                     for row in rows if "skipped" in row or row.get("warnings"))


LARGE_BATCHES = (1024, 4096, 8192, 16384)
LARGE_DAMPING = 1e-3
SGD_STEPS = 50
MATRIX_FREE = {"gram_memory": 0}


def large_batch_row(batch_size: int, options: dict[str, Any], steps: int, threads: int | None) -> dict[str, Any]:
    """One Sven configuration on MLP 784-64-10 at ``batch_size`` (run in a fresh process for its RSS peak)."""
    if threads is not None:
        limit_threads(threads)
    device = torch.device("cpu")
    config = Config("mlp_784-64-10", batch_size, mlp(784, 64, 10), (784,))
    sgd = make_stepper("sgd", config, device)
    sgd_s = [timed(sgd, device) for _ in range(SGD_STEPS)]
    sven_step, sven = sven_stepper(config, device, "gram", dict(k=batch_size, damping=LARGE_DAMPING, **options))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sven_s = [timed(sven_step, device) for _ in range(steps)]
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    report = sven.last_step
    return {"batch_size": batch_size, "options": options, "route": report["svd_mode"],
            "solve": report.get("normal_equation_route", "eigh or certificate"),
            "cg_iterations": report.get("cg_iterations"), "residual": report.get("normal_equation_residual"),
            "sven_ms": summary(sven_s), "sgd_ms": summary(sgd_s),
            "sven/sgd": statistics.median(sven_s) / statistics.median(sgd_s), "rss_growth_mb": growth_mb}


def run_large_batches(batches: list[int], steps: int, threads: int | None, out: Path) -> list[dict[str, Any]]:
    """``large_batch_row`` for "auto" at every batch size, and matrix-free where auto takes the Gram route."""
    rows = []
    context = multiprocessing.get_context("spawn")
    for batch_size in batches:
        for options in ({}, MATRIX_FREE):
            if options and rows[-1]["route"] == "cg":
                continue
            with context.Pool(1) as pool:
                rows.append(pool.apply(large_batch_row, (batch_size, options, steps, threads)))
            print(large_batch_table(rows[-1:]).splitlines()[-1], flush=True)
    write_json(out, {"environment": environment(torch.device("cpu")), "damping": LARGE_DAMPING, "steps": steps,
                     "threads": threads, "rows": rows})
    return rows


def large_batch_table(rows: list[dict[str, Any]]) -> str:
    """The large-batch results as a markdown table."""
    lines = ["| B | gram_memory | route | solve | CG iterations | residual | Sven ms/step | SGD ms/step | Sven/SGD "
             "| Sven/SGD (fastest steps) | peak RSS growth MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        budget = "0 (forced)" if row["options"] else "default"
        residual = "-" if row["residual"] is None else f"{row['residual']:.1e}"
        lines.append(f"| {row['batch_size']} | {budget} | {row['route']} | {row['solve']} "
                     f"| {row['cg_iterations'] if row['cg_iterations'] is not None else '-'} | {residual} "
                     f"| {row['sven_ms']['median_ms']:.0f} | {row['sgd_ms']['median_ms']:.1f} "
                     f"| {row['sven/sgd']:.0f} | {row['sven_ms']['min_ms'] / row['sgd_ms']['min_ms']:.0f} "
                     f"| {row['rss_growth_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method (median of these)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is robust to other processes' load")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: the process's CPU time (with --threads 1, the time the "
                             "step would take on an idle core; CPU only)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default results/step_cost_<device>.json, step_cost_knobs_<device>.json)")
    parser.add_argument("--knobs", action="store_true",
                        help="time the knobs (k < B, randomized/scipy/lobpcg modes, rtol = 0 with damping, "
                             "tiny rtol, rows > P) against SGD and the default step instead")
    parser.add_argument("--large-batch", action="store_true",
                        help="damped steps on MLP 784-64-10 at B = 1024 … 16384: auto and matrix-free (CPU)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(LARGE_BATCHES),
                        help="batch sizes of --large-batch")
    parser.add_argument("--large-steps", type=int, default=2, help="timed Sven steps per row of --large-batch")
    parser.add_argument("--table", action="store_true",
                        help="the full knob table: every knob of TABLE_KNOBS at B = 64 … 16384, against SGD and the "
                             "default step, on the CPU and (when torch.cuda.is_available()) the GPU")
    parser.add_argument("--max-batch", type=int, default=max(TABLE_BATCHES),
                        help="largest B of --table (a quicker run)")
    args = parser.parse_args(argv)
    if args.table:
        if args.threads is not None:
            limit_threads(args.threads)
        devices = [torch.device("cpu"), *([torch.device("cuda")] if torch.cuda.is_available() else [])]
        out = args.out or RESULTS / f"step_cost_table_{'_'.join(device.type for device in devices)}.json"
        rows = run_table([b for b in TABLE_BATCHES if b <= args.max_batch], devices, args.clock, args.warmup, out)
        print(full_table(rows))
        print(skip_reasons(rows))
        print(f"\nwrote {out}")
        return
    if args.large_batch:
        out = args.out or RESULTS / "step_cost_large_batch_cpu.json"
        print(large_batch_table(run_large_batches(args.batches, args.large_steps, args.threads, out)))
        print(f"\nwrote {out}")
        return
    if args.steps < 20:
        parser.error(f"--steps must be >= 20 (medians of at least 20 steps); got {args.steps}")
    if args.threads is not None:
        limit_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures CPU work; use the wall clock on a GPU")
    global clock
    clock = CLOCKS[args.clock]
    if args.knobs:
        out = args.out or RESULTS / f"step_cost_knobs_{device.type}.json"
        print(knob_table(run_knobs(device, args.steps, args.warmup, out)))
        print(f"\nwrote {out}")
        return
    out = args.out or RESULTS / f"step_cost_{device.type}.json"
    rows = run(device, args.steps, args.warmup, out)
    print()
    print(table(rows))
    print(f"\nwrote {out}")
    print(json.dumps({f"{r['model']} B={r['batch_size']}": r["breakdown"] for r in rows}, indent=1))


if __name__ == "__main__":
    main()
