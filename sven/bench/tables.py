"""Summary tables of a study payload: one row per run label, mean ± std over seeds of the final values."""

from __future__ import annotations

import json
from typing import Any

from sven.bench.plots import group_runs
from sven.bench.results import final, mean_std, median_of_last, seconds_per_epoch


def _mean_std_text(values: list[float], number: str = ".3e", spread: str = ".1e") -> str:
    mean, std = mean_std(values)
    return f"{mean:{number}} ± {std:{spread}}" if len(values) > 1 else f"{mean:{number}}"


def settings_text(settings: dict[str, Any]) -> str:
    return json.dumps(settings, separators=(", ", "=")).strip("{}").replace('"', "")


def _losses_row(runs: list[dict[str, Any]]) -> list[str]:
    accuracies = [run["history"]["val_accuracy"][-1] for run in runs]
    accuracy = _mean_std_text([100 * a for a in accuracies], ".2f", ".2f") if None not in accuracies else "–"
    return [
        _mean_std_text([final(run, "train_loss") for run in runs]),
        _mean_std_text([final(run, "val_loss") for run in runs]),
        accuracy,
        f"{mean_std([run['history']['wall_time'][-1] for run in runs])[0]:.2f}",
        f"{sum(run['diverged'] for run in runs)}/{len(runs)}",
    ]


LOSS_HEADERS = ["final train loss", "final val loss", "val accuracy (%)", "wall time (s)", "diverged"]
MEDIAN_EPOCHS = 10
LM_STUDY_HEADERS = ["optimizer", "settings", "final val MSE", f"median val MSE, last {MEDIAN_EPOCHS} epochs",
                    "s/epoch (training)", "diverged"]


def _lm_study_row(runs: list[dict[str, Any]]) -> list[str]:
    return [
        _mean_std_text([final(run) for run in runs]),
        _mean_std_text([median_of_last(run, MEDIAN_EPOCHS) for run in runs]),
        _mean_std_text([seconds_per_epoch(run) for run in runs], ".3f", ".3f"),
        f"{sum(run['diverged'] for run in runs)}/{len(runs)}",
    ]


def summary_table(payload: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) summarising a study payload."""
    groups = group_runs(payload["runs"])
    if payload["study"] == "spectrum":
        headers = ["run", "epochs", "rank kept (first → last epoch)", "σ_max (first → last)",
                   "σ_min/σ_max kept (last)"]
        rows = []
        for label, (run, *_) in groups.items():
            spectra = [s for s in run["history"]["singular_values"] if s]
            if not spectra:
                rows.append([label, "0", "–", "–", "–"])
                continue
            rows.append([label, str(len(spectra)), f"{len(spectra[0])} → {len(spectra[-1])}",
                         f"{spectra[0][0]:.2e} → {spectra[-1][0]:.2e}", f"{spectra[-1][-1] / spectra[-1][0]:.1e}"])
        return headers, rows
    if payload["study"] == "lm":
        return LM_STUDY_HEADERS, [[label, settings_text(runs[0]["settings"]), *_lm_study_row(runs)]
                                  for label, runs in groups.items()]
    headers = ["optimizer" if payload["study"] == "compare" else "setting", "settings", *LOSS_HEADERS]
    rows = [[label, settings_text(runs[0]["settings"]), *_losses_row(runs)] for label, runs in groups.items()]
    return headers, rows


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [headers, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
