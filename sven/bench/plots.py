"""PNG plots of benchmark runs: loss curves with mean ± 1σ bands and singular-value spectra.

matplotlib is imported by the functions that draw, never at import, and its backend is
left as the user's environment chose it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LABELS = {"val_loss": "validation loss", "train_loss": "training loss", "val_accuracy": "validation accuracy",
          "epoch": "epoch", "wall_time": "wall time (s)", "step": "step", "rms_error": "RMS error of u"}


def save_figure(figure: Figure, path: Path, title: str) -> Path:
    """Title, lay out, write ``figure`` as a PNG at ``path`` (creating its folder) and close it."""
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    from matplotlib import pyplot as plt

    plt.close(figure)
    return path


def curve_band(runs: list[dict[str, Any]], x: str, y: str) -> tuple[np.ndarray, ...]:
    """(x mean, y mean, y std, y min) over runs, each (E,), cut to the shortest history."""
    length = min(len(run["history"][y]) for run in runs)
    xs = np.array([run["history"][x][:length] for run in runs], dtype=float)
    ys = np.array([[np.nan if v is None else v for v in run["history"][y][:length]] for run in runs], dtype=float)
    return xs.mean(axis=0), ys.mean(axis=0), ys.std(axis=0), ys.min(axis=0)


def draw_bands(axis: Axes, groups: dict[str, list[dict[str, Any]]], x: str, y: str, log: bool = True) -> None:
    """One line per group (mean over its runs that did not diverge) with a shaded ±1σ band.

    On a log scale the band's lower edge is clipped at the lowest run, so it stays positive.
    A group whose runs all diverged is drawn up to where they stopped. More than ten groups
    take their colours from tab20, so no two share one.
    """
    from matplotlib import colormaps

    palette = colormaps["tab20"].colors if len(groups) > len(colormaps["tab10"].colors) else colormaps["tab10"].colors
    for index, (label, runs) in enumerate(groups.items()):
        kept = [run for run in runs if not run["diverged"]] or runs
        diverged = sum(run["diverged"] for run in runs)
        xs, mean, std, lowest = curve_band(kept, x, y)
        line, = axis.plot(xs, mean, color=palette[index % len(palette)],
                          label=label + (f" ({diverged}/{len(runs)} diverged)" if diverged else ""))
        if len(kept) > 1:
            lower = np.maximum(mean - std, lowest) if log else mean - std
            axis.fill_between(xs, lower, mean + std, color=line.get_color(), alpha=0.2)
    if log and y != "val_accuracy":
        axis.set_yscale("log")
    axis.set_xlabel(LABELS[x])
    axis.set_ylabel(LABELS[y])
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize="small")


def plot_curves(groups: dict[str, list[dict[str, Any]]], path: Path, title: str, y: str = "val_loss",
                xs: tuple[str, ...] = ("epoch", "wall_time")) -> Path:
    """``y`` against each of ``xs`` (one panel each), mean ± 1σ over the runs of each group; saved as PNG."""
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(xs), figsize=(5.5 * len(xs), 4), squeeze=False)
    for axis, x in zip(axes[0], xs):
        draw_bands(axis, groups, x, y)
    return save_figure(figure, path, title)


def plot_spectra(panels: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """For each run (one panel), the kept singular values σ_i/σ_1 at the end of every epoch, coloured by epoch."""
    from matplotlib import colormaps
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for axis, (label, run) in zip(axes[0], panels.items()):
        spectra = [s for s in run["history"]["singular_values"] if s]
        colours = colormaps["viridis"](np.linspace(0, 1, max(len(spectra), 1)))
        for epoch, (sigma, colour) in enumerate(zip(spectra, colours), start=1):
            sigma = np.asarray(sigma)
            axis.semilogy(np.arange(1, sigma.size + 1), sigma / sigma[0], color=colour,
                          label=f"epoch {epoch}" if epoch in (1, len(spectra)) else None)
        axis.set_xlabel("index i")
        axis.set_ylabel("σ_i / σ_1")
        axis.set_title(label)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    return save_figure(figure, path, title)


def group_runs(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs grouped by their ``label``, in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["label"], []).append(run)
    return groups


def plot_study(payload: dict[str, Any], path: Path) -> Path | None:
    """The study's figure: the spectra, a sweep's metric vs epoch, else loss vs epoch and wall time (compare, …).

    Returns None when the payload holds no run.
    """
    if not payload["runs"]:
        return None
    seeds = payload["options"]["seeds"]
    title = f"{payload['task']}: {payload['study']} (mean ± 1σ over {seeds} seed{'s' if seeds > 1 else ''})"
    if payload["study"] == "spectrum":
        return plot_spectra({run["label"]: run for run in payload["runs"]}, path,
                            f"{payload['task']}: singular values kept by Sven, end of each epoch")
    if "metric" in payload:
        return plot_curves(group_runs(payload["runs"]), path, title, y=payload["metric"], xs=("epoch",))
    return plot_curves(group_runs(payload["runs"]), path, title)
