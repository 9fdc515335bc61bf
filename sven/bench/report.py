"""The results page: docs/RESULTS.md generated from the JSON files of earlier ``python -m sven.bench`` runs.

Every number on the page is read from those files; the only constants here are the
paper's own reported values, quoted as the claims we compare against.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sven.bench.append import appended_lines
from sven.bench.demo_report import demo_lines
from sven.bench.optimizers import SVEN_VARIANTS
from sven.bench.plots import group_runs, plot_study
from sven.bench.results import final, mean_std, read_json, studies_of
from sven.bench.studies import STUDIES
from sven.bench.tables import markdown_table, summary_table
from sven.bench.target_report import timing_lines
from sven.bench.tasks import TASK_BUILDERS
from sven.bench.verdict import bar_verdict

PAPER_CLAIMS: dict[str, dict[str, Any]] = {
    "toy1d": {"text": "Sven reaches a clearly lower validation loss than Adam (the authors report about "
                      "3e-6 for Sven against 6e-5 for Adam)",
              "rule": "Sven's mean final validation loss is below half of Adam's", "max_ratio": 0.5},
    "mnist-regression": {"text": "Sven at least matches Adam on MNIST label regression",
                         "rule": "Sven's mean final validation loss is at most 1.1 × Adam's", "max_ratio": 1.1},
}
NOTES_FILE = "NOTES.md"
PROTOCOL_SCRIPT = "run_protocol.sh"


def load_payloads(results: Path) -> list[dict[str, Any]]:
    """Every results JSON in ``results``, ordered by task then study as the command line lists them."""
    payloads = [read_json(path) for path in sorted(results.glob("*.json"))]
    if not payloads:
        raise FileNotFoundError(f"no *.json results in {results.resolve()}; run `python -m sven.bench TASK --out "
                                f"{results}` first")
    tasks, studies = list(TASK_BUILDERS), list(STUDIES)
    return sorted(payloads, key=lambda p: (tasks.index(p["task"]), studies.index(p["study"]), p["name"]))


def _machine_section(payloads: list[dict[str, Any]]) -> list[str]:
    keys = ("cpu", "device", "torch_threads", "torch", "sven", "python", "platform")
    machines = {tuple(str(p["environment"].get(key)) for key in keys) for p in payloads}
    lines = ["## Machine", ""]
    for machine in sorted(machines):
        lines += [f"- {key}: `{value}`" for key, value in zip(keys, machine)] + [""]
    total = sum(p["total_seconds"] for p in payloads)
    lines.append(f"Total wall time of the runs on this page: {total / 60:.1f} min.")
    return lines + [""]


def _per_seed(runs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{final(run):.1e}" for run in runs)


def _claim_lines(payloads: list[dict[str, Any]]) -> list[str]:
    lines = ["## The paper's claims", "",
             "`sven` is the paper's exact step; `sven-damped` adds adaptive Levenberg–Marquardt damping "
             "(not in the paper). Every compare run of the task counts, each under its label.", ""]
    for task, claim in PAPER_CLAIMS.items():
        groups: dict[str, list[dict[str, Any]]] = {}
        for payload in payloads:
            if payload["task"] == task and payload["study"] == "compare":
                groups.update(group_runs(payload["runs"]))
        variants = [label for label, runs in groups.items() if runs[0]["optimizer"] in SVEN_VARIANTS]
        if not variants or "adam" not in groups:
            lines.append(f"- **{task}** — claim: {claim['text']}. Not run here (no compare result with Sven and Adam).")
            continue
        lines.append(f"- **{task}** — claim: {claim['text']}. Rule: {claim['rule']}.")
        adam_mean, adam_std = mean_std([final(run) for run in groups["adam"]])
        for label in variants:
            sven_mean, sven_std = mean_std([final(run) for run in groups[label]])
            ratio = sven_mean / adam_mean
            verdict = "**reproduced**" if ratio <= claim["max_ratio"] else "**not reproduced**"
            lines.append(
                f"  - `{label}` over {len(groups[label])} seed(s): {sven_mean:.2e} ± {sven_std:.1e} against Adam "
                f"{adam_mean:.2e} ± {adam_std:.1e}, ratio {label}/Adam {ratio:.2g} → {verdict} "
                f"(per seed: {label} {_per_seed(groups[label])}; Adam {_per_seed(groups['adam'])})."
            )
    return lines + [""]


def _bar_lines(payloads: list[dict[str, Any]]) -> list[str]:
    studies = studies_of(payloads, "lm")
    if not studies:
        return []
    lines = ["## Sven against Levenberg–Marquardt", "",
             "From the `lm` studies below: every Sven variant, `lm` (torch-levenberg-marquardt, its defaults), "
             "Adam and L-BFGS on the same data, initial weights and batch order per seed.", ""]
    for payload in studies:
        lines += [f"### {payload['task']}", "", *bar_verdict(payload)]
    return lines


def _options_text(payload: dict[str, Any]) -> str:
    options = payload["options"]
    first = payload["runs"][0] if payload["runs"] else None
    epochs = options["epochs"] or (first["epochs"] if first else "task default")
    parts = [f"epochs {epochs}", f"seeds {options['seeds']}"]
    if first:
        parts.append(f"{first['train_size']} train / {first['val_size']} validation samples")
    if options["grid"]:
        parts.append(f"grid search on seed 0, {options['grid_epochs'] or epochs} epoch(s) per configuration")
    else:
        parts.append("default settings (no grid search)")
    return ", ".join(parts)


def _grid_lines(payload: dict[str, Any]) -> list[str]:
    searches = payload.get("grid_search") or {}
    if not searches:
        return []
    rows = []
    for optimizer, tried in searches.items():
        best = min(tried, key=lambda entry: entry["final_val_loss"] if entry["final_val_loss"] is not None
                   else float("inf"))
        finite = [entry for entry in tried if entry["final_val_loss"] is not None]
        rows.append([optimizer, str(len(tried)), str(len(tried) - len(finite)), str(best["settings"]),
                     f"{best['final_val_loss']:.3e}"])
    return ["Grid search:", "", markdown_table(["optimizer", "configurations", "diverged", "best", "its val loss"],
                                                rows), ""]


def _study_section(payload: dict[str, Any], figures: Path, page: Path) -> list[str]:
    lines = [f"### {payload['name']}", "", f"Command: `{payload['command']}`", "",
             f"Protocol: {_options_text(payload)}.", ""]
    if "load_average" in payload:
        load = payload["load_average"]
        lines += [f"Machine load (1/5/15-min load average): {'/'.join(map(str, load['start']))} at the start, "
                  f"{'/'.join(map(str, load['end']))} at the end.", ""]
    lines += appended_lines(payload)
    for optimizer, reason in (payload.get("skipped") or {}).items():
        lines += [f"Skipped {optimizer}: {reason}", ""]
    if payload.get("pending"):
        lines += [f"Incomplete: the run was stopped before {', '.join(payload['pending'])} ran.", ""]
    if not payload["runs"]:
        return lines + ["No run completed.", ""]
    lines += [markdown_table(*summary_table(payload)), ""]
    lines += _grid_lines(payload)
    figure = plot_study(payload, figures / f"{payload['name']}.png")
    if figure:
        lines += [f"![{payload['name']}]({Path(os.path.relpath(figure, page.parent)).as_posix()})", ""]
    return lines


def write_report(results: Path, figures: Path, page: Path) -> Path:
    """Write ``page`` (markdown) and its plots in ``figures`` from the JSON files in ``results``.

    A ``NOTES.md`` in ``results`` (the analysis in words) is appended verbatim.
    """
    payloads = load_payloads(results)
    relative_results = os.path.relpath(results, page.parent)
    lines = ["# Results: reproducing the Sven paper's experiments", "",
             f"Generated by `python -m sven.bench report --results {results} --figures {figures} --page {page}` "
             f"from the JSON files in [{relative_results}]({relative_results}); every number below is read from "
             "them. Do not edit by hand.", ""]
    lines += ["## How to reproduce", "", "```", *(payload["command"] for payload in payloads),
              f"python -m sven.bench report --results {results} --figures {figures} --page {page}", "```", ""]
    protocol = results / PROTOCOL_SCRIPT
    if protocol.is_file():
        lines += [f"The same commands, in order: [{PROTOCOL_SCRIPT}]({os.path.relpath(protocol, page.parent)}).", ""]
    lines += demo_lines(payloads)
    lines += _machine_section(payloads)
    lines += _claim_lines(payloads)
    lines += timing_lines(payloads, figures, page)
    lines += _bar_lines(payloads)
    lines += ["## Studies", ""]
    for payload in payloads:
        lines += _study_section(payload, figures, page)
    notes = results / NOTES_FILE
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines))
    return page
