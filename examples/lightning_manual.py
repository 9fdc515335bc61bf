"""Sven under PyTorch Lightning's manual optimisation: ``optimizer.step(closure)`` in ``training_step``.

Lightning is not a dependency of sven: ``pip install lightning`` to run this file.

    python examples/lightning_manual.py --epochs 5

The closure runs ``wrapped.loss_and_grad(batch)`` (the per-sample losses and the Jacobian
Sven inverts) and returns the mean loss; ``optimizer.step(closure=closure)`` calls it, takes
the Sven step and returns that loss, as ``torch.optim.LBFGS`` loops expect.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from sven.nn import SvenWrapper
from sven.opt import Sven


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """(B, d), (B, d) → (B,)."""
    return ((pred - target) ** 2).mean(dim=1)


class SvenRegression(L.LightningModule):
    """An MLP fitted to y = exp(−10x²)·sin(2x) with Sven; Lightning drives the loop, Sven the step."""

    def __init__(self, lr: float = 0.5, k: int = 32) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(1, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 1))
        self.wrapped = SvenWrapper(self.net, per_sample_mse)
        self.lr, self.k = lr, k

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_optimizers(self) -> Sven:
        return Sven(self.wrapped, lr=self.lr, k=self.k)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        optimizer = self.optimizers()

        def closure() -> Tensor:
            losses, _ = self.wrapped.loss_and_grad(batch)
            return losses.mean()

        loss = optimizer.step(closure=closure)
        self.log("train_loss", loss, prog_bar=True)
        return loss


def regression_data(size: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = 2 * torch.rand(size, 1, generator=generator) - 1
    return TensorDataset(x, torch.exp(-10 * x**2) * torch.sin(2 * x))


def train(epochs: int, size: int = 512, seed: int = 0) -> tuple[float, float]:
    """Train with Lightning; return the mean squared error on fresh data before and after."""
    torch.manual_seed(seed)
    module = SvenRegression()
    validation = regression_data(1024, seed + 1).tensors
    with torch.no_grad():
        before = float(per_sample_mse(module(validation[0]), validation[1]).mean())
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(regression_data(size, seed), batch_size=32, shuffle=True))
    with torch.no_grad():
        after = float(per_sample_mse(module(validation[0]), validation[1]).mean())
    return before, after


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    mse_before, mse_after = train(args.epochs)
    print(f"validation MSE {mse_before:.3e} before, {mse_after:.3e} after {args.epochs} epochs")
