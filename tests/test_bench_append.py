"""``--append``: a listed study runs only the entries its earlier results lack, and refuses results it cannot extend."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch

from sven.bench.append import appended_lines, labels_to_skip, merged
from sven.bench.cli import main
from sven.bench.grids import DEMO_STUDY, HYPERPARAMETERS, entry_settings
from sven.bench.results import environment, read_json, write_json
from sven.bench.studies import LISTED_STUDIES, StudyOptions, entry_label, switched_on
from sven.opt.options import StepSettings

ARGS = ("toy1d", "--study", "demo", "--epochs", "1", "--subset", "64", "--no-progress")


def test_append_runs_only_the_missing_entries_and_matches_a_full_run(tmp_path: Path) -> None:
    main([*ARGS, "--out", str(tmp_path)])
    path = tmp_path / "toy1d-demo.json"
    full = read_json(path)
    labels = list(dict.fromkeys(run["label"] for run in full["runs"]))
    assert labels == [entry_label(optimizer, overrides) for optimizer, overrides in DEMO_STUDY]
    kept = labels[::2]
    earlier = {**full, "runs": [run for run in full["runs"] if run["label"] in kept]}
    write_json(path, earlier)
    main([*ARGS, "--out", str(tmp_path), "--append"])
    after = read_json(path)
    assert [run["label"] for run in after["runs"]] == [run["label"] for run in full["runs"]]
    for run, expected in zip(after["runs"], full["runs"]):
        if run["label"] in kept:
            assert run == expected
        else:
            assert run["history"]["val_loss"] == expected["history"]["val_loss"], run["label"]
    (added,) = after["appended"]
    assert added["labels"] == [label for label in labels if label not in kept]
    assert added["command"].endswith("--append")
    assert after["command"] == full["command"] and after["options"] == full["options"]
    assert after["total_seconds"] == pytest.approx(full["total_seconds"] + added["total_seconds"])
    assert appended_lines(after)[0].startswith(f"Added by `{added['command']}`: {added['labels'][0]}, ")


def synthetic_payload() -> dict[str, Any]:
    """A demo payload on seeds 0–1 holding the first two entries of DEMO_STUDY, as the study would run them now."""
    runs = [{"label": entry_label(optimizer, overrides), "optimizer": optimizer, "seed": seed,
             "loss_kind": "regression", "batch_size": 32,
             "settings": entry_settings(optimizer, overrides, "regression", 32)}
            for optimizer, overrides in DEMO_STUDY[:2] for seed in (0, 1)]
    torch.set_num_threads(1)
    return {"study": "demo", "task": "toy1d", "runs": runs, "skipped": {}, "total_seconds": 2.0,
            "options": {"epochs": 3, "seeds": 2, "subset": None, "device": "cpu", "grid": False},
            "environment": environment("cpu")}


def test_labels_to_skip_are_the_entries_held_and_merged_keeps_the_study_order() -> None:
    """The synthetic payload records no trace_every, as results written before the option: they traced every 50."""
    earlier = synthetic_payload()
    assert "trace_every" not in earlier["options"]
    options = StudyOptions(epochs=3, seeds=2)
    held = labels_to_skip(earlier, "demo", "toy1d", options, environment("cpu"))
    assert held == tuple(entry_label(optimizer, overrides) for optimizer, overrides in DEMO_STUDY[:2])
    last = entry_label(*DEMO_STUDY[-1])
    added = {"runs": [{"label": last, "seed": 0}, {"label": held[0], "seed": 2}], "skipped": {},
             "command": "c --append", "total_seconds": 1.0, "load_average": {"start": [1, 2, 3], "end": [4, 5, 6]}}
    result = merged(earlier, added)
    assert [run["label"] for run in result["runs"]] == [*[held[0]] * 3, *[held[1]] * 2, last]
    assert result["total_seconds"] == 3.0
    assert appended_lines(result) == [f"Added by `c --append`: {last}, {held[0]} (0.0 min; load average 1/2/3 at "
                                      "the start, 4/5/6 at the end).", ""]


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: p["options"].update(epochs=20), "their option epochs is 20, this run's is 3"),
    (lambda p: p["options"].update(trace_every=10), "their option trace_every is 10, this run's is 50"),
    (lambda p: p.update(task="poly"), "their task is 'poly', this run's is 'toy1d'"),
    (lambda p: p["environment"].update(torch="0.0"), "their environment torch is '0.0'"),
    (lambda p: p["runs"][0]["settings"].update(lr=0.5), "their settings of 'adam' is {'lr': 0.5}"),
    (lambda p: p["runs"].pop(), "their seeds of 'sven lr=0.1 k=B rtol=0.001' is [0], this run's is [0, 1]"),
    (lambda p: p["runs"][0].update(label="adam lr=7"), "they hold 'adam lr=7', which the demo study no longer lists"),
])
def test_append_refuses_results_it_cannot_extend(change: Any, message: str) -> None:
    earlier = synthetic_payload()
    change(earlier)
    with pytest.raises(ValueError, match=re.escape(message)):
        labels_to_skip(earlier, "demo", "toy1d", StudyOptions(epochs=3, seeds=2), environment("cpu"))


def test_append_is_refused_for_a_study_that_is_not_a_list(tmp_path: Path) -> None:
    write_json(tmp_path / "toy1d-k.json", synthetic_payload())
    with pytest.raises(SystemExit, match=r"only a listed study \(lm, demo, rmsprop_lr\) or a compare run can be "
                                         r"added to; got study 'k'"):
        main(["toy1d", "--study", "k", "--out", str(tmp_path), "--append", "--no-progress"])


def test_a_compare_run_stopped_early_is_completed_by_append_as_a_full_run_would_be(tmp_path: Path) -> None:
    """The pending optimizers of a checkpointed compare run are run and added; the finished ones are kept."""
    args = ["toy1d", "--optimizers", "sgd,adam,polyak", "--epochs", "1", "--subset", "64", "--seeds", "2",
            "--no-progress", "--out", str(tmp_path)]
    main(args)
    path = tmp_path / "toy1d-compare.json"
    full = read_json(path)
    stopped = {**full, "runs": [run for run in full["runs"] if run["label"] == "sgd"], "pending": ["adam", "polyak"]}
    write_json(path, stopped)
    main([*args, "--append"])
    after = read_json(path)
    assert "pending" not in after and after["appended"][0]["labels"] == ["adam", "polyak"]
    assert [run["label"] for run in after["runs"]] == [run["label"] for run in full["runs"]]
    for run, expected in zip(after["runs"], full["runs"]):
        assert run["history"]["val_loss"] == expected["history"]["val_loss"], run["label"]
    with pytest.raises(SystemExit, match="cannot add to grid-searched results"):
        main([*args, "--append", "--grid"])


def test_an_entry_that_turns_a_switch_off_matches_the_runs_that_did_not_name_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """When a default turns a switch on (here line_search), the entries run before say it is off; their labels and
    the runs' stored settings, which never named it, still match."""
    earlier = synthetic_payload()
    entries = (DEMO_STUDY[0], (DEMO_STUDY[1][0], {**DEMO_STUDY[1][1], "line_search": False}))
    monkeypatch.setitem(LISTED_STUDIES, "demo", (entries, {"reference": "adam"}))
    monkeypatch.setitem(HYPERPARAMETERS["sven"], "default", {**HYPERPARAMETERS["sven"]["default"], "line_search": True})
    held = labels_to_skip(earlier, "demo", "toy1d", StudyOptions(epochs=3, seeds=2), environment("cpu"))
    assert held == ("adam", "sven lr=0.1 k=B rtol=0.001")
    entries = (DEMO_STUDY[0], (DEMO_STUDY[1][0], {**DEMO_STUDY[1][1], "line_search": True}))
    monkeypatch.setitem(LISTED_STUDIES, "demo", (entries, {"reference": "adam"}))
    with pytest.raises(ValueError, match="which the demo study no longer lists"):
        labels_to_skip(earlier, "demo", "toy1d", StudyOptions(epochs=3, seeds=2), environment("cpu"))


def test_every_switch_of_the_sven_step_is_off_by_default() -> None:
    """What ``switched_on`` relies on: an entry that turns a switch off runs Sven's default."""
    switches = [setting for setting in fields(StepSettings) if isinstance(setting.default, bool)]
    assert {setting.name for setting in switches} >= {"line_search", "variable_k"}
    assert all(setting.default is False for setting in switches)
    assert switched_on({"lr": 0.5, "line_search": False, "variable_k": True}) == {"lr": 0.5, "variable_k": True}
