"""The paper's tasks: data, model, per-sample loss and batch size, each built by name."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sven.bench.mnist import load_mnist

REGRESSION = "regression"
CROSS_ENTROPY = "cross_entropy"
DEFAULT_MNIST_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"
DATA_SEED = 0


@dataclass
class Task:
    """One benchmark problem.

    ``train`` and ``val`` are (x (N, d_in), y) pairs; y is (N, d_out) float for
    regression and (N,) int64 class labels for cross-entropy. ``per_sample_loss(pred, y)``
    returns (B,). ``classes`` is the number of classes when accuracy applies, else None.
    """

    name: str
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    layer_sizes: tuple[int, ...]
    loss_kind: str
    batch_size: int
    epochs: int
    classes: int | None = None

    def build_model(self) -> nn.Module:
        """A fresh GELU MLP with ``layer_sizes`` (initialised from torch's global RNG)."""
        return gelu_mlp(self.layer_sizes)

    def per_sample_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Per-sample loss (B,): mean squared error over outputs, or cross-entropy."""
        if self.loss_kind == CROSS_ENTROPY:
            return F.cross_entropy(pred, target, reduction="none")
        return ((pred - target) ** 2).mean(dim=1)

    def accuracy(self, pred: Tensor, target: Tensor) -> float | None:
        """Fraction of argmax predictions equal to the label (one-hot targets use their argmax); None if no classes."""
        if self.classes is None:
            return None
        labels = target if target.dim() == 1 else target.argmax(dim=1)
        return float((pred.argmax(dim=1) == labels).double().mean())

    def to(self, device: torch.device | str) -> Task:
        """The same task with its tensors on ``device``."""
        moved = {split: tuple(t.to(device) for t in getattr(self, split)) for split in ("train", "val")}
        return Task(self.name, moved["train"], moved["val"], self.layer_sizes, self.loss_kind,
                    self.batch_size, self.epochs, self.classes)

    def subset(self, size: int) -> Task:
        """The same task keeping only the first ``size`` train and validation samples."""
        cut = {split: tuple(t[:size] for t in getattr(self, split)) for split in ("train", "val")}
        return Task(self.name, cut["train"], cut["val"], self.layer_sizes, self.loss_kind,
                    self.batch_size, self.epochs, self.classes)


def gelu_mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    """Linear layers sizes[0] → … → sizes[-1] with GELU between them."""
    layers: list[nn.Module] = []
    for index, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        if index:
            layers.append(nn.GELU())
        layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


def standardise(train_y: Tensor, val_y: Tensor) -> tuple[Tensor, Tensor]:
    """Both targets shifted and scaled by the training mean and standard deviation."""
    mean, std = train_y.mean(dim=0), train_y.std(dim=0)
    return (train_y - mean) / std, (val_y - mean) / std


def toy1d_target(x: Tensor) -> Tensor:
    """y = exp(−10x²)·sin(2x), elementwise."""
    return torch.exp(-10 * x**2) * torch.sin(2 * x)


def toy1d(size: int = 10_000) -> Task:
    """1-D regression y = exp(−10x²)·sin(2x), x ~ U[−1, 1], standardised targets, 1→16→16→16→1, B = 32."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    x_train, x_val = (torch.rand(size, 1, generator=generator) * 2 - 1 for _ in range(2))
    y_train, y_val = standardise(toy1d_target(x_train), toy1d_target(x_val))
    return Task("toy1d", (x_train, y_train), (x_val, y_val), (1, 16, 16, 16, 1), REGRESSION, 32, 20)


def monomial_exponents(variables: int, degree: int) -> Tensor:
    """Exponents (terms, variables) of every monomial of total degree ≤ ``degree`` (cross terms included)."""
    rows = []
    for total in range(degree + 1):
        for combination in itertools.combinations_with_replacement(range(variables), total):
            rows.append(torch.bincount(torch.tensor(combination, dtype=torch.long), minlength=variables))
    return torch.stack(rows)


def poly(size: int = 10_000, variables: int = 6, degree: int = 4) -> Task:
    """Random polynomial regression: y = Σ c_t Π x_i^e_ti over all monomials of degree ≤ 4 in 6 variables.

    Coefficients c ~ N(0, 1), x ~ U[−1, 1]^6, standardised targets, 6→16→16→16→1, B = 32.
    """
    generator = torch.Generator().manual_seed(DATA_SEED)
    exponents = monomial_exponents(variables, degree).double()
    coefficients = torch.randn(exponents.shape[0], generator=generator, dtype=torch.float64)

    def polynomial(x: Tensor) -> Tensor:
        monomials = (x.double()[:, None, :] ** exponents[None]).prod(dim=2)
        return (monomials @ coefficients)[:, None].float()

    x_train, x_val = (torch.rand(size, variables, generator=generator) * 2 - 1 for _ in range(2))
    y_train, y_val = standardise(polynomial(x_train), polynomial(x_val))
    return Task("poly", (x_train, y_train), (x_val, y_val), (variables, 16, 16, 16, 1), REGRESSION, 32, 20)


def mnist(loss_kind: str, data_dir: str | Path | None = None) -> Task:
    """MNIST 784→32→32→32→10 GELU, B = 64, pixels in [0, 1]; one-hot squared error or cross-entropy.

    Train on the 60000 training images, validate on the 10000 test images.
    """
    train_images, train_labels, test_images, test_labels = load_mnist(data_dir or DEFAULT_MNIST_DIR)
    x_train, x_val = (images.reshape(images.shape[0], -1).float() / 255 for images in (train_images, test_images))
    name = "mnist-regression" if loss_kind == REGRESSION else "mnist-ce"
    return _classification_task(name, loss_kind, (x_train, train_labels), (x_val, test_labels), 32, 64, 10)


def digits(loss_kind: str) -> Task:
    """scikit-learn's bundled 8×8 digits (1797 images, 20 % held out), 64→32→32→32→10 GELU, B = 32."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(DATA_SEED))
    held_out = x.shape[0] // 5
    val, train = order[:held_out], order[held_out:]
    name = "digits-regression" if loss_kind == REGRESSION else "digits-ce"
    return _classification_task(name, loss_kind, (x[train], y[train]), (x[val], y[val]), 32, 32, 30)


def _classification_task(name: str, loss_kind: str, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor],
                         width: int, batch_size: int, epochs: int) -> Task:
    """A 10-class task; regression targets are the one-hot labels (N, 10), cross-entropy keeps labels (N,)."""

    def targets(labels: Tensor) -> Tensor:
        return F.one_hot(labels, 10).float() if loss_kind == REGRESSION else labels

    sizes = (train[0].shape[1], width, width, width, 10)
    return Task(name, (train[0], targets(train[1])), (val[0], targets(val[1])), sizes, loss_kind,
                batch_size, epochs, classes=10)


TASK_BUILDERS: dict[str, Callable[[str | Path | None], Task]] = {
    "toy1d": lambda data_dir: toy1d(),
    "poly": lambda data_dir: poly(),
    "mnist-regression": lambda data_dir: mnist(REGRESSION, data_dir),
    "mnist-ce": lambda data_dir: mnist(CROSS_ENTROPY, data_dir),
    "digits-regression": lambda data_dir: digits(REGRESSION),
    "digits-ce": lambda data_dir: digits(CROSS_ENTROPY),
}


def build_task(name: str, data_dir: str | Path | None = None) -> Task:
    """The task called ``name`` (one of ``TASK_BUILDERS``); ``data_dir`` holds the MNIST files."""
    if name not in TASK_BUILDERS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASK_BUILDERS)}")
    return TASK_BUILDERS[name](data_dir)
