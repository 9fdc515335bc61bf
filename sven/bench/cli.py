"""Command line: ``python -m sven.bench TASK [options]`` runs a study; ``... report`` writes the results page."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sven.bench.append import labels_to_skip, merged
from sven.bench.optimizers import DEFAULT_OPTIMIZERS, OPTIMIZER_NAMES
from sven.bench.pinn import run_pinn
from sven.bench.pinn_problems import PINN_PROBLEMS
from sven.bench.plots import plot_study
from sven.bench.report import write_report
from sven.bench.results import command_line, environment, load_average, read_json, write_json
from sven.bench.studies import LISTED_STUDIES, STUDIES, StudyOptions, result_name, run_study
from sven.bench.tables import summary_table, text_table
from sven.bench.tasks import TASK_BUILDERS
from sven.bench.train import TRACE_EVERY
from sven.bench.verdict import bar_verdict


def _optimizer_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in OPTIMIZER_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer(s) {', '.join(unknown) or '(none given)'}; expected a comma-separated subset of "
            f"{','.join(OPTIMIZER_NAMES)}"
        )
    return names


def _setting(text: str) -> tuple[str, Any]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. lr=0.5); got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text}")
    return value


def study_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m sven.bench TASK``."""
    parser = argparse.ArgumentParser(
        prog="python -m sven.bench",
        description="Reproduce the Sven paper's experiments. `python -m sven.bench report --help` builds the page; "
                    f"`python -m sven.bench {{{','.join(PINN_PROBLEMS)}}} --help` runs the PINN benchmark.",
    )
    parser.add_argument("task", choices=list(TASK_BUILDERS), help="the benchmark task")
    parser.add_argument("--study", choices=list(STUDIES), default="compare",
                        help="compare: all optimizers (Figure 1); k, rtol: Sven sweeps on the training loss "
                             "(Figure 2); microbatch_size, param_fraction: Figure 3; spectrum: Figures 2 and 4; "
                             "lm: Sven variants against Levenberg–Marquardt, Adam and L-BFGS (grids.LM_STUDY); "
                             "demo: the settings tried for the demo (grids.DEMO_STUDY); rmsprop_lr: the RMSProp-scaled "
                             "Sven at each lr of the paper's cross-entropy grid (grids.RMSPROP_LR_STUDY)")
    parser.add_argument("--optimizers", type=_optimizer_list, default=list(DEFAULT_OPTIMIZERS),
                        help=f"comma-separated subset of {','.join(OPTIMIZER_NAMES)}, for --study compare only "
                             f"(default {','.join(DEFAULT_OPTIMIZERS)}; lm needs torch-levenberg-marquardt)")
    parser.add_argument("--epochs", type=_positive, default=None, help="epochs (default: the task's protocol)")
    parser.add_argument("--seeds", type=_positive, default=1, help="seeds 0..N-1 per configuration (default 1)")
    parser.add_argument("--grid", action="store_true", help="grid-search each optimizer (seed 0, final val loss)")
    parser.add_argument("--grid-epochs", type=_positive, default=None,
                        help="epochs of each grid-search run (default: --epochs)")
    parser.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a default setting of every optimizer of a compare run (repeatable); the "
                             "results go to TASK-compare-KEY=VALUE.json")
    parser.add_argument("--append", action="store_true",
                        help=f"for a listed study ({', '.join(LISTED_STUDIES)}) or a compare run without --grid: "
                             "run only the entries (optimizers) that OUT/TASK-STUDY.json does not hold yet, e.g. "
                             "those a stopped compare run left pending, and add their runs to it (same protocol, "
                             "environment and settings, else an error)")
    parser.add_argument("--subset", type=_positive, default=None,
                        help="keep only the first N train and N validation samples")
    parser.add_argument("--trace-every", type=_positive, default=TRACE_EVERY,
                        help=f"optimizer steps between two points of each run's validation trace, the time-to-target "
                             f"clock's resolution (default {TRACE_EVERY}; evaluation is off the training clock)")
    parser.add_argument("--data-dir", default=None, help="folder with the four MNIST IDX .gz files")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for JSON and PNG (bench_out)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=_positive, default=1,
                        help="torch CPU threads (default 1: the paper's models are tiny, extra threads add overhead)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def report_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m sven.bench report``."""
    parser = argparse.ArgumentParser(prog="python -m sven.bench report",
                                     description="Write the results page from the JSON files of earlier runs.")
    parser.add_argument("--results", type=Path, default=Path("docs/results"), help="folder of *.json results")
    parser.add_argument("--figures", type=Path, default=Path("docs/figures"), help="folder for the PNG plots")
    parser.add_argument("--page", type=Path, default=Path("docs/RESULTS.md"), help="the markdown page to write")
    return parser


def run(args: argparse.Namespace, argv: list[str]) -> Path:
    """Run the study the arguments describe, print its table and write ``OUT/TASK-STUDY.{json,png}``
    (with ``--append``: the earlier results there plus the entries they do not hold yet).

    A compare run rewrites its JSON after each optimizer (with ``pending``), so stopping it keeps what finished."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    name = result_name(args.task, args.study, dict(args.overrides))
    json_path = args.out / f"{name}.json"
    started, load_at_start = time.perf_counter(), load_average()
    earlier = read_json(json_path) if args.append else None

    def save(payload: dict[str, Any]) -> dict[str, Any]:
        payload.update(name=name, command=command_line(argv), environment=environment(args.device),
                       total_seconds=time.perf_counter() - started,
                       load_average={"start": load_at_start, "end": load_average()})
        if earlier is not None:
            payload = merged(earlier, payload)
        write_json(json_path, payload)
        return payload

    options = StudyOptions(optimizers=args.optimizers, epochs=args.epochs, seeds=args.seeds, grid=args.grid,
                           grid_epochs=args.grid_epochs, subset=args.subset, trace_every=args.trace_every,
                           device=args.device, data_dir=args.data_dir, progress=not args.no_progress,
                           overrides=dict(args.overrides), checkpoint=save)
    if earlier is not None:
        options.skip_labels = labels_to_skip(earlier, args.study, args.task, options, environment(args.device))
    payload = save(run_study(args.study, args.task, options))
    figure = plot_study(payload, args.out / f"{name}.png")
    if payload["runs"]:
        print(text_table(*summary_table(payload)))
    if payload["study"] == "lm":
        print("\n".join(bar_verdict(payload)))
    print(f"wrote {json_path}" + (f" and {figure}" if figure else ""))
    return json_path


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m sven.bench`` and the ``sven-bench`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        args = report_parser().parse_args(argv[1:])
        print(f"wrote {write_report(args.results, args.figures, args.page)}")
        return
    if argv[:1] and argv[0] in PINN_PROBLEMS:
        run_pinn(argv)
        return
    try:
        run(study_parser().parse_args(argv), argv)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from error
