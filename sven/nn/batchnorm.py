"""BatchNorm policies: which statistics SvenWrapper's passes normalise with, and when running statistics move.

- ``"batch"``: a BatchNorm layer in train mode normalises with the statistics of the batch in
  every pass, as SGD training would. Its running statistics advance once per step, in the one
  forward of ``loss_and_grad`` (at the pre-step parameters), and never in a re-evaluation
  (``batch_losses``: adaptive damping, variable_k). Each loss then depends on the whole batch,
  so the wrapper takes the Jacobian of the batch's losses (``sven.jacobian.coupled_jacobian``).
- ``"frozen"``: every pass normalises with the running statistics (eval behaviour); none writes them.

A BatchNorm layer in eval mode uses its running statistics under both policies. After every
pass each layer's ``training`` and ``track_running_stats`` flags are what they were before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

BN_MODES = ("batch", "frozen")
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


class StatisticsSnapshot:
    """Copies of the running statistics of some BatchNorm layers, to put back with ``restore()``."""

    def __init__(self, layers: list[_BatchNorm]) -> None:
        self._saved = [(layer, {name: getattr(layer, name).clone() for name in _STATISTICS}) for layer in layers]

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved running statistics back in place."""
        for layer, saved in self._saved:
            for name, value in saved.items():
                getattr(layer, name).copy_(value)


class BatchNormPolicy:
    """Applies ``mode`` ("batch" or "frozen") to every BatchNorm layer of ``model`` during a pass."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        if mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}; got {mode!r}")
        self.mode = mode
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
        untracked = [name for name, m in self.layers if m.running_mean is None]
        if mode == "frozen" and untracked:
            raise ValueError(
                f"bn_mode='frozen' normalises with the running statistics, but BatchNorm layer(s) {untracked} "
                "have none (track_running_stats=False); use bn_mode='batch'"
            )

    def batch_statistics_layers(self) -> list[str]:
        """'name (Type)' of each layer normalising with batch statistics in this policy's passes, flags as now."""
        if self.mode == "frozen":
            return []
        return [f"{name} ({type(m).__name__})" for name, m in self.layers if m.training or m.running_mean is None]

    @contextmanager
    def jacobian_pass(self) -> Iterator[StatisticsSnapshot]:
        """The step's forward. "batch": train-mode layers update their running statistics (this
        forward is the step's only one); "frozen": eval behaviour. Yields the statistics as they
        were before the pass, for ``restore()`` when the step is to change nothing; an error in the
        pass restores them itself. A model without BatchNorm layers passes straight through."""
        if not self.layers:
            yield StatisticsSnapshot([])
            return
        updating = [
            m for _, m in self.layers
            if self.mode == "batch" and m.training and m.track_running_stats and m.running_mean is not None
        ]
        snapshot = StatisticsSnapshot(updating)
        with self._restoring_flags():
            if self.mode == "frozen":
                self._use_running_statistics()
            try:
                yield snapshot
            except BaseException:
                snapshot.restore()
                raise

    @contextmanager
    def loss_pass(self) -> Iterator[None]:
        """A re-evaluation: the same statistics as ``jacobian_pass``, and no running statistic written."""
        if not self.layers:
            yield
            return
        with self._restoring_flags():
            if self.mode == "frozen":
                self._use_running_statistics()
            for _, layer in self.layers:
                if layer.training:
                    layer.track_running_stats = False  # train mode then passes no running buffers to F.batch_norm
            yield

    def _use_running_statistics(self) -> None:
        for _, layer in self.layers:
            layer.train(False)

    @contextmanager
    def _restoring_flags(self) -> Iterator[None]:
        flags = [(layer, layer.training, layer.track_running_stats) for _, layer in self.layers]
        try:
            yield
        finally:
            for layer, training, tracking in flags:
                layer.train(training)
                layer.track_running_stats = tracking

