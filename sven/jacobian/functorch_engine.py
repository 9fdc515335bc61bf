"""The functorch engine: per-sample loss gradients by ``torch.func.vmap(grad)``.

Works for any model whose samples are independent along dim 0 of the input. It
materialises the Jacobian (B, n), n = P or the number of columns drawn by
``param_fraction``; samples are processed in chunks so that no more than
``chunk_elements`` gradient entries of the full parameter space exist at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from sven.jacobian.checks import losses_shape_error
from sven.jacobian.operator import DenseJacobian
from sven.jacobian.params import ParamSpace

LossFn = Callable[..., Tensor]


def per_sample_loss_grads(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Tensor,
    extra: tuple[Tensor, ...],
    names: list[str],
    values: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Per-sample gradients of the loss w.r.t. the named parameters.

    Returns (losses (B,), predictions (B, ...), [grad (B, *param.shape) per name]).
    Parameters not named are held constant. ``values`` (name → tensor, every
    parameter) evaluates the model at those values instead of its current ones.
    """
    named = dict(model.named_parameters()) if values is None else values
    chosen = {n: named[n].detach() for n in names}
    fixed = {} if values is None else {n: v for n, v in values.items() if n not in chosen}
    batch_size = targets.shape[0]

    def sample_loss(params: dict[str, Tensor], x: Any, y: Tensor, *rest: Tensor):
        add_batch = lambda t: t.unsqueeze(0)  # noqa: E731
        pred = functional_call(model, {**fixed, **params}, (torch.utils._pytree.tree_map(add_batch, x),))
        loss = loss_fn(pred, y.unsqueeze(0), *(r.unsqueeze(0) for r in rest))
        if not isinstance(loss, Tensor) or tuple(loss.shape) != (1,):
            shape = tuple(getattr(loss, "shape", ()))
            if shape and shape[0] != 1:
                raise ValueError(
                    f"loss_fn returned shape {shape} for one sample inside torch.func.vmap (expected (1,)): "
                    "it mixes samples, e.g. by closing over a batch-sized tensor; pass such tensors in the "
                    "batch as (x, y, *extra) so they are split per sample, or use engine='gram'"
                )
            raise losses_shape_error((batch_size, *shape[1:]) if shape else (), batch_size)
        return loss[0], (loss[0].detach(), pred[0].detach())

    grads, (losses, preds) = vmap(
        grad(sample_loss, has_aux=True), in_dims=(None, 0, 0, *([0] * len(extra))), randomness="different"
    )(chosen, inputs, targets, *extra)
    return losses, preds, [grads[n] for n in names]


def functorch_jacobian(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple,
    params: ParamSpace,
    columns: Tensor | None = None,
    chunk_elements: int = 1 << 25,
) -> tuple[Tensor, Tensor, DenseJacobian]:
    """Per-sample loss Jacobian, materialised.

    Args:
        batch: ``(x, y, *extra)`` with the batch along dim 0.
        columns: sorted flat parameter indices (n,) to keep, or None for all P.
        chunk_elements: bound on (samples per chunk) × P during the computation.

    Returns (losses (B,), predictions, DenseJacobian of shape (B, n)).
    """
    inputs, targets, *extra = batch
    batch_size = targets.shape[0]
    names = list(params.names)
    width = params.size if columns is None else columns.numel()
    dtype = params.tensors[0].dtype
    jacobian = torch.empty(batch_size, width, dtype=dtype, device=targets.device)
    chunk = max(1, min(batch_size, chunk_elements // params.size))
    losses, preds = [], []
    for start in range(0, batch_size, chunk):
        rows = slice(start, min(start + chunk, batch_size))
        chunk_losses, chunk_preds, grads = per_sample_loss_grads(
            model, loss_fn, torch.utils._pytree.tree_map(lambda t, rows=rows: t[rows], inputs), targets[rows],
            tuple(e[rows] for e in extra), names,
        )
        flat = params.flatten(grads, leading=(chunk_losses.shape[0],))
        jacobian[rows] = flat if columns is None else flat[:, columns]
        losses.append(chunk_losses)
        preds.append(chunk_preds)
    return torch.cat(losses), torch.cat(preds), DenseJacobian(jacobian)
