"""The collectives distributed Sven uses, over one process group, with the bytes each moves counted.

Sizes counted (per rank, per call) are payloads, not wire traffic: an all-gather
counts the gathered result (every rank's padded rows), an all-reduce and a
broadcast the tensor they act on. ``docs/DISTRIBUTED.md`` relates them to the
wire traffic of ring algorithms.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class CommStats:
    """Payload bytes of this rank's collectives, by kind, the number of calls and the host wall time in them.

    ``seconds`` includes waiting for the slowest rank; with nccl it is launch time unless synchronised.
    """

    all_gather_bytes: int = 0
    all_reduce_bytes: int = 0
    broadcast_bytes: int = 0
    calls: int = 0
    seconds: float = 0.0

    @property
    def total_bytes(self) -> int:
        return self.all_gather_bytes + self.all_reduce_bytes + self.broadcast_bytes


@dataclass(frozen=True)
class ShardLayout:
    """How a global batch is split over the ranks: ``sizes[r]`` samples on rank r, rank 0's first.

    ``failed_ranks`` lists the ranks whose local pass raised (their size is 0).
    """

    sizes: tuple[int, ...]
    rank: int
    failed_ranks: tuple[int, ...] = field(default=())

    @property
    def total(self) -> int:
        """B_global, the number of samples over all ranks."""
        return sum(self.sizes)

    @property
    def local(self) -> slice:
        """This rank's rows within the global batch."""
        start = sum(self.sizes[: self.rank])
        return slice(start, start + self.sizes[self.rank])


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Communicator:
    """All-gather, all-reduce and broadcast over ``process_group`` (None: the default group), counting bytes.

    Tensors travel on ``device`` (CPU for gloo, the rank's GPU for nccl).
    """

    def __init__(self, process_group: dist.ProcessGroup | None, device: torch.device) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "distributed Sven needs an initialised torch.distributed process group; got none. Call "
                "torch.distributed.init_process_group(backend) first (torchrun sets the environment for it)."
            )
        self.group = process_group if process_group is not None else dist.group.WORLD
        self.device = device
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.first_rank = dist.get_global_rank(self.group, 0)
        self.stats = CommStats()

    def take_stats(self) -> CommStats:
        """The bytes counted since the last call (or construction), and a fresh count from here on."""
        stats, self.stats = self.stats, CommStats()
        return stats

    def shard_layout(self, local_size: int, failed: bool) -> ShardLayout:
        """All-gather every rank's (sample count, failed flag): one collective of 2·W int64."""
        mine = torch.tensor([local_size, int(failed)], dtype=torch.int64, device=self.device)
        table = self._all_gather(mine).view(self.world_size, 2).cpu()
        failed_ranks = tuple(int(r) for r in torch.nonzero(table[:, 1]).flatten())
        return ShardLayout(tuple(int(s) for s in table[:, 0]), self.rank, failed_ranks)

    def all_gather_rows(self, tensor: Tensor, sizes: tuple[int, ...]) -> Tensor:
        """Rank r's ``tensor`` (sizes[r], *rest) → all of them concatenated along dim 0, (Σ sizes, *rest)."""
        return self.all_gather_rows_many([tensor], sizes)[0]

    def all_gather_rows_many(self, tensors: list[Tensor], sizes: tuple[int, ...]) -> list[Tensor]:
        """``all_gather_rows`` for several tensors (each (sizes[r], *rest)) with one all-gather per dtype.

        Each rank packs its tensors side by side as (sizes[r], columns), pads the rows to
        max(sizes) for the collective; the padding is dropped and the tensors unpacked after.
        """
        for tensor in tensors:
            if tensor.shape[0] != sizes[self.rank]:
                raise ValueError(
                    f"rank {self.rank} holds {tensor.shape[0]} rows; the shard layout says {sizes[self.rank]}"
                )
        gathered: list[Tensor | None] = [None] * len(tensors)
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            positions = [i for i, t in enumerate(tensors) if t.dtype == dtype]
            columns = [tensors[i].reshape(sizes[self.rank], math.prod(tensors[i].shape[1:])) for i in positions]
            padded = columns[0].new_zeros(max(sizes), sum(c.shape[1] for c in columns))
            padded[: sizes[self.rank]] = torch.cat(columns, dim=1)
            ranks = self._all_gather(padded).view(self.world_size, *padded.shape)
            packed = torch.cat([ranks[r, :size] for r, size in enumerate(sizes)])
            for i, part in zip(positions, packed.split([c.shape[1] for c in columns], dim=1)):
                gathered[i] = part.reshape(packed.shape[0], *tensors[i].shape[1:])
        return gathered

    def _all_gather(self, tensor: Tensor) -> Tensor:
        """(W·n, …) from each rank's (n, …) of equal shapes."""
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        started = time.perf_counter()
        dist.all_gather(parts, tensor, group=self.group)
        self._count(started)
        result = torch.cat(parts)
        self.stats.all_gather_bytes += _nbytes(result)
        return result

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The sum of every rank's ``tensor`` (equal shapes), on every rank."""
        total = tensor.contiguous().clone()
        started = time.perf_counter()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        self._count(started)
        self.stats.all_reduce_bytes += _nbytes(total)
        return total

    def broadcast_from_first(self, tensor: Tensor) -> Tensor:
        """Rank 0's ``tensor`` on every rank (shapes and dtypes must agree across ranks)."""
        shared = tensor.contiguous().clone()
        started = time.perf_counter()
        dist.broadcast(shared, src=self.first_rank, group=self.group)
        self._count(started)
        self.stats.broadcast_bytes += _nbytes(shared)
        return shared

    def _count(self, started: float) -> None:
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - started

    @torch.no_grad()
    def broadcast_module_(self, module: nn.Module) -> None:
        """In place: every parameter and buffer of ``module`` set to rank 0's values (as DDP does at start)."""
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.copy_(self.broadcast_from_first(tensor))

    def require_replicated(self, tensor: Tensor, what: str) -> None:
        """Raise RuntimeError on every rank unless ``tensor`` is bit-identical on all ranks (2·W float64 exchanged)."""
        flat = tensor.detach().reshape(-1).to(torch.float64)
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        checksum = torch.stack([flat.sum(), (flat * weights).sum()]).to(self.device)
        table = self._all_gather(checksum).view(self.world_size, 2)
        if not bool((table == table[0]).all()):
            raise RuntimeError(
                f"{what} differs between ranks (checksums differ); every rank must pass the same "
                "tensor. The randomized svd modes draw their test matrix from the optimizer's generator, seeded "
                "from torch's global RNG at its first use: seed that alike on every rank (torch.manual_seed(seed) "
                "with the same seed before the first step), or use svd_mode='auto'."
            )
