"""Resuming Sven from torch.save: fresh objects and a fresh process take a bit-identical next step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    CHECKPOINT_CONFIGS,
    build_checkpoint_run,
    checkpoint_batches,
    parameter_copies,
    resume_from_checkpoint,
    train_and_save,
)


@pytest.mark.parametrize("name", list(CHECKPOINT_CONFIGS))
def test_fresh_objects_resume_bit_identically(name: str, tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    continued = train_and_save(CHECKPOINT_CONFIGS[name], path)
    resumed = resume_from_checkpoint(CHECKPOINT_CONFIGS[name], path)
    assert all(torch.equal(a, b) for a, b in zip(continued, resumed))
    rebuilt_without_state = build_checkpoint_run(CHECKPOINT_CONFIGS[name], seed=123)
    rebuilt_without_state[0].model.load_state_dict(torch.load(path, weights_only=False)["model"])
    rebuilt_without_state[1].step(checkpoint_batches()[4])
    assert not all(torch.equal(a, b) for a, b in zip(continued, parameter_copies(rebuilt_without_state[0]))), (
        "the test cannot tell a resumed optimizer from a fresh one"
    )


RESUME_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from conftest import CHECKPOINT_CONFIGS, resume_from_checkpoint
torch.save(resume_from_checkpoint(CHECKPOINT_CONFIGS[{name!r}], {path!r}), {out!r})
"""


@pytest.mark.small_jacobian  # the fresh process runs the library's defaults, without conftest's fixture
def test_a_fresh_process_resumes_bit_identically(tmp_path: Path) -> None:
    name = "gram_adaptive_rmsprop_momentum"
    path, out = tmp_path / "checkpoint.pt", tmp_path / "resumed.pt"
    continued = train_and_save(CHECKPOINT_CONFIGS[name], path)
    script = RESUME_SCRIPT.format(tests=str(Path(__file__).parent), name=name, path=str(path), out=str(out))
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    resumed = torch.load(out)
    assert all(torch.equal(a, b) for a, b in zip(continued, resumed))


def test_state_dict_carries_the_settings_buffers_and_damping(tmp_path: Path) -> None:
    config = CHECKPOINT_CONFIGS["gram_adaptive_rmsprop_momentum"]
    wrapped, optimizer = build_checkpoint_run(config, seed=0)
    for batch in checkpoint_batches()[:2]:
        optimizer.step(batch)
    saved = optimizer.state_dict()
    _, fresh = build_checkpoint_run({"wrapper": config["wrapper"], "optimizer": dict(lr=9.0, k=1, rtol=0.5)}, seed=1)
    fresh.load_state_dict(saved)
    group = fresh.param_groups[0]
    assert (group["lr"], group["k"], group["rtol"], group["damping"]) == (0.5, 5, 1e-4, "adaptive")
    assert fresh.step_count == 2 and fresh.current_damping == optimizer.current_damping
    assert torch.equal(fresh.square_avg, optimizer.square_avg) and torch.equal(fresh.momentum, optimizer.momentum)


def test_loading_a_foreign_state_dict_says_what_is_missing() -> None:
    _, optimizer = build_checkpoint_run(CHECKPOINT_CONFIGS["gram_adaptive_rmsprop_momentum"], seed=0)
    adam_state = torch.optim.Adam(optimizer.wrapped.model.parameters()).state_dict()
    with pytest.raises(ValueError, match="not a Sven state_dict: expected a 'sven' entry"):
        optimizer.load_state_dict(adam_state)


def test_a_state_dict_saved_under_deprecated_option_names_loads_and_warns(tmp_path: Path) -> None:
    """Groups saved with use_rmsprop / mu_rmsprop (the first releases' names) resume the same run."""
    config = CHECKPOINT_CONFIGS["gram_adaptive_rmsprop_momentum"]
    path = tmp_path / "checkpoint.pt"
    continued = train_and_save(config, path)
    checkpoint = torch.load(path, weights_only=False)
    for group in checkpoint["optimizer"]["param_groups"]:
        group["use_rmsprop"], group["rmsprop_post"] = group.pop("rmsprop") is not None, False
        group["mu_rmsprop"] = group.pop("momentum")
    torch.save(checkpoint, path)
    with pytest.warns(DeprecationWarning, match="deprecated; use"):
        resumed = resume_from_checkpoint(config, path)
    assert all(torch.equal(a, b) for a, b in zip(continued, resumed))
