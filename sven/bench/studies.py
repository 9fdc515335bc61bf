"""The paper's studies, each a function of (task, options) returning a JSON-ready payload of runs.

- ``compare``: every optimizer, default or grid-searched settings (Figure 1);
- ``k``, ``rtol``, ``microbatch_size``, ``param_fraction``: Sven with one setting swept (Figures 2 and 3);
- ``spectrum``: Sven's kept singular values across epochs, regression vs cross-entropy (Figures 2 and 4);
- ``lm``: the Sven variants against Levenberg–Marquardt, Adam and L-BFGS (``grids.LM_STUDY``);
- ``demo``: the settings tried for the demo's Sven variants against Adam (``grids.DEMO_STUDY``);
- ``rmsprop_lr``: the RMSProp-scaled Sven at each lr of the paper's cross-entropy grid (``grids.RMSPROP_LR_STUDY``).

Every run of a seed starts from the same data, initial weights and batch order, whatever the optimizer
(``train.train`` seeds the initialisation and a separate shuffling generator from the seed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tqdm.auto import tqdm

from sven.bench.grids import (
    DEMO_REFERENCE,
    DEMO_STUDY,
    LM_REFERENCE,
    LM_STUDY,
    RMSPROP_LR_STUDY,
    TIME_REFERENCE,
    default_settings,
    entry_settings,
    grid_settings,
    sweep_values,
)
from sven.bench.optimizers import OptimizerUnavailable
from sven.bench.results import final
from sven.bench.tasks import REGRESSION, Task, build_task
from sven.bench.train import TRACE_EVERY, train

Checkpoint = Callable[[dict[str, Any]], None]
SWEEP_METRICS = {"k": "train_loss", "rtol": "train_loss", "microbatch_size": "val_loss", "param_fraction": "val_loss"}
LOSS_SIBLINGS = {"mnist-regression": "mnist-ce", "mnist-ce": "mnist-regression",
                 "digits-regression": "digits-ce", "digits-ce": "digits-regression"}


@dataclass
class StudyOptions:
    """What the command line chose: optimizers, epochs (None: the task's), seeds, grid search and its epochs,
    a train/validation subset size (None: all), the optimizer steps between two points of each seeded run's
    validation trace, the device, the MNIST folder, whether to show progress bars,
    settings that override the defaults of every optimizer of a compare run, the labels of a listed study's
    entries not to run (they are in the earlier results that this run adds to: ``sven.bench.append``), and
    ``checkpoint``: called by a compare run with its payload so far after each optimizer but the last
    (``pending``: the optimizers still to run), so a run stopped early leaves its finished optimizers behind.
    ``checkpoint`` is not recorded."""

    optimizers: list[str] = field(default_factory=lambda: ["sven", "adam"])
    epochs: int | None = None
    seeds: int = 1
    grid: bool = False
    grid_epochs: int | None = None
    subset: int | None = None
    trace_every: int = TRACE_EVERY
    device: str = "cpu"
    data_dir: str | None = None
    progress: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)
    skip_labels: tuple[str, ...] = ()
    checkpoint: Checkpoint | None = None

    def record(self) -> dict[str, Any]:
        """The options as the payload records them (JSON-ready, without ``checkpoint``)."""
        return {key: value for key, value in asdict(self).items() if key != "checkpoint"}

    def epochs_for(self, task: Task) -> int:
        return self.epochs if self.epochs is not None else task.epochs


def load_task(name: str, options: StudyOptions) -> Task:
    """The task ``name``, cut to ``options.subset`` samples when set."""
    task = build_task(name, options.data_dir)
    return task.subset(options.subset) if options.subset else task


def _labelled(run: dict[str, Any], label: str) -> dict[str, Any]:
    run["label"] = label
    return run


def grid_search(task: Task, optimizer: str, options: StudyOptions) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(best settings, every tried configuration with its final validation loss), seed 0, ``grid_epochs`` epochs."""
    epochs = options.grid_epochs or options.epochs_for(task)
    tried = []
    configurations = grid_settings(optimizer, task.loss_kind, task.batch_size)
    for settings in tqdm(configurations, desc=f"grid {task.name} {optimizer}", disable=not options.progress):
        run = train(task, optimizer, settings, 0, epochs, options.device, progress=False)
        tried.append({"settings": settings, "final_val_loss": final(run), "epochs": epochs})
    best = min(tried, key=lambda entry: entry["final_val_loss"])
    return best["settings"], tried


def seeded_runs(task: Task, optimizer: str, settings: dict[str, Any], label: str,
                options: StudyOptions) -> list[dict[str, Any]]:
    """``optimizer`` with ``settings`` trained once per seed 0..seeds-1, each run labelled ``label``."""
    return [_labelled(train(task, optimizer, settings, seed, options.epochs_for(task), options.device,
                            progress=options.progress, trace_every=options.trace_every), label)
            for seed in range(options.seeds)]


def compare(task: Task, options: StudyOptions) -> dict[str, Any]:
    """Every optimizer of ``options`` on ``task`` over the seeds (but those labelled in ``options.skip_labels``);
    grid-searched settings with ``options.grid``."""
    runs, searches, skipped = [], {}, {}
    to_run = [optimizer for optimizer in options.optimizers
              if entry_label(optimizer, options.overrides) not in options.skip_labels]
    for index, optimizer in enumerate(to_run):
        pending = to_run[index + 1:]
        try:
            if options.grid:
                settings, searches[optimizer] = grid_search(task, optimizer, options)
            else:
                settings = {**default_settings(optimizer, task.loss_kind, task.batch_size), **options.overrides}
            runs += seeded_runs(task, optimizer, settings, entry_label(optimizer, options.overrides), options)
        except OptimizerUnavailable as reason:
            skipped[optimizer] = str(reason)
            print(f"skipping {optimizer}: {reason}")
        if options.checkpoint and pending:
            options.checkpoint({"runs": list(runs), "grid_search": dict(searches), "skipped": dict(skipped),
                                "pending": pending})
    return {"runs": runs, "grid_search": searches, "skipped": skipped}


Entries = tuple[tuple[str, dict[str, Any]], ...]


def switched_on(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the switches that are off (False). Every switch of the benchmark's optimizers is off
    by default, so an entry that turns one off runs as an entry that does not name it."""
    return {key: value for key, value in settings.items() if value is not False}


def entry_label(optimizer: str, overrides: dict[str, Any]) -> str:
    """The label of a listed study's entry: "optimizer key=value …" (switches that are off not named)."""
    return " ".join([optimizer, *override_words(switched_on(overrides))])


def listed(entries: Entries, references: dict[str, str]) -> Callable[[Task, StudyOptions], dict[str, Any]]:
    """The study that trains each (optimizer, overrides) of ``entries`` over the seeds, labelled by ``entry_label``,
    except the entries labelled in ``options.skip_labels``; its payload also holds ``references`` (payload key → the
    label of a reference run)."""

    def study(task: Task, options: StudyOptions) -> dict[str, Any]:
        runs, skipped = [], {}
        for optimizer, overrides in entries:
            label = entry_label(optimizer, overrides)
            if label in options.skip_labels:
                continue
            settings = entry_settings(optimizer, overrides, task.loss_kind, task.batch_size)
            try:
                runs += seeded_runs(task, optimizer, settings, label, options)
            except OptimizerUnavailable as reason:
                skipped[label] = str(reason)
                print(f"skipping {label}: {reason}")
        return {"runs": runs, "skipped": skipped, **references}

    return study


def sweep(parameter: str) -> Callable[[Task, StudyOptions], dict[str, Any]]:
    """The study that trains Sven (default settings) with ``parameter`` set to each of its sweep values."""

    def study(task: Task, options: StudyOptions) -> dict[str, Any]:
        base = default_settings("sven", task.loss_kind, task.batch_size)
        runs = []
        for value in sweep_values(parameter, task.batch_size):
            settings = {**base, parameter: value}
            for seed in range(options.seeds):
                run = train(task, "sven", settings, seed, options.epochs_for(task), options.device,
                            progress=options.progress)
                runs.append(_labelled(run, f"{parameter}={value}"))
        return {"runs": runs, "swept": parameter, "metric": SWEEP_METRICS[parameter]}

    return study


def spectrum(task: Task, options: StudyOptions) -> dict[str, Any]:
    """Sven (default settings, seed 0) on the task and on its other-loss sibling, recording kept σ per epoch."""
    tasks = [task]
    if task.name in LOSS_SIBLINGS:
        sibling = load_task(LOSS_SIBLINGS[task.name], options)
        tasks = [task, sibling] if task.loss_kind == REGRESSION else [sibling, task]
    runs = []
    for each in tasks:
        settings = default_settings("sven", each.loss_kind, each.batch_size)
        try:
            run = train(each, "sven", settings, 0, options.epochs_for(each), options.device,
                        record_spectrum=True, progress=options.progress)
        except OptimizerUnavailable as reason:
            print(f"skipping sven on {each.name}: {reason}")
            continue
        runs.append(_labelled(run, f"{each.name} ({each.loss_kind})"))
    return {"runs": runs}


LISTED_STUDIES: dict[str, tuple[Entries, dict[str, str]]] = {
    "lm": (LM_STUDY, {"lm_reference": LM_REFERENCE, "time_reference": TIME_REFERENCE}),
    "demo": (DEMO_STUDY, {"reference": DEMO_REFERENCE}),
    "rmsprop_lr": (RMSPROP_LR_STUDY, {}),
}
"""The studies that run a list of entries: study → (entries, references written into the payload)."""

STUDIES: dict[str, Callable[[Task, StudyOptions], dict[str, Any]]] = {
    "compare": compare,
    "k": sweep("k"),
    "rtol": sweep("rtol"),
    "microbatch_size": sweep("microbatch_size"),
    "param_fraction": sweep("param_fraction"),
    "spectrum": spectrum,
    **{name: listed(*LISTED_STUDIES[name]) for name in LISTED_STUDIES},
}


def run_study(study: str, task_name: str, options: StudyOptions) -> dict[str, Any]:
    """Run ``study`` on ``task_name``; the payload has the study, task, options and the study's own fields.

    ``options.checkpoint`` receives whole payloads (study, task and options included)."""
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; expected one of {', '.join(STUDIES)}")
    task = load_task(task_name, options)
    if options.overrides and (study != "compare" or options.grid):
        raise ValueError(f"setting overrides apply to a compare run without --grid; got study {study!r}"
                         f"{' with --grid' if options.grid else ''}")
    if options.skip_labels and study not in (*LISTED_STUDIES, "compare"):
        raise ValueError(f"only a listed study ({', '.join(LISTED_STUDIES)}) or a compare run skips entries; "
                         f"got study {study!r}")
    header = {"study": study, "task": task_name, "options": options.record()}
    report = options.checkpoint
    staged = replace(options, checkpoint=(lambda fields: report({**header, **fields})) if report else None)
    return {**header, **STUDIES[study](task, staged)}


def override_words(overrides: dict[str, Any]) -> list[str]:
    """["lr=0.5", …] for the overridden settings, in the order given."""
    return [f"{key}={value}" for key, value in overrides.items()]


def result_name(task_name: str, study: str, overrides: dict[str, Any] | None = None) -> str:
    """``TASK-STUDY``, or ``TASK-STUDY-KEY=VALUE…`` with overridden settings: the results' file name (no suffix)."""
    return "-".join([task_name, study, *override_words(overrides or {})])
