"""Multi-process Sven on torch.distributed: the exact global-batch step with the batch sharded over ranks.

See docs/DISTRIBUTED.md for the design and the bytes communicated per step.
"""

from sven.distributed.communicator import CommStats, Communicator, ShardLayout
from sven.distributed.operator import DistributedJacobian, gathered_operator
from sven.distributed.wrapper import DistributedSvenWrapper, bare_module

__all__ = [
    "CommStats",
    "Communicator",
    "DistributedJacobian",
    "DistributedSvenWrapper",
    "ShardLayout",
    "bare_module",
    "gathered_operator",
]
