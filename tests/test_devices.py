"""Every device-specific code path, on the CPU and on a GPU (the ``cuda`` cases, skipped without one).

The paths: the wrapper's ``device`` (model and batches moved, the param_fraction generator on it);
the solvers' generators on the device ("randomized", "randomized_v2", the LOBPCG start, the "cg"
preconditioner's sketch); the eigenroutines off the CPU (``top_eigh`` → ``torch.linalg.eigh``, ARPACK
through host memory); the report's singular values copied to the host; the engine check's replay of the
device's RNG (tests/test_bad_inputs.py, Dropout); the distributed communicator on the device (nccl
with CUDA); the benchmarks' device synchronisation, GPU name and peak memory. Each step is held to
the dense float64 reference computed on the CPU.
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import DEVICES, LR, STEP_TOLERANCE, flat_parameters, make_batch, make_mlp, per_sample_mse
from reference import reference_direction, reference_residuals_and_jacobian, relative_error

from sven.bench.cli import main as bench_main
from sven.distributed import DistributedSvenWrapper
from sven.jacobian import MASK_MODES
from sven.nn import SvenWrapper
from sven.opt import Sven

pytestmark = pytest.mark.usefixtures("single_thread")

SIZES, BATCH = [3, 8, 2], 12
"""M is 12 × 50: k = 3 < rank for the top-k routes."""
MODES = {
    "gram (certified)": dict(svd_mode="gram", k=BATCH),
    "gram (top-k)": dict(svd_mode="gram", k=3),
    "randomized": dict(svd_mode="randomized", k=BATCH),
    "randomized_v2": dict(svd_mode="randomized_v2", k=BATCH),
    "lobpcg": dict(svd_mode="lobpcg", k=3),
    "scipy": dict(svd_mode="scipy", k=3),
    "torch": dict(svd_mode="torch", k=3),
    "lq": dict(svd_mode="lq", k=3),
    "cg (matrix-free)": dict(svd_mode="cg", k=BATCH, damping=1e-3, gram_memory=0),
}
"""Every solver on the device; the randomized modes with k + oversampling ≥ rank (exact)."""


def reference_change(model: torch.nn.Module, batch: tuple, k: int, damping: float = 0.0,
                     columns: torch.Tensor | None = None) -> torch.Tensor:
    """−lr · M⁺ r (rtol 1e-3, filtered by ``damping``) on the CPU in float64, on ``columns`` of the parameters."""
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch, columns=columns)
    return -LR * reference_direction(jacobian, residuals, k, 1e-3 if damping == 0 else 0.0, damping)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_each_solver_takes_the_reference_step_on_the_device(mode: str, device: str) -> None:
    options = MODES[mode]
    model, batch = make_mlp(SIZES), make_batch(BATCH, SIZES[0], SIZES[-1])
    expected = reference_change(model, batch, options["k"], options.get("damping", 0.0))
    wrapped = SvenWrapper(model, per_sample_mse, device=device, engine="gram")
    optimizer = Sven(wrapped, lr=LR, **options)
    before = flat_parameters(model)
    losses = optimizer.step(batch)
    assert losses.device.type == device and next(model.parameters()).device.type == device
    assert relative_error((flat_parameters(model) - before).cpu(), expected) <= STEP_TOLERANCE[torch.float64]
    assert optimizer.last_step["kept_singular_values"].device.type == "cpu"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_mode", MASK_MODES)
def test_param_fraction_draws_on_the_device_and_moves_only_its_columns(mask_mode: str, device: str) -> None:
    model, batch = make_mlp(SIZES), make_batch(BATCH, SIZES[0], SIZES[-1])
    reference_model = make_mlp(SIZES)
    wrapped = SvenWrapper(model, per_sample_mse, device=device, engine="gram", param_fraction=0.5,
                          mask_mode=mask_mode)
    wrapped.loss_and_grad(batch)
    columns = wrapped.state.columns
    assert columns.device.type == device
    expected = torch.zeros(flat_parameters(reference_model).numel(), dtype=torch.float64)
    expected[columns.cpu()] = reference_change(reference_model, batch, BATCH, columns=columns.cpu())
    before = flat_parameters(model)
    Sven(wrapped, lr=LR, k=BATCH).step()
    assert relative_error((flat_parameters(model) - before).cpu(), expected) <= STEP_TOLERANCE[torch.float64]


@pytest.mark.parametrize("device", DEVICES)
def test_a_one_rank_distributed_step_on_the_device_is_the_plain_step(device: str, tmp_path: Path) -> None:
    """gloo on the CPU, nccl on a GPU: the communicator's tensors live on the device."""
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        model, batch = make_mlp(SIZES), make_batch(BATCH, SIZES[0], SIZES[-1])
        expected = reference_change(model, batch, BATCH)
        wrapped = DistributedSvenWrapper(model, per_sample_mse, device=device)
        before = flat_parameters(model)
        Sven(wrapped, lr=LR, k=BATCH).step(batch)
    finally:
        dist.destroy_process_group()
    assert relative_error((flat_parameters(model) - before).cpu(), expected) <= STEP_TOLERANCE[torch.float64]


@pytest.mark.parametrize("device", DEVICES)
def test_the_bench_cli_trains_on_the_device_and_records_it(device: str, tmp_path: Path) -> None:
    bench_main(["toy1d", "--optimizers", "sven", "--epochs", "1", "--subset", "64", "--device", device,
                "--out", str(tmp_path), "--no-progress"])
    payload = json.loads((tmp_path / "toy1d-compare.json").read_text())
    environment = payload["environment"]
    assert environment["device"] == device and ("gpu" in environment) == (device == "cuda")
    history = payload["runs"][0]["history"]
    assert len(history["train_loss"]) == 2 and all(math.isfinite(loss) for loss in history["train_loss"])
    assert history["wall_time"][1] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_step_cost_times_a_step_on_the_device_and_records_its_peak_memory(
    device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    step_cost = importlib.import_module("step_cost")
    mebibytes = 8

    def step() -> None:
        torch.ones(mebibytes * 2**18, device=device).sum()

    seconds, peak_mb = step_cost.timed_with_peak(step, torch.device(device))
    assert seconds > 0 and mebibytes - 0.5 <= peak_mb <= 2 * mebibytes
