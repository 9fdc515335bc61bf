"""The Jacobian of a batch sharded over ranks, as one operator over the global batch."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from sven.distributed.communicator import Communicator, ShardLayout
from sven.jacobian import DenseJacobian, GradientBlock, GramJacobian, JacobianOperator, MaterializedBlock
from sven.jacobian.masks import MaskedJacobian

RowGather = Callable[[Tensor], Tensor]


def gathered_block(block: GradientBlock, gather: RowGather) -> GradientBlock:
    """``block`` over the global batch: its sample factors gathered, or its per-sample gradients if fewer.

    A rank sends, per sample, the block's factors (e.g. T·(d_in + d_out) values for a Linear
    over T positions) or its per-sample gradients (one value per parameter entry), whichever
    are fewer; a tie sends the factors.
    """
    factors = block.sample_factors()
    factor_values = sum(math.prod(factor.shape[1:]) for factor in factors)
    if factor_values <= sum(param.numel() for param in block.params):
        return block.with_sample_factors([gather(factor) for factor in factors])
    return MaterializedBlock(block.params, [gather(grads) for grads in block.per_sample()])


def gathered_operator(local: JacobianOperator, gather: RowGather, total_rows: int) -> JacobianOperator:
    """The operator over the global batch (total_rows, n) built from each rank's ``local`` one.

    ``gather`` maps a rank's (B_r, …) tensor to the ranks' tensors concatenated, (B_global, …).
    A GramJacobian gathers each block (``gathered_block``), a DenseJacobian its rows, a MaskedJacobian its base.
    """
    if isinstance(local, MaskedJacobian):
        return MaskedJacobian(gathered_operator(local.base, gather, total_rows), local.columns)
    if isinstance(local, GramJacobian):
        return GramJacobian([gathered_block(block, gather) for block in local.blocks], local.params, total_rows,
                            local.zero_params)
    if isinstance(local, DenseJacobian):
        return DenseJacobian(gather(local.dense()))
    raise TypeError(f"distributed Sven gathers a GramJacobian or a DenseJacobian; got {type(local).__name__}")


def _record(requested: list[Tensor], tensor: Tensor) -> Tensor:
    """A stand-in gather for the recording pass: note the tensor, hand it back unchanged."""
    requested.append(tensor)
    return tensor


class DistributedJacobian(JacobianOperator):
    """M over the global batch, shape (B_global, n), whose rows are spread over the ranks.

    Every rank holds one over the same M. ``rmatmul`` takes rank 0's u, applies the
    rank's own rows (Mᵀ_r u_r) and sums over ranks with one all-reduce of n values.
    ``gram``, ``dense``, ``matmul`` and ``nonfinite_rows`` use a replica of M built
    on first use from the ranks' all-gathered factors, so every rank sees the
    same B_global × B_global Gram matrix.
    """

    def __init__(self, local: JacobianOperator, comm: Communicator, layout: ShardLayout) -> None:
        if local.shape[0] != layout.sizes[layout.rank]:
            raise ValueError(
                f"the local Jacobian has {local.shape[0]} rows; rank {layout.rank}'s shard has "
                f"{layout.sizes[layout.rank]} samples"
            )
        self.local = local
        self.comm = comm
        self.layout = layout
        self.shape = (layout.total, local.shape[1])
        self.dtype = local.dtype
        self.device = local.device
        self._replica: JacobianOperator | None = None

    def replica(self) -> JacobianOperator:
        """M over the global batch on this rank (gathered once, then kept).

        A first pass records the tensors the blocks ask to gather (in call order); they
        travel together, one all-gather per dtype; a second pass builds the blocks from them.
        """
        if self._replica is None:
            requested: list[Tensor] = []
            gathered_operator(self.local, partial(_record, requested), self.layout.total)
            gathered = iter(self.comm.all_gather_rows_many(requested, self.layout.sizes))
            self._replica = gathered_operator(self.local, lambda _: next(gathered), self.layout.total)
        return self._replica


    def _compute_gram(self) -> Tensor:
        return self.replica().gram()

    def dense(self) -> Tensor:
        return self.replica().dense()

    def masked_gram(self, columns: Tensor) -> Tensor:
        return self.replica().masked_gram(columns)

    def matmul(self, v: Tensor) -> Tensor:
        self.comm.require_replicated(v, "the vector passed to M·v")
        return self.replica().matmul(v)

    def rmatmul(self, u: Tensor) -> Tensor:
        shared = self.comm.broadcast_from_first(u.to(torch.float64))
        return self.comm.all_reduce_sum(self.local.rmatmul(shared[self.layout.local]))

    def nonfinite_rows(self) -> Tensor:
        return self.replica().nonfinite_rows()
