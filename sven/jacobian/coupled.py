"""The Jacobian of per-sample losses that depend on the whole batch (BatchNorm with batch statistics).

When layers normalise with the batch's statistics, loss i depends on every sample, so no
per-sample pass gives row i of M = dl/dθ. This engine materialises M (B, n) from one forward of
the batch and one backward pass per row through that same graph (``torch.autograd.grad`` of l_i).
Cost: B backward passes of the whole batch where SGD takes one, and B·n entries for M.

One plain backward per row was measured faster on CPU than batching rows with
``is_grads_batched=True`` (a vmap over one-hot cotangents): for a 2-conv CNN with BatchNorm2d,
B = 256, P = 9146, single thread, 4.1 s against 8.5–14 s for blocks of 8 to 256 rows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sven.jacobian.checks import check_per_sample_losses
from sven.jacobian.functorch_engine import LossFn
from sven.jacobian.operator import DenseJacobian
from sven.jacobian.params import ParamSpace


def coupled_jacobian(
    model: nn.Module, loss_fn: LossFn, batch: tuple, params: ParamSpace, columns: Tensor | None = None
) -> tuple[Tensor, Tensor, DenseJacobian]:
    """Jacobian of the losses of one batched forward w.r.t. the parameters, materialised.

    Args:
        batch: ``(x, y, *extra)`` with the batch along dim 0; the model runs on it once.
        columns: sorted flat parameter indices (n,) to keep, or None for all P.

    Returns (losses (B,), predictions, DenseJacobian of shape (B, n)).
    """
    inputs, targets, *extra = batch
    batch_size = targets.shape[0]
    with torch.enable_grad():
        preds = model(inputs)
        losses = check_per_sample_losses(loss_fn(preds, targets, *extra), batch_size)
        width = params.size if columns is None else columns.numel()
        jacobian = torch.empty(batch_size, width, dtype=params.tensors[0].dtype, device=losses.device)
        for row in range(batch_size):
            grads = torch.autograd.grad(
                losses[row], params.tensors, retain_graph=row + 1 < batch_size, allow_unused=True
            )
            flat = params.flatten([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.tensors)])
            jacobian[row] = flat if columns is None else flat[columns]
    return losses.detach(), preds.detach(), DenseJacobian(jacobian)
