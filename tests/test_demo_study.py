"""The committed demo study (docs/results/toy1d-demo.json) against the study and defaults in ``sven.bench.grids``."""

from __future__ import annotations

from pathlib import Path

from sven.bench.append import labels_to_skip
from sven.bench.grids import DEMO_REFERENCE, DEMO_STUDY, default_settings
from sven.bench.plots import group_runs
from sven.bench.results import final, read_json
from sven.bench.studies import StudyOptions, entry_label

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "toy1d-demo.json"


def test_the_committed_demo_study_holds_every_entry_as_the_study_runs_it_now() -> None:
    payload = read_json(RESULTS)
    options = StudyOptions(epochs=payload["options"]["epochs"], seeds=payload["options"]["seeds"])
    held = labels_to_skip(payload, "demo", "toy1d", options, payload["environment"])
    assert held == tuple(entry_label(optimizer, overrides) for optimizer, overrides in DEMO_STUDY)


def test_the_demo_defaults_of_both_sven_variants_end_below_adam_on_every_seed() -> None:
    """The issue's requirement, read from the committed study: the runs with each variant's current default
    settings end below Adam's final validation loss on every seed."""
    payload = read_json(RESULTS)
    groups = group_runs(payload["runs"])
    adam = {run["seed"]: final(run) for run in groups[DEMO_REFERENCE]}
    assert sorted(adam) == list(range(10))
    for variant in ("sven", "sven-damped"):
        default = default_settings(variant, "regression", 32)
        runs = [run for run in payload["runs"] if run["optimizer"] == variant and run["settings"] == default]
        assert sorted(run["seed"] for run in runs) == sorted(adam), variant
        assert all(final(run) < adam[run["seed"]] for run in runs), variant
