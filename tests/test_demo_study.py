"""The demo study: its table on the results page, and the committed results (docs/results/toy1d-demo.json) against
the study and the defaults in ``sven.bench.grids``."""

from __future__ import annotations

from pathlib import Path

from sven.bench.append import labels_to_skip
from sven.bench.demo_report import seed_table
from sven.bench.grids import DEMO_REFERENCE, DEMO_STUDY, default_settings
from sven.bench.plots import group_runs
from sven.bench.results import final, read_json
from sven.bench.studies import StudyOptions, entry_label

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "toy1d-demo.json"


def epochs_run(label: str, seed: int, val_loss: list[float]) -> dict[str, object]:
    """A run labelled ``label`` on ``seed`` (Adam at a setting that is not its default) whose validation loss per
    epoch (epoch 0 first) is ``val_loss``."""
    return {"label": label, "optimizer": "adam", "settings": {"lr": 1.0}, "loss_kind": "regression", "batch_size": 32,
            "seed": seed, "diverged": False, "history": {"val_loss": val_loss}}


def test_the_seed_table_counts_final_losses_and_medians_of_the_last_epochs_below_adam() -> None:
    """Adam's last five epochs have median 0.2 and end at 0.05; "spike" ends above it from a low plateau, "late"
    ends below it after a high one."""
    adam = [1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    runs = [epochs_run("adam", seed, adam) for seed in (0, 1)]
    runs += [epochs_run("spike", 0, [1.0, *[0.01] * 5, 0.9]), epochs_run("spike", 1, [1.0, *[0.01] * 6])]
    runs += [epochs_run("late", seed, [1.0, *[0.9] * 5, 0.01]) for seed in (0, 1)]
    headers, rows = seed_table({"runs": runs, "reference": "adam"})
    assert headers[-3:] == ["below Adam", "max ratio to Adam", "below Adam, median of the last 5 epochs"]
    assert rows[0][2:] == ["5.0e-02", "5.0e-02", "0/2", "1", "0/2"]
    assert rows[1][2:] == ["9.0e-01", "1.0e-02", "1/2", "18", "2/2"]
    assert rows[2][2:] == ["1.0e-02", "1.0e-02", "2/2", "0.2", "0/2"]


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
