"""Shared test helpers: small models, per-sample losses, batches, and the step Sven took.

Helpers are plain functions (import them with ``from conftest import ...``) so that
parametrised tests can build models of any size and dtype.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn


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


def flat_parameters(model: nn.Module) -> Tensor:
    """All trainable parameters flattened in ``named_parameters`` order, as a float64 copy (P,)."""
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in model.parameters() if p.requires_grad])


def parameter_snapshot(model: nn.Module) -> list[Tensor]:
    """Exact copies of the parameters, for bit-identity checks with ``torch.equal``."""
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Run the test with one intra-op thread: tiny tensors gain nothing from more, and a shared CPU stays responsive."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
