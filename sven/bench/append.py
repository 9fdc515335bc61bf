"""Adding the new entries of a listed study (``lm``, ``demo``, …) or the missing optimizers of a compare run (one
stopped early, or one given more optimizers) to its earlier results without rerunning the others.

``labels_to_skip`` checks that the earlier results are this study's, under the same protocol and environment,
with every entry run as the study would run it now, and returns the labels of the entries they already hold;
``merged`` adds the new runs to them, in the study's order of entries, and records the added command.
"""

from __future__ import annotations

from typing import Any

from sven.bench.grids import entry_settings
from sven.bench.studies import LISTED_STUDIES, Entries, StudyOptions, entry_label, switched_on
from sven.bench.train import TRACE_EVERY

PROTOCOL = ("epochs", "seeds", "subset", "device", "grid", "trace_every")
"""The options the earlier results and the added runs must share."""
RECORDED_LATER = {"trace_every": TRACE_EVERY}
"""Protocol options that results written before they existed do not record, with the value those results used."""


def _mismatch(what: str, earlier: Any, now: Any) -> ValueError:
    return ValueError(f"cannot add to the earlier results: their {what} is {earlier!r}, this run's is {now!r}; "
                      "rerun the whole study instead")


def study_entries(study: str, optimizers: list[str], overrides: dict[str, Any]) -> Entries:
    """The (optimizer, overrides) entries a study runs: a listed study's list, or a compare run's optimizers
    with its overrides (a ValueError for any other study)."""
    if study in LISTED_STUDIES:
        return LISTED_STUDIES[study][0]
    if study == "compare":
        return tuple((optimizer, overrides) for optimizer in optimizers)
    raise ValueError(f"only a listed study ({', '.join(LISTED_STUDIES)}) or a compare run can be added to; "
                     f"got study {study!r}")


def labels_to_skip(earlier: dict[str, Any], study: str, task_name: str, options: StudyOptions,
                   environment: dict[str, Any]) -> tuple[str, ...]:
    """The labels of the entries of ``study`` that ``earlier`` (a payload of that study) already holds.

    Raises ValueError when ``earlier`` is another study or task, ran another protocol (epochs, seeds, subset,
    device) or environment (library versions, machine, threads), misses a seed of an entry, or holds an entry
    the study no longer lists or whose settings differ from those the entry resolves to now (a switch that is off
    and one that is not named are the same setting: ``switched_on``).
    """
    listed_entries = study_entries(study, options.optimizers, options.overrides)
    if options.grid:
        raise ValueError("cannot add to grid-searched results (each optimizer's search would be rerun); "
                         "rerun the whole study instead")
    for what, stored, now in (("study", earlier["study"], study), ("task", earlier["task"], task_name),
                              *((f"option {key}", earlier["options"].get(key, RECORDED_LATER.get(key)),
                                 getattr(options, key)) for key in PROTOCOL),
                              *((f"environment {key}", earlier["environment"].get(key), value)
                                for key, value in environment.items())):
        if stored != now:
            raise _mismatch(what, stored, now)
    entries = {entry_label(optimizer, overrides): (optimizer, overrides) for optimizer, overrides in listed_entries}
    seeds = list(range(options.seeds))
    held: dict[str, list[int]] = {}
    for run in earlier["runs"]:
        if run["label"] not in entries:
            raise ValueError(f"cannot add to the earlier results: they hold {run['label']!r}, which the {study} "
                             f"study no longer lists (or this run does not); rerun the whole study instead")
        optimizer, overrides = entries[run["label"]]
        expected = entry_settings(optimizer, overrides, run["loss_kind"], run["batch_size"])
        if switched_on(run["settings"]) != switched_on(expected):
            raise _mismatch(f"settings of {run['label']!r}", run["settings"], expected)
        held.setdefault(run["label"], []).append(run["seed"])
    for label, held_seeds in held.items():
        if sorted(held_seeds) != seeds:
            raise _mismatch(f"seeds of {label!r}", sorted(held_seeds), seeds)
    return tuple(held)


def merged(earlier: dict[str, Any], added: dict[str, Any]) -> dict[str, Any]:
    """``earlier`` with the runs of ``added`` (a payload of the same study) in the study's order of entries (a compare
    run's: its optimizers, then those only ``added`` ran); ``pending`` is what ``added`` left pending, if anything.

    The command, options, environment and load average stay the earlier run's (the command reruns every entry);
    ``appended`` lists each added run's command, labels, seconds and load average, and ``total_seconds`` counts both.
    """
    order = list(dict.fromkeys(
        entry_label(optimizer, overrides) for payload in (earlier, added)
        for optimizer, overrides in study_entries(earlier["study"], payload.get("options", {}).get("optimizers", []),
                                                  payload.get("options", {}).get("overrides", {}))))
    runs = sorted([*earlier["runs"], *added["runs"]], key=lambda run: order.index(run["label"]))
    record = {"command": added["command"], "labels": list(dict.fromkeys(run["label"] for run in added["runs"])),
              "total_seconds": added["total_seconds"], "load_average": added["load_average"]}
    combined = {**earlier, "runs": runs, "skipped": added["skipped"],
                "total_seconds": earlier["total_seconds"] + added["total_seconds"],
                "appended": [*earlier.get("appended", []), record]}
    combined.pop("pending", None)
    return {**combined, **({"pending": added["pending"]} if added.get("pending") else {})}


def appended_lines(payload: dict[str, Any]) -> list[str]:
    """Markdown lines, one per run added with ``--append``: its command, the entries it ran and the machine load."""
    lines = []
    for added in payload.get("appended", []):
        load = added["load_average"]
        lines += [f"Added by `{added['command']}`: {', '.join(added['labels']) or 'no entry'} "
                  f"({added['total_seconds'] / 60:.1f} min; load average {'/'.join(map(str, load['start']))} at the "
                  f"start, {'/'.join(map(str, load['end']))} at the end).", ""]
    return lines
