"""The results page's section on the demo's settings: every setting of a ``demo`` study against Adam, seed by seed."""

from __future__ import annotations

from typing import Any

from sven.bench.append import appended_lines
from sven.bench.grids import default_settings
from sven.bench.plots import group_runs
from sven.bench.results import final, median_of_last, studies_of
from sven.bench.tables import markdown_table, settings_text


def is_default(run: dict[str, Any]) -> bool:
    """Whether the run used its optimizer's current default settings for its task."""
    return run["settings"] == default_settings(run["optimizer"], run["loss_kind"], run["batch_size"])


LAST_EPOCHS = 5
"""The epochs at the end of a run whose median the table also compares with Adam's (a run stopped at another epoch)."""


def seed_table(payload: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): one row per setting with its final validation loss on every seed of the reference (Adam),
    the number of seeds on which it ends below the reference, its largest ratio to the reference, and the number
    of seeds on which the median of its last ``LAST_EPOCHS`` epochs is below the reference's."""
    groups = group_runs(payload["runs"])
    reference = {run["seed"]: final(run) for run in groups[payload["reference"]]}
    reference_median = {run["seed"]: median_of_last(run, LAST_EPOCHS) for run in groups[payload["reference"]]}
    headers = ["setting", "settings", *(f"seed {seed}" for seed in reference), "below Adam", "max ratio to Adam",
               f"below Adam, median of the last {LAST_EPOCHS} epochs"]
    rows = []
    for label, runs in groups.items():
        finals = {run["seed"]: final(run) for run in runs}
        medians = {run["seed"]: median_of_last(run, LAST_EPOCHS) for run in runs}
        ratios = [finals[seed] / reference[seed] for seed in reference if seed in finals]
        below_median = sum(medians[seed] < reference_median[seed] for seed in reference if seed in medians)
        name = f"**{label}** (default)" if is_default(runs[0]) else label
        rows.append([name, settings_text(runs[0]["settings"]),
                     *(f"{finals[seed]:.1e}" if seed in finals else "–" for seed in reference),
                     f"{sum(ratio < 1 for ratio in ratios)}/{len(reference)}", f"{max(ratios):.2g}",
                     f"{below_median}/{len(reference)}"])
    return headers, rows


def demo_lines(payloads: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the section, one table per ``demo`` study payload (none without such a payload)."""
    studies = studies_of(payloads, "demo")
    if not studies:
        return []
    lines = ["## The demo's settings", "",
             "`python -m sven.demo` trains toy1d (20 epochs) with `sven` (the exact step, damping 0), `sven-damped` "
             "(adaptive λ from `damping_init`) and Adam (lr = 1e-3), each at its default settings. The `demo` study "
             "ran every setting tried for the two Sven variants on seeds 0–9; final validation MSE per seed, and on "
             f"how many seeds the median of the last {LAST_EPOCHS} epochs is below Adam's (a comparison that does not "
             "hang on the last epoch alone). "
             "Bold: the defaults the demo uses now, for each variant a setting that ends below Adam on the most "
             "seeds and on seed 0, the demo's default seed.", ""]
    for payload in studies:
        lines += [f"### {payload['name']}", "", f"Command: `{payload['command']}`", "", *appended_lines(payload),
                  markdown_table(*seed_table(payload)), ""]
    return lines
