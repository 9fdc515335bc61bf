"""The Gram engine's fallback for parameters without a Gram rule, in bounded memory.

Per-sample gradients of those parameters come from ``torch.func`` (vmap of grad) and
are never held for all of them at once: ``gram()`` evaluates them in chunks of at
most ``chunk_numel`` gradient entries (samples × parameter entries) and sums the
chunks' Gram matrices; ``weighted_sum(c)`` is the gradient of Σ_i c_i l_i, one
ordinary batched backward, with no per-sample gradient at all. When all of them fit in
one chunk they are evaluated once and kept for both.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from sven.jacobian.blocks import GradientBlock
from sven.jacobian.functorch_engine import LossFn, per_sample_loss_grads


def parameter_chunks(numels: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups of parameter indices of at most ``budget`` entries each (a larger parameter alone)."""
    chunks: list[list[int]] = []
    size = 0
    for index, numel in enumerate(numels):
        if chunks and size + numel <= budget:
            chunks[-1].append(index)
            size += numel
        else:
            chunks.append([index])
            size = numel
    return chunks


def _gram_between(left: list[Tensor], right: list[Tensor]) -> Tensor:
    """Σ over parameters of ⟨g_i, g_j⟩ for per-sample gradients (n, *shape) and (m, *shape): (n, m) float64."""
    return sum(
        a.reshape(a.shape[0], -1).to(torch.float64) @ b.reshape(b.shape[0], -1).to(torch.float64).T
        for a, b in zip(left, right)
    )


class RecomputedBlock(GradientBlock):
    """Per-sample gradients of ``names`` recomputed from the model, loss and batch when asked for.

    The block keeps the batch ``(x, y, *extra)`` and a copy of every parameter's value
    (P entries, so later in-place updates of the model do not change it).

    Memory: ``gram()`` holds at most ``chunk_numel`` per-sample gradient entries at once.
    Parameters are grouped into chunks of at most ``chunk_numel // B`` entries (a larger
    tensor is a chunk of its own), and each chunk's B per-sample gradients are evaluated
    together when B × chunk ≤ ``chunk_numel``; otherwise (one tensor larger than that) in
    groups of ``chunk_numel // (2·numel)`` samples, two groups held at a time, at the cost
    of re-evaluating the groups for every pair (about B·numel / chunk_numel times the work).
    When B × (all the block's parameter entries) ≤ ``chunk_numel`` the per-sample gradients
    are evaluated once and kept.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: tuple, names: list[str], chunk_numel: int) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.batch = batch
        self.names = names
        named = dict(model.named_parameters())
        self.values = {name: p.detach().clone() for name, p in named.items()}
        self.params = tuple(named[name] for name in names)
        self.chunk_numel = chunk_numel

    @property
    def batch_size(self) -> int:
        return self.batch[1].shape[0]

    def _grads(self, names: list[str], rows: slice) -> list[Tensor]:
        """Per-sample gradients (len(rows), *shape) of ``names`` for the samples ``rows``."""
        inputs, targets, *extra = self.batch
        with torch.no_grad():
            return per_sample_loss_grads(
                self.model, self.loss_fn, tree_map(lambda t: t[rows], inputs), targets[rows],
                tuple(e[rows] for e in extra), names, self.values,
            )[2]

    @cached_property
    def _kept(self) -> list[Tensor] | None:
        """All per-sample gradients if they fit in one chunk, else None."""
        if self.batch_size * sum(p.numel() for p in self.params) > self.chunk_numel:
            return None
        return self.per_sample()

    def sample_sums(self) -> Tensor:
        """The Gram diagonal ‖g_i‖² (B,): non-finite exactly where a gradient is (bounded memory, computed once)."""
        return self.gram().diagonal()

    def factor_totals(self) -> list[Tensor]:
        """The trace of its Gram matrix (its per-sample gradients are not kept as factors)."""
        return [self.sample_sums().sum()]

    def gram(self) -> Tensor:
        return self._gram

    @cached_property
    def _gram(self) -> Tensor:
        if self._kept is not None:
            return _gram_between(self._kept, self._kept)
        batch = self.batch_size
        gram = torch.zeros(batch, batch, dtype=torch.float64, device=self.batch[1].device)
        numels = [p.numel() for p in self.params]
        for chunk in parameter_chunks(numels, max(1, self.chunk_numel // batch)):
            names = [self.names[i] for i in chunk]
            size = sum(numels[i] for i in chunk)
            rows = batch if batch * size <= self.chunk_numel else max(1, self.chunk_numel // (2 * size))
            groups = [slice(start, min(start + rows, batch)) for start in range(0, batch, rows)]
            for position, first in enumerate(groups):
                left = self._grads(names, first)
                gram[first, first] += _gram_between(left, left)
                for second in groups[position + 1:]:
                    block = _gram_between(left, self._grads(names, second))
                    gram[first, second] += block
                    gram[second, first] += block.T
        return gram

    def weighted_sum(self, coeffs: Tensor) -> list[Tensor]:
        """Σ_i c_i g_i from the kept per-sample gradients, else as the gradient of Σ_i c_i l_i w.r.t. the
        block's parameters: one batched forward and backward."""
        if self._kept is not None:
            return [torch.tensordot(coeffs.to(g.dtype), g, dims=1) for g in self._kept]
        inputs, targets, *extra = self.batch
        leaves = {name: self.values[name].detach().requires_grad_() for name in self.names}
        with torch.enable_grad():
            preds = functional_call(self.model, {**self.values, **leaves}, (inputs,))
            losses = self.loss_fn(preds, targets, *extra)
            return list(torch.autograd.grad(losses @ coeffs.to(losses.dtype), list(leaves.values())))

    def sample_dots(self, values: list[Tensor]) -> Tensor:
        """⟨g_i, v⟩ per sample (B,): one forward-mode product of the per-sample losses along v, no gradient held."""
        inputs, targets, *extra = self.batch
        tangents = {name: value.to(self.values[name].dtype) for name, value in zip(self.names, values)}

        def losses(chosen: dict[str, Tensor]) -> Tensor:
            return self.loss_fn(functional_call(self.model, {**self.values, **chosen}, (inputs,)), targets, *extra)

        primals = {name: self.values[name] for name in self.names}
        return torch.func.jvp(losses, (primals,), (tangents,))[1].detach().to(torch.float64)

    def per_sample(self) -> list[Tensor]:
        return self._grads(self.names, slice(None))
