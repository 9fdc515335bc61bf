"""Resuming Sven from torch.save: fresh objects and a fresh process take a bit-identical next step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_batch, make_mlp, per_sample_mse
from torch import Tensor

from sven import Sven, SvenWrapper

CONFIGS = {
    "gram_adaptive_rmsprop_momentum": dict(
        wrapper=dict(engine="gram", kappa=1.0),
        optimizer=dict(lr=0.5, k=5, rtol=1e-4, damping="adaptive", rmsprop="pre", momentum=0.3),
    ),
    "functorch_param_fraction_rmsprop_post": dict(
        wrapper=dict(engine="functorch", param_fraction=0.5, microbatch_size=2),
        optimizer=dict(lr=0.3, k=3, svd_mode="torch", rmsprop="post", momentum=0.5),
    ),
}


def build(config: dict, seed: int) -> tuple[SvenWrapper, Sven]:
    """Model, wrapper and optimizer as a user would rebuild them (the seed only sets the initial weights)."""
    torch.manual_seed(seed)
    wrapped = SvenWrapper(make_mlp([3, 8, 2], seed=seed), per_sample_mse, **config["wrapper"])
    return wrapped, Sven(wrapped, **config["optimizer"])


def batches() -> list[tuple[Tensor, Tensor]]:
    return [make_batch(8, 3, 2, seed=s) for s in range(5)]


def parameters(wrapped: SvenWrapper) -> list[Tensor]:
    return [p.detach().clone() for p in wrapped.model.parameters()]


def train_and_save(config: dict, path: Path) -> list[Tensor]:
    """Four steps, a checkpoint, a fifth step; returns the parameters after the fifth."""
    wrapped, optimizer = build(config, seed=0)
    data = batches()
    for batch in data[:4]:
        optimizer.step(batch)
    torch.save({"model": wrapped.model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    optimizer.step(data[4])
    return parameters(wrapped)


def resume(config: dict, path: Path) -> list[Tensor]:
    wrapped, optimizer = build(config, seed=123)
    checkpoint = torch.load(path, weights_only=False)
    wrapped.model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    optimizer.step(batches()[4])
    return parameters(wrapped)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fresh_objects_resume_bit_identically(name: str, tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    continued = train_and_save(CONFIGS[name], path)
    resumed = resume(CONFIGS[name], path)
    assert all(torch.equal(a, b) for a, b in zip(continued, resumed))
    rebuilt_without_state = build(CONFIGS[name], seed=123)
    rebuilt_without_state[0].model.load_state_dict(torch.load(path, weights_only=False)["model"])
    rebuilt_without_state[1].step(batches()[4])
    assert not all(torch.equal(a, b) for a, b in zip(continued, parameters(rebuilt_without_state[0]))), (
        "the test cannot tell a resumed optimizer from a fresh one"
    )


RESUME_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from test_state_dict import CONFIGS, resume
torch.save(resume(CONFIGS[{name!r}], {path!r}), {out!r})
"""


def test_a_fresh_process_resumes_bit_identically(tmp_path: Path) -> None:
    name = "gram_adaptive_rmsprop_momentum"
    path, out = tmp_path / "checkpoint.pt", tmp_path / "resumed.pt"
    continued = train_and_save(CONFIGS[name], path)
    script = RESUME_SCRIPT.format(tests=str(Path(__file__).parent), name=name, path=str(path), out=str(out))
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    resumed = torch.load(out)
    assert all(torch.equal(a, b) for a, b in zip(continued, resumed))


def test_state_dict_carries_the_settings_buffers_and_damping(tmp_path: Path) -> None:
    config = CONFIGS["gram_adaptive_rmsprop_momentum"]
    wrapped, optimizer = build(config, seed=0)
    for batch in batches()[:2]:
        optimizer.step(batch)
    saved = optimizer.state_dict()
    _, fresh = build({"wrapper": config["wrapper"], "optimizer": dict(lr=9.0, k=1, rtol=0.5)}, seed=1)
    fresh.load_state_dict(saved)
    group = fresh.param_groups[0]
    assert (group["lr"], group["k"], group["rtol"], group["damping"]) == (0.5, 5, 1e-4, "adaptive")
    assert fresh.step_count == 2 and fresh.current_damping == optimizer.current_damping
    assert torch.equal(fresh.square_avg, optimizer.square_avg) and torch.equal(fresh.momentum, optimizer.momentum)


def test_loading_a_foreign_state_dict_says_what_is_missing() -> None:
    _, optimizer = build(CONFIGS["gram_adaptive_rmsprop_momentum"], seed=0)
    adam_state = torch.optim.Adam(optimizer.wrapped.model.parameters()).state_dict()
    with pytest.raises(ValueError, match="not a Sven state_dict: expected a 'sven' entry"):
        optimizer.load_state_dict(adam_state)
