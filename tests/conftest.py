"""Shared test helpers: small models, per-sample losses, batches, and the step Sven took.

Helpers are plain functions (import them with ``from conftest import ...``) so that
parametrised tests can build models of any size and dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from reference import reference_direction, reference_residuals_and_jacobian
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import sven.jacobian.gram_engine as gram_engine
from sven.nn import SvenWrapper
from sven.opt import Sven

ENGINES = ("gram", "functorch")
LR = 0.5
STEP_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4}
"""Relative error allowed between a Sven step and the dense float64 reference on the test problems.

The cases keep only σ > rtol·σ_max (rtol ≥ 1e-3) or fewer values (k), so the kept part of M has
condition number κ ≤ 1/rtol = 1e3 (measured on ``CASES``: 2.5 to 621), with at most n = 50 columns.
float64: the Gram route squares κ and eigh of M Mᵀ is backward stable, so the step's relative
error is at most about n·κ²·u = 50·1e6·1.1e-16 ≈ 5.5e-9 < 1e-8. float32: the Jacobian comes from a
float32 forward and backward (relative error of a few u₃₂ = 6e-8 per entry), which moves M⁺r by
about κ times that: 621·2·6e-8 ≈ 7.5e-5 < 1e-4. A real bug is an O(1) error.
"""


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample: pred, target (B, d) → (B,)."""
    return ((pred - target) ** 2).mean(dim=1)


