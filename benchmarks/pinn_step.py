"""Step time of Sven on a PDE residual: the Taylor and Gram engines against engine="functorch", B = 1024.

    python benchmarks/pinn_step.py [--rounds 31]

Poisson 2-D of the PINN benchmark (``sven.bench.pinn_problems.poisson2d``: tanh 2→64→1, P = 257, float64,
input derivatives by ``sven.pde``), B = 1024 collocation points (904 interior, 120 boundary), one thread.
Residual forms: kappa = 1 on the squared residual w·r² (what the PINN benchmark steps) and kappa = 2 on the
signed residual √w·r (the same Gauss–Newton step). Solve routes (rows 1024 > P: the P × P side Mᵀ M):
rtol = 1e-3 (the spectrum is cut: eigh), λ = 1e-2 with rtol = 0 (nothing is cut: Cholesky) and the PINN
benchmark's setting (rtol = 1e-8, line_search: "auto" takes "lq").
Each round restores the same parameters before every step and times loss_and_grad, then step(), of the three
engines in turn (the order reverses every other round), in process CPU time; the table gives medians over the
rounds and, for "taylor" and "gram", the ratio to "functorch" of the whole step (loss_and_grad + step()) as
the median of the per-round ratios. Their steps are compared with functorch's (relative difference).
The floor of an exact step on the eigh and Cholesky routes is timed in the same rounds: the residuals' forward pass
alone (no derivatives), Mᵀ M of the functorch engine's M by ``column_gram`` and ``top_eigh`` (or the Cholesky) of
it. Any engine computing the same step does at least that work, so floor / (functorch whole step) bounds the
ratio from below (a free backward pass and a free M included).
Then each engine's peak memory over steps on the eigh route (``step_cost.step_peak_memory_mb``: glibc's heap in
use above what a first step left).
Writes benchmarks/results/pinn_step_cpu.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from step_cost import step_peak_memory_mb
from torch import Tensor
from torch.nn.utils import parameters_to_vector

from sven.bench.pinn_problems import poisson2d
from sven.bench.pinn_steppers import signed_residuals
from sven.bench.results import environment, load_average, write_json
from sven.nn import SvenWrapper
from sven.opt import Sven
from sven.opt.eigen import top_eigh
from sven.opt.lapack import column_gram
from sven.pde import condition_losses

ENGINES = ("taylor", "gram", "functorch")
REFERENCE = "functorch"
FORMS = {"kappa=1 w·r²": (condition_losses, 1.0), "kappa=2 √w·r": (signed_residuals, 2.0)}
ROUTES = {
    "rtol 1e-3 (eigh)": {"rtol": 1e-3},
    "λ 1e-2, rtol 0 (Cholesky)": {"rtol": 0.0, "damping": 1e-2},
    "rtol 1e-8, line_search (lq)": {"rtol": 1e-8, "line_search": True, "max_tries": 30},
}
FLOOR_ROUTES = {"rtol 1e-3 (eigh)": "eigh", "λ 1e-2, rtol 0 (Cholesky)": "cholesky"}
"""The routes whose floor is timed, and the factorisation each one needs."""
RESULT = Path(__file__).parent / "results" / "pinn_step_cpu.json"


class TimedStep:
    """One engine, residual form and route on its own wrapper and optimizer over the shared model."""

    def __init__(self, model: torch.nn.Module, engine: str, form: str, route: str) -> None:
        loss_fn, kappa = FORMS[form]
        self.wrapped = SvenWrapper(model, loss_fn, kappa=kappa, engine=engine)
        self.optimizer = Sven(self.wrapped, lr=1.0, k=1024, **ROUTES[route])
        self.times: dict[str, list[float]] = {"loss_and_grad": [], "step": [], "total": []}
        self.jacobian: Tensor | None = None

    def run(self, batch: tuple[Tensor, ...]) -> None:
        """Time loss_and_grad and step() in process CPU time; keep the step's Jacobian M (B, P) as ``jacobian``."""
        started = time.process_time()
        self.wrapped.loss_and_grad(batch)
        between = time.process_time()
        operator = self.wrapped.state.operator
        self.optimizer.step()
        ended = time.process_time()
        self.jacobian = operator.dense()
        for key, seconds in (("loss_and_grad", between - started), ("step", ended - between),
                             ("total", ended - started)):
            self.times[key].append(seconds)


def process_ms(work: Callable[[], object]) -> float:
    """Process CPU milliseconds of one call of ``work``."""
    started = time.process_time()
    work()
    return 1e3 * (time.process_time() - started)


