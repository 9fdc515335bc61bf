"""DistributedSvenWrapper: the exact global-batch Sven step with the batch sharded over ranks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from sven.distributed.communicator import Communicator
from sven.distributed.operator import DistributedJacobian
from sven.jacobian import RowTransformedJacobian
from sven.nn.residuals import residuals_and_row_map
from sven.nn.wrapper import JacobianState, SvenWrapper


def bare_module(model: nn.Module) -> nn.Module:
    """``model.module`` for a DistributedDataParallel model, else ``model`` itself.

    Sven sums Mᵀc over ranks itself, so DDP's gradient all-reduce is never used:
    Sven runs the bare module (whose parameters DDP shares).
    """
    return model.module if isinstance(model, DistributedDataParallel) else model


class DistributedSvenWrapper(SvenWrapper):
    """A ``SvenWrapper`` whose batch is split over the ranks of a torch.distributed process group.

    Each rank calls ``loss_and_grad`` with its own shard (shards may differ in
    size); the global batch is the ranks' shards in rank order. The operator left
    in ``state`` is M over the global batch, so an unchanged ``Sven`` optimizer
    takes, on every rank, exactly the step one process would take on the whole
    batch: every rank assembles the same B_global × B_global Gram matrix from
    all-gathered per-layer factors (Gram engine) or Jacobian rows (functorch
    engine), solves the same eigenproblem, and sums Mᵀc over ranks with one
    all-reduce. Parameters and buffers start from rank 0's values.

    Args:
        model: the module, or a ``DistributedDataParallel`` around it (its ``.module`` is used).
        process_group: the group whose ranks share the batch (None: the default group).
        **options: as for ``SvenWrapper`` (keywords); microbatch groups are formed in the global order.
            BatchNorm layers must not normalise with batch statistics (each rank would see only its
            shard's): ``bn_mode="batch"`` with a BatchNorm layer in train mode is refused, at
            construction and at every ``loss_and_grad``; use ``bn_mode="frozen"`` or eval mode.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        device: torch.device | str | None = None,
        process_group: dist.ProcessGroup | None = None,
        **options: Any,
    ) -> None:
        if options.get("residual_fn") is not None:
            raise ValueError("DistributedSvenWrapper takes a per-sample loss_fn; residual_fn is not supported "
                             "across ranks (its rows are assembled per process): use SvenWrapper(residual_fn=...)")
        super().__init__(bare_module(model), loss_fn, device, **options)
        self._refuse_batch_statistics()
        self.comm = Communicator(process_group, self.device)
        self.comm.broadcast_module_(self.model)
        self._step_columns: Tensor | None = None

    def _refuse_batch_statistics(self) -> None:
        """Raise if a BatchNorm layer would normalise with batch statistics (no SyncBatchNorm semantics here)."""
        layers = self.batchnorm.batch_statistics_layers()
        if layers:
            raise ValueError(
                f"BatchNorm layer(s) {layers} normalise with batch statistics (bn_mode='batch' and train mode); "
                "DistributedSvenWrapper does not combine them across ranks (SyncBatchNorm semantics), so "
                "each loss would depend on one rank's shard only. Use bn_mode='frozen' (running statistics) "
                "or put those layers in eval mode."
            )

    def draw_columns(self) -> Tensor | None:
        """The columns agreed for the current step: rank 0's draw, on every rank."""
        return self._step_columns

    def _agreed_columns(self) -> Tensor | None:
        """Every rank draws (their RNG streams advance alike); rank 0's draw is broadcast (8·n bytes)."""
        columns = super().draw_columns()
        return None if columns is None else self.comm.broadcast_from_first(columns)

    def batch_losses(self, batch: tuple) -> Tensor:
        """Per-sample losses (B_global,) of the global batch as the model is now, given this rank's shard.

        Forward only, then two all-gathers (shard sizes, losses): every rank must call it,
        as Sven's loss-driven searches (``damping="adaptive"``, ``variable_k``) do in lockstep,
        so that all ranks accept or reject a try on the same global loss.
        """
        local = super().batch_losses(batch)
        layout = self.comm.shard_layout(local.shape[0], failed=False)
        return self.comm.all_gather_rows(local, layout.sizes)

    def loss_and_grad(self, batch: Sequence[Any]) -> tuple[Tensor, Tensor]:
        """Forward this rank's shard ``(x, y, *extra)`` and build the Jacobian of the global residuals.

        Returns this rank's (per-sample losses (B_r,), predictions), detached; ``state.losses``
        holds the global losses (B_global,). An error on any rank is raised on every rank
        (the others raise a RuntimeError naming it) instead of leaving them waiting.
        """
        self._step_columns = self._agreed_columns()
        failure: Exception | None = None
        try:
            self._refuse_batch_statistics()
            local_losses, preds = super().loss_and_grad(batch)
        except Exception as error:  # re-raised below, after every rank has learnt of it
            failure = error
        layout = self.comm.shard_layout(0 if failure else local_losses.shape[0], failed=failure is not None)
        if failure is not None or layout.failed_ranks:
            self.state = None
        if failure is not None:
            raise failure
        if layout.failed_ranks:
            raise RuntimeError(
                f"loss_and_grad raised on rank(s) {list(layout.failed_ranks)} (see their error); "
                f"rank {layout.rank} stops too so that no rank waits for the others"
            )
        local = self.state
        base = local.operator.base if isinstance(local.operator, RowTransformedJacobian) else local.operator
        losses = self.comm.all_gather_rows(local.losses, layout.sizes)
        residuals, row_map = residuals_and_row_map(losses, self.microbatch_size, self.kappa)
        operator = DistributedJacobian(base, self.comm, layout)
        if row_map is not None:
            operator = RowTransformedJacobian(operator, row_map)
        self.state = JacobianState(operator, residuals, losses, local.columns, local.batch)
        return local_losses, preds
