"""JSON results: the environment they ran in, writing and reading them, and summary statistics."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

import torch

import sven


def cpu_model() -> str:
    """The CPU model name from ``lscpu`` (or ``platform.processor()`` where lscpu is absent)."""
    if shutil.which("lscpu"):
        listing = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in listing.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def environment(device: torch.device | str) -> dict[str, Any]:
    """Library versions and the machine: sven, torch, python, platform, CPU, threads, device (and GPU name)."""
    device = torch.device(device)
    info = {"sven": sven.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average() -> list[float]:
    """The machine's 1-, 5- and 15-minute load averages (``os.getloadavg``)."""
    return [round(value, 2) for value in os.getloadavg()]


def command_line(argv: list[str]) -> str:
    """The command ``python -m sven.bench ARGV`` (arguments quoted for the shell where needed)."""
    return " ".join(["python -m sven.bench", *(shlex.quote(arg) for arg in argv)])


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as strict JSON (non-finite floats become null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite_or_none(payload), indent=1, allow_nan=False) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """The payload of a results file."""
    return json.loads(Path(path).read_text())


def studies_of(payloads: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    """The payloads of the given study kinds ("compare", "lm", "demo", …) that hold at least one run."""
    return [payload for payload in payloads if payload["study"] in kinds and payload["runs"]]


def final(run: dict[str, Any], metric: str = "val_loss") -> float:
    """The last recorded value of ``metric`` in a run (inf for a diverged run or a missing value)."""
    value = run["history"][metric][-1]
    return math.inf if run["diverged"] or value is None else float(value)


def median_of_last(run: dict[str, Any], epochs: int = 10, metric: str = "val_loss") -> float:
    """The median of ``metric`` over the last ``epochs`` trained epochs (epoch 0 excluded); inf for a diverged run."""
    values = run["history"][metric][1:][-epochs:]
    if run["diverged"] or not values or None in values:
        return math.inf
    return float(statistics.median(values))


def seconds_per_epoch(run: dict[str, Any]) -> float:
    """Mean training time of the epochs a run completed (optimizer steps only, evaluation excluded)."""
    times = run["history"]["epoch_time"][1:]
    return statistics.fmean(times) if times else math.nan


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value, nan when a value is not finite)."""
    if not all(math.isfinite(value) for value in values):
        return statistics.fmean(values), math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
