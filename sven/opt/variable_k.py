"""The paper's greedy ``variable_k``: add singular directions one at a time while the batch loss falls."""

from __future__ import annotations

from collections.abc import Callable


def greedy_rank(rank_kept: int, loss_with_rank: Callable[[int], float]) -> int:
    """The rank (1 … rank_kept) after which adding the next direction first raises the batch loss.

    ``loss_with_rank(j)`` is the batch loss after the step built from the j leading
    triplets; it is called at most ``rank_kept`` times (one forward pass each) and
    stops at the first j whose loss is not below the loss of j − 1.
    """
    best_rank, best_loss = 1, loss_with_rank(1)
    for rank in range(2, rank_kept + 1):
        loss = loss_with_rank(rank)
        if not loss < best_loss:
            break
        best_rank, best_loss = rank, loss
    return best_rank