def floor_parts(model: torch.nn.Module, batch: tuple[Tensor, ...], jacobian: Tensor) -> dict[str, float]:
    """ms of the work every exact step shares: forward alone, Mᵀ M of ``jacobian`` (B, P), its eigh and Cholesky."""
    x, *rest = batch
    with torch.no_grad():
        forward = process_ms(lambda: condition_losses(model(x), *rest))
    normal = column_gram(jacobian)
    shifted = normal + 1e-2 * torch.eye(normal.shape[0], dtype=normal.dtype)
    return {"forward": forward, "MᵀM": process_ms(lambda: column_gram(jacobian)),
            "eigh": process_ms(lambda: top_eigh(normal, jacobian.shape[0])),
            "cholesky": process_ms(lambda: torch.linalg.cholesky(shifted))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args()
    torch.set_num_threads(1)
    problem = poisson2d()
    torch.manual_seed(0)
    model = problem.build_model()
    batch = problem.data(0, interior=904, boundary=120).batch
    params = list(model.parameters())
    start = parameters_to_vector(params).detach().clone()
    configs = {(form, route): {engine: TimedStep(model, engine, form, route) for engine in ENGINES}
               for form in FORMS for route in ROUTES}
    load_at_start = load_average()
    steps: dict[tuple[str, str], dict[str, Tensor]] = {}
    floors: dict[str, list[float]] = {}
    for round_index in range(args.rounds + 1):
        for key, engines in configs.items():
            for engine in ENGINES[::-1] if round_index % 2 else ENGINES:
                with torch.no_grad():
                    for param, value in zip(params, start.split([p.numel() for p in params])):
                        param.copy_(value.view_as(param))
                engines[engine].run(batch)
                steps.setdefault(key, {})[engine] = parameters_to_vector(params).detach() - start
        jacobian = configs[next(iter(configs))]["functorch"].jacobian
        for part, ms in floor_parts(model, batch, jacobian).items():
            floors.setdefault(part, []).append(ms)
    floor_ms = {part: statistics.median(values[1:]) for part, values in floors.items()}
    memory_route = next(iter(configs))
    peak_mb = {engine: step_peak_memory_mb(lambda timed=configs[memory_route][engine]: timed.run(batch),
                                           torch.device("cpu"))
               for engine in ENGINES}
    rows = []
    for (form, route), engines in configs.items():
        reference = engines[REFERENCE].times["total"][1:]
        reference_step = steps[form, route][REFERENCE]
        rows.append({
            "form": form, "route": route,
            **{f"{engine} {part} ms": 1e3 * statistics.median(engines[engine].times[part][1:])
               for engine in ENGINES for part in ("loss_and_grad", "step", "total")},
            **{f"{engine} / {REFERENCE}": statistics.median(
                own / other for own, other in zip(engines[engine].times["total"][1:], reference))
               for engine in ENGINES if engine != REFERENCE},
            **{f"{engine} step difference": float((steps[form, route][engine] - reference_step).norm()
                                                  / reference_step.norm())
               for engine in ENGINES if engine != REFERENCE},
        })
        if route in FLOOR_ROUTES:
            floor = floor_ms["forward"] + floor_ms["MᵀM"] + floor_ms[FLOOR_ROUTES[route]]
            rows[-1].update({"floor ms": floor, "floor / functorch": floor / rows[-1]["functorch total ms"]})
    load = {"start": load_at_start, "end": load_average()}
    print(f"Poisson 2-D, tanh 2→64→1 (P = 257), B = 1024, float64, one thread, process CPU time, "
          f"median of {args.rounds} rounds; load average {load}")
    print(f"| residual form | route | engine | loss_and_grad | step() | whole step | / {REFERENCE} |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for engine in ENGINES:
            ratio = f"{row[f'{engine} / {REFERENCE}']:.2f}" if engine != REFERENCE else ""
            print(f"| {row['form']} | {row['route']} | {engine} | {row[f'{engine} loss_and_grad ms']:.1f} ms | "
                  f"{row[f'{engine} step ms']:.1f} ms | {row[f'{engine} total ms']:.1f} ms | {ratio} |")
    print(f"relative difference of each engine's step from {REFERENCE}'s: " + ", ".join(
        f"{row['form']}, {row['route']}, {engine}: {row[f'{engine} step difference']:.1e}"
        for row in rows for engine in ENGINES if engine != REFERENCE))
    print("floor of an exact step (ms, medians): " + ", ".join(f"{part} {ms:.2f}" for part, ms in floor_ms.items()))
    print("| residual form | route | floor | floor / functorch whole step |")
    print("|---|---|---|---|")
    for row in rows:
        if "floor ms" in row:
            print(f"| {row['form']} | {row['route']} | {row['floor ms']:.1f} ms | {row['floor / functorch']:.2f} |")
    print(f"peak memory of a step ({memory_route[0]}, {memory_route[1]}), MB: "
          + ", ".join(f"{engine} {mb:.1f}" for engine, mb in peak_mb.items()))
    write_json(RESULT, {"rounds": args.rounds, "rows": rows, "floor_ms": floor_ms, "peak_memory_mb": peak_mb,
                        "load_average": load, "environment": environment("cpu")})
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
