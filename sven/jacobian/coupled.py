"""The Jacobian of per-sample losses that depend on the whole batch (BatchNorm with batch statistics).

When layers normalise with the batch's statistics, loss i depends on every sample, so no
per-sample pass gives row i of M = dl/dθ. This engine materialises M (B, n) from one forward of
the batch and ⌈B / chunk⌉ batched backward passes through that same graph
(``torch.autograd.grad(..., is_grads_batched=True)``: a vmap over ``chunk`` one-hot cotangents),
chunk = max(1, chunk_elements // P). Cost: about B backward passes of the batch (SGD needs one),
B·n entries for M plus chunk·P while a chunk is assembled.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sven.jacobian.checks import check_per_sample_losses
from sven.jacobian.functorch_engine import LossFn
from sven.jacobian.operator import DenseJacobian
from sven.jacobian.params import ParamSpace


def coupled_jacobian(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple,
    params: ParamSpace,
    columns: Tensor | None = None,
    chunk_elements: int = 1 << 25,
) -> tuple[Tensor, Tensor, DenseJacobian]:
    """Jacobian of the losses of one batched forward w.r.t. the parameters, materialised.

    Args:
        batch: ``(x, y, *extra)`` with the batch along dim 0; the model runs on it once.
        columns: sorted flat parameter indices (n,) to keep, or None for all P.
        chunk_elements: bound on (rows per backward) × P.

    Returns (losses (B,), predictions, DenseJacobian of shape (B, n)).
    """
    inputs, targets, *extra = batch
    batch_size = targets.shape[0]
    with torch.enable_grad():
        preds = model(inputs)
        losses = check_per_sample_losses(loss_fn(preds, targets, *extra), batch_size)
        width = params.size if columns is None else columns.numel()
        jacobian = torch.empty(batch_size, width, dtype=params.tensors[0].dtype, device=losses.device)
        identity = torch.eye(batch_size, dtype=losses.dtype, device=losses.device)
        chunk = max(1, min(batch_size, chunk_elements // params.size))
        for start in range(0, batch_size, chunk):
            rows = slice(start, min(start + chunk, batch_size))
            grads = torch.autograd.grad(
                losses, params.tensors, grad_outputs=identity[rows], is_grads_batched=True,
                retain_graph=rows.stop < batch_size, allow_unused=True,
            )
            count = rows.stop - rows.start
            grads = [torch.zeros(count, *p.shape, dtype=p.dtype, device=p.device) if g is None else g
                     for g, p in zip(grads, params.tensors)]
            flat = params.flatten(grads, leading=(count,))
            jacobian[rows] = flat if columns is None else flat[:, columns]
    return losses.detach(), preds.detach(), DenseJacobian(jacobian)