def make_mlp(sizes: list[int], dtype: torch.dtype = torch.float64, seed: int = 0,
             activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """An MLP sizes[0] → … → sizes[-1] with ``activation`` between the Linear layers."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i:
            layers.append(activation())
        layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers).to(dtype)


def make_batch(batch_size: int, d_in: int, d_out: int, dtype: torch.dtype = torch.float64,
               seed: int = 1) -> tuple[Tensor, Tensor]:
    """A random regression batch (x (B, d_in), y (B, d_out))."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, d_in, generator=generator, dtype=torch.float64)
    y = torch.randn(batch_size, d_out, generator=generator, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def per_sample_squared_error(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every non-batch dim: (B, …) → (B,)."""
    return ((pred - target) ** 2).reshape(pred.shape[0], -1).mean(dim=1)


class Scaled(nn.Module):
    """A parametrised layer without a Gram rule (the Gram engine's functorch fallback): x ↦ tanh(x · scale) + shift."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.shift = nn.Parameter(torch.linspace(-0.2, 0.2, width))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.scale) + self.shift


def flat_parameters(model: nn.Module) -> Tensor:
    """All trainable parameters flattened in ``named_parameters`` order, as a float64 copy (P,)."""
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in model.parameters() if p.requires_grad])


def parameter_snapshot(model: nn.Module) -> list[Tensor]:
    """Exact copies of the parameters, for bit-identity checks with ``torch.equal``."""
    return [p.detach().clone() for p in model.parameters()]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
"""Parametrise a device-specific test over the CPU and (marked ``cuda``, skipped without one) a GPU."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped where ``torch.cuda.is_available()`` is False."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def factored_gram_operator(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The small test problems are there to check the Gram engine's factored algebra (each layer rule's Gram,
    Mᵀu, the finite check), which their size would otherwise skip for M itself (``SMALL_JACOBIAN_ELEMENTS``):
    the shortcut is off unless a test is marked ``small_jacobian``."""
    if request.node.get_closest_marker("small_jacobian") is None:
        monkeypatch.setattr(gram_engine, "SMALL_JACOBIAN_ELEMENTS", 0)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Run the test with one intra-op thread: tiny tensors gain nothing from more, and a shared CPU stays responsive."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Case:
    """An MLP with layer ``sizes`` on a batch of ``batch_size`` samples, solved with ``k`` and ``rtol``."""

    sizes: tuple[int, ...]
    batch_size: int
    k: int = 64
    rtol: float = 1e-3
    duplicated: bool = False

    def model_and_batch(self, dtype: torch.dtype) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        """The model and batch; with ``duplicated`` the second half of the batch repeats the first."""
        distinct = self.batch_size // 2 if self.duplicated else self.batch_size
        x, y = make_batch(distinct, self.sizes[0], self.sizes[-1], dtype)
        if self.duplicated:
            x, y = torch.cat([x, x]), torch.cat([y, y])
        return make_mlp(list(self.sizes), dtype), (x, y)


CASES = {
    "mlp_b_lt_p": Case((3, 8, 2), 12),  # M is 12 × 50
    "b_gt_p": Case((2, 3, 1), 24),  # M is 24 × 13
    "duplicated_samples": Case((3, 8, 2), 12, duplicated=True),  # rank 6
    "k_below_rank": Case((3, 8, 2), 12, k=3),
    "rtol_cuts": Case((3, 8, 2), 12, rtol=0.05),
}


def reference_step(case: Case, dtype: torch.dtype) -> torch.Tensor:
    """The reference parameter change −lr · M⁺ r, float64 (P,)."""
    model, batch = case.model_and_batch(dtype)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch)
    return -LR * reference_direction(jacobian, residuals, case.k, case.rtol)


def sven_step(case: Case, dtype: torch.dtype, engine: str, svd_mode: str, **options) -> tuple[torch.Tensor, Sven]:
    """The parameter change one Sven step makes, float64 (P,), and the optimizer (``options``: more Sven options)."""
    model, batch = case.model_and_batch(dtype)
    wrapped = SvenWrapper(model, per_sample_mse, engine=engine)
    optimizer = Sven(wrapped, lr=LR, k=case.k, rtol=case.rtol, svd_mode=svd_mode, **options)
    before = flat_parameters(model)
    wrapped.loss_and_grad(batch)
    optimizer.step()
    return flat_parameters(model) - before, optimizer


CHECKPOINT_CONFIGS = {
    "gram_adaptive_rmsprop_momentum": dict(
        wrapper=dict(engine="gram", kappa=1.0),
        optimizer=dict(lr=0.5, k=5, rtol=1e-4, damping="adaptive", rmsprop="pre", momentum=0.3),
    ),
    "gram_param_fraction_rows_rmsprop_post": dict(
        wrapper=dict(engine="gram", param_fraction=0.5, mask_mode="rows", microbatch_size=2),
        optimizer=dict(lr=0.3, k=3, rmsprop="post", momentum=0.5),
    ),
    "gram_param_fraction_elementwise_adaptive": dict(
        wrapper=dict(engine="gram", param_fraction=0.4, kappa=1.0),
        optimizer=dict(lr=0.5, k=5, damping="adaptive", rmsprop="pre"),
    ),
    "functorch_param_fraction_rmsprop_post": dict(
        wrapper=dict(engine="functorch", param_fraction=0.5, microbatch_size=2),
        optimizer=dict(lr=0.3, k=3, svd_mode="torch", rmsprop="post", momentum=0.5),
    ),
}


def build_checkpoint_run(config: dict, seed: int) -> tuple[SvenWrapper, Sven]:
    """Model, wrapper and optimizer as a user would rebuild them (the seed only sets the initial weights)."""
    torch.manual_seed(seed)
    wrapped = SvenWrapper(make_mlp([3, 8, 2], seed=seed), per_sample_mse, **config["wrapper"])
    return wrapped, Sven(wrapped, **config["optimizer"])


def checkpoint_batches() -> list[tuple[Tensor, Tensor]]:
    return [make_batch(8, 3, 2, seed=s) for s in range(5)]


def parameter_copies(wrapped: SvenWrapper) -> list[Tensor]:
    return [p.detach().clone() for p in wrapped.model.parameters()]


def train_and_save(config: dict, path: Path) -> list[Tensor]:
    """Four steps, a checkpoint, a fifth step; returns the parameters after the fifth."""
    wrapped, optimizer = build_checkpoint_run(config, seed=0)
    data = checkpoint_batches()
    for batch in data[:4]:
        optimizer.step(batch)
    torch.save({"model": wrapped.model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    optimizer.step(data[4])
    return parameter_copies(wrapped)


def resume_from_checkpoint(config: dict, path: Path) -> list[Tensor]:
    wrapped, optimizer = build_checkpoint_run(config, seed=123)
    checkpoint = torch.load(path, weights_only=False)
    wrapped.model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    optimizer.step(checkpoint_batches()[4])
    return parameter_copies(wrapped)


class LargestAllocation(TorchDispatchMode):
    """Records the largest numel of any tensor an aten op returns, and which op returned it."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0
        self.op = ""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.numel() > self.numel:
                self.numel, self.op = leaf.numel(), str(func)
        return out
