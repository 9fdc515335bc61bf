"""The results page's time-to-target section, from the validation traces of compare and ``lm`` study runs.

Per study: the training seconds each optimizer needs to reach Adam's and Levenberg–Marquardt's final
validation loss (same seed), Sven with κ = 1 and adaptive λ racing LM on every level LM reaches, and
validation loss against wall time (the paper's Figure 1, bottom).
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

from sven.bench.plots import group_runs, plot_curves
from sven.bench.results import studies_of
from sven.bench.tables import markdown_table, settings_text
from sven.bench.timing import final_val_loss, race, time_to_target
from sven.bench.train import TRACE_EVERY

RUNNER = "sven-gn-damped"
LM = "lm"
ADAM = "adam"


def reference_label(payload: dict[str, Any], optimizer: str) -> str | None:
    """The label of the payload's reference run of ``optimizer``: the one the payload names, else its first."""
    named = payload.get({ADAM: "time_reference", LM: "lm_reference"}[optimizer])
    groups = group_runs(payload["runs"])
    if named in groups:
        return named
    return next((label for label, runs in groups.items() if runs[0]["optimizer"] == optimizer), None)


def seconds_text(values: list[float | None]) -> str:
    """"mean s (reached/seeds)" over the seeds that reach the target, or "never (0/seeds)"."""
    reached = [value for value in values if value is not None]
    if not reached:
        return f"never (0/{len(values)})"
    return f"{statistics.fmean(reached):.2f} ({len(reached)}/{len(values)})"


def target_table(payload: dict[str, Any], references: list[str]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): per label, its training seconds and the seconds to each reference's final validation loss."""
    groups = group_runs(payload["runs"])
    targets = {label: {run["seed"]: final_val_loss(run) for run in groups[label]} for label in references}
    headers = ["optimizer", "settings", "training s", *(f"s to {label}'s final" for label in references)]
    rows = []
    for label, runs in groups.items():
        cells = [seconds_text([time_to_target(run, targets[reference][run["seed"]]) for run in runs
                               if run["seed"] in targets[reference]]) for reference in references]
        seconds = statistics.fmean(run["history"]["wall_time"][-1] for run in runs)
        rows.append([label, settings_text(runs[0]["settings"]), f"{seconds:.2f}", *cells])
    return headers, rows


def race_lines(payload: dict[str, Any], lm: str) -> list[str]:
    """Per Sven κ = 1 adaptive-λ label: on how many of the levels LM reaches it is no later than LM, per seed."""
    groups = group_runs(payload["runs"])
    lm_runs = {run["seed"]: run for run in groups[lm]}
    lines = []
    for label, runs in groups.items():
        if runs[0]["optimizer"] != RUNNER:
            continue
        races = {run["seed"]: race(run, lm_runs[run["seed"]]) for run in runs if run["seed"] in lm_runs}
        met = all(each.levels_first == len(each.levels) for each in races.values())
        per_seed = "; ".join(f"seed {seed}: {each.levels_first}/{len(each.levels)} levels, worst time ratio "
                             f"{each.worst_ratio:.2g}" for seed, each in races.items())
        lines.append(f"- `{label}` reaches every level `{lm}` reaches no later than `{lm}`: "
                     f"**{'yes' if met else 'no'}** ({per_seed}).")
    return lines or [f"- No `{RUNNER}` run in this study to race `{lm}`."]


def _time_figure(payload: dict[str, Any], figures: Path, page: Path) -> str:
    groups = {label: [{"history": run["trace"], "diverged": run["diverged"]} for run in runs]
              for label, runs in group_runs(payload["runs"]).items()}
    figure = plot_curves(groups, figures / f"{payload['name']}-time.png",
                         f"{payload['task']}: validation loss against training time", xs=("wall_time",))
    return f"![{payload['name']} against time]({Path(os.path.relpath(figure, page.parent)).as_posix()})"


def timing_lines(payloads: list[dict[str, Any]], figures: Path, page: Path) -> list[str]:
    """Markdown lines of the section for every compare or ``lm`` payload whose runs carry a trace."""
    traced = [payload for payload in studies_of(payloads, "compare", "lm")
              if all("trace" in run for run in payload["runs"]) and reference_label(payload, ADAM)]
    if not traced:
        return []
    lines = ["## Time to target", "",
             "Training seconds (the clock stops during evaluation; validation loss recorded every "
             f"{TRACE_EVERY} optimizer steps, unless a study says otherwise (`--trace-every`), and at each epoch's "
             "end) until a run's validation loss first reaches "
             "Adam's and LM's final validation loss on the same seed: mean over the seeds that reach it "
             "(reached/seeds). "
             f"LM is torch-levenberg-marquardt; one LM step with damping λ equals `{RUNNER}` (Sven, κ = 1) with "
             "damping B·λ, so `damping_init` = B × LM's starting λ (1e-3) gives both the same first step.", ""]
    for payload in traced:
        lm = reference_label(payload, LM)
        references = [reference_label(payload, ADAM), *([lm] if lm else [])]
        lines += [f"### {payload['name']}", ""]
        every = payload["options"].get("trace_every", TRACE_EVERY)
        if every != TRACE_EVERY:
            lines += [f"Validation trace every {every} optimizer steps.", ""]
        lines += [markdown_table(*target_table(payload, references)), ""]
        if lm:
            lines += race_lines(payload, lm)
        else:
            reason = (payload.get("skipped") or {}).get(LM, "it is not part of this study")
            lines.append(f"- No LM run: {reason}")
        lines += ["", _time_figure(payload, figures, page), ""]
    return lines
