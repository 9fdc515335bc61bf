"""Train one configuration (task, optimizer, settings, seed) and record its per-epoch history and its trace."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sven.bench.optimizers import make_stepper
from sven.bench.tasks import Task

TRACE_EVERY = 50
"""Optimizer steps between two points of a run's validation trace."""


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task, data: tuple[Tensor, Tensor]) -> tuple[float, float | None]:
    """(mean loss, accuracy or None) of ``model`` on ``data`` = (x (N, d_in), y)."""
    x, y = data
    pred = model(x)
    return float(task.per_sample_loss(pred, y).double().mean()), task.accuracy(pred, y)


def train(task: Task, optimizer: str, settings: dict[str, Any], seed: int, epochs: int,
          device: torch.device | str = "cpu", record_spectrum: bool = False, progress: bool = True,
          trace_every: int = TRACE_EVERY) -> dict[str, Any]:
    """Train a fresh model (initialised and shuffled from ``seed``) for ``epochs`` epochs.

    Returns a JSON-ready dict: the configuration, ``diverged`` (a non-finite loss
    stopped the run), ``history`` with one entry per epoch, epoch 0 being the
    initial model: train_loss and val_loss (full-set means after the epoch),
    val_accuracy (None without classes), epoch_time (seconds spent in optimizer
    steps, evaluation excluded), wall_time (their running sum) and, with
    ``record_spectrum``, the singular values Sven kept at the last full-size batch of each epoch;
    and ``trace``: step, wall_time (training clock, evaluation excluded) and val_loss at
    step 0, every ``trace_every`` optimizer steps and at the end of every epoch.
    """
    device = torch.device(device)
    task = task.to(device)
    torch.manual_seed(seed)
    model = task.build_model().to(device)
    stepper = make_stepper(optimizer, model, task, device, settings)
    shuffler = torch.Generator().manual_seed(seed)
    x_train, y_train = task.train
    samples = x_train.shape[0]
    history: dict[str, list[Any]] = {key: [] for key in
                                     ("epoch", "train_loss", "val_loss", "val_accuracy", "epoch_time", "wall_time")}
    if record_spectrum:
        history["singular_values"] = []
    trace: dict[str, list[Any]] = {"step": [], "wall_time": [], "val_loss": []}
    steps = 0

    def trace_point(clock: float, val_loss: float | None = None) -> None:
        if trace["step"] and trace["step"][-1] == steps:
            return
        trace["step"].append(steps)
        trace["wall_time"].append(clock)
        trace["val_loss"].append(evaluate(model, task, task.val)[0] if val_loss is None else val_loss)

    def record(epoch: int, seconds: float) -> None:
        train_loss, _ = evaluate(model, task, task.train)
        val_loss, val_accuracy = evaluate(model, task, task.val)
        history["epoch"].append(epoch)
        history["train_loss"].append(train_loss)
        history["val_loss"].append(val_loss)
        history["val_accuracy"].append(val_accuracy)
        history["epoch_time"].append(seconds)
        history["wall_time"].append(seconds + (history["wall_time"][-1] if history["wall_time"] else 0.0))
        trace_point(history["wall_time"][-1], val_loss)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    record(0, 0.0)
    diverged = False
    steps_per_epoch = math.ceil(samples / task.batch_size)
    label = f"{task.name} {optimizer} seed {seed}"
    with tqdm(total=epochs * steps_per_epoch, desc=label, disable=not progress, leave=False) as bar:
        for epoch in range(1, epochs + 1):
            order = torch.randperm(samples, generator=shuffler).to(device)
            seconds, started = 0.0, time.perf_counter()
            spectrum = None
            for begin in range(0, samples, task.batch_size):
                batch = order[begin:begin + task.batch_size]
                if not math.isfinite(stepper.step(x_train[batch], y_train[batch])):
                    diverged = True
                    break
                steps += 1
                if record_spectrum and batch.numel() == task.batch_size:
                    spectrum = stepper.singular_values()
                bar.update(1)
                if steps % trace_every == 0:
                    synchronize()
                    seconds += time.perf_counter() - started
                    trace_point(history["wall_time"][-1] + seconds)
                    started = time.perf_counter()
            synchronize()
            record(epoch, seconds + time.perf_counter() - started)
            if record_spectrum:
                history["singular_values"].append(spectrum)
            diverged = diverged or not math.isfinite(history["val_loss"][-1])
            bar.set_postfix(val_loss=f"{history['val_loss'][-1]:.3g}")
            if diverged:
                break
    return {"task": task.name, "loss_kind": task.loss_kind, "optimizer": optimizer, "settings": settings,
            "seed": seed, "epochs": epochs, "batch_size": task.batch_size, "train_size": samples,
            "val_size": task.val[0].shape[0], "diverged": diverged, "history": history, "trace": trace}
