"""Checks every engine applies before it trusts a batch."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def losses_shape_error(shape: tuple[int, ...], batch_size: int) -> ValueError:
    """The error for per-sample losses of the wrong shape: what was received, what is expected."""
    hint = (
        "return one loss per sample of the batch"
        if len(shape) == 1
        else "use reduction='none' and reduce the non-batch dims (e.g. .mean(dim=1))"
    )
    return ValueError(
        f"loss_fn must return per-sample losses: got shape {shape}; expected (B,) = ({batch_size},): {hint}"
    )


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry of ``tensor`` (any shape) is finite: one sum and one sync, since a NaN or Inf
    makes the sum NaN or Inf; the entrywise test runs only when the sum is not finite (it may overflow)."""
    return math.isfinite(float(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_per_sample_losses(losses: Tensor, batch_size: int) -> Tensor:
    """Return ``losses`` if it is a tensor of shape (B,), else raise a ValueError that says why."""
    if not isinstance(losses, Tensor):
        raise ValueError(
            f"loss_fn must return a tensor of per-sample losses with shape (B,) = ({batch_size},); "
            f"got {type(losses).__name__}"
        )
    if tuple(losses.shape) != (batch_size,):
        raise losses_shape_error(tuple(losses.shape), batch_size)
    return losses


def check_no_batch_coupling(model: nn.Module) -> None:
    """Raise if a layer mixes samples (BatchNorm on batch statistics): per-sample Jacobians are then undefined."""
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and (module.training or module.running_mean is None):
            raise ValueError(
                f"module '{name or type(module).__name__}' ({type(module).__name__}) normalises with batch "
                "statistics (train mode, or no running statistics), so each sample's loss depends on the whole "
                "batch and no per-sample Jacobian exists. SvenWrapper(..., bn_mode='batch') takes the Jacobian "
                "of the batch's losses instead, bn_mode='frozen' uses the running statistics; or use "
                "nn.GroupNorm / nn.LayerNorm."
            )
