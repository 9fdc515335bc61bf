"""param_fraction masks: which Jacobian columns a step differentiates and moves, and M restricted to them.

Each step draws the kept entries as sorted flat parameter indices (n,) — the columns of
M and the only entries the update writes — in one of ``MASK_MODES``:

- ``"elementwise"``: a uniformly random subset of ⌊f·P⌋ flat indices;
- ``"rows"``: whole output units (a weight row with its bias entry) of every Linear /
  Conv / Embedding, max(1, round(f·d_out)) per layer; the other parameters elementwise;
- ``"tensor"``: whole parameter tensors, a random subset holding ≈ f·P entries (at least one).

``MaskedJacobian`` restricts a Gram-engine operator to those columns: its Gram matrix
sums each block's ``masked_gram`` and never forms M on the fast path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sven.jacobian.gram_engine import GramJacobian
from sven.jacobian.operator import JacobianOperator
from sven.jacobian.params import ParamSpace

MASK_MODES = ("elementwise", "rows", "tensor")

UNIT_AXIS = {nn.Linear: 0, nn.Conv1d: 0, nn.Conv2d: 0, nn.Conv3d: 0, nn.Embedding: 1}
"""The weight axis that indexes a layer's output units (an Embedding's units are its dimensions)."""


@dataclass(frozen=True)
class OutputUnits:
    """One layer's ``count`` output units; unit u is index u along ``axis`` of each (parameter position, axis)."""

    count: int
    members: tuple[tuple[int, int], ...]


def output_units(model: nn.Module, params: ParamSpace) -> list[OutputUnits]:
    """The output units of every Linear / Conv / Embedding whose weight is trainable (bias included if trainable)."""
    position = {id(p): i for i, p in enumerate(params.tensors)}
    layers, seen = [], set()
    for module in model.modules():
        axis = UNIT_AXIS.get(type(module))
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if axis is None or weight is None or id(weight) not in position or id(weight) in seen:
            continue
        members = [(position[id(weight)], axis)]
        if bias is not None and id(bias) in position and id(bias) not in seen:
            members.append((position[id(bias)], 0))
        seen.update(id(params.tensors[i]) for i, _ in members)
        layers.append(OutputUnits(weight.shape[axis], tuple(members)))
    return layers


def draw_columns(mode: str, params: ParamSpace, units: list[OutputUnits], fraction: float,
                 generator: torch.Generator) -> Tensor:
    """Sorted flat indices (n,) of the entries kept this step, drawn from ``generator`` (``units``: for "rows")."""
    device = generator.device
    keep = torch.zeros(params.size, dtype=torch.bool, device=device)
    if mode == "elementwise":
        keep[_random_subset(params.size, fraction, generator)] = True
        return keep.nonzero().squeeze(1)
    parts = keep.split(params.numels)
    if mode == "tensor":
        order = torch.randperm(len(params.tensors), generator=generator, device=device).tolist()
        totals = torch.tensor([params.numels[i] for i in order]).cumsum(0)
        for i in order[: int((totals - fraction * params.size).abs().argmin()) + 1]:
            parts[i].fill_(True)
        return keep.nonzero().squeeze(1)
    for layer in units:
        take = max(1, round(fraction * layer.count))
        chosen = torch.randperm(layer.count, generator=generator, device=device)[:take]
        for position, axis in layer.members:
            parts[position].view(params.tensors[position].shape).index_fill_(axis, chosen, True)
    covered = {position for layer in units for position, _ in layer.members}
    rest = [parts[i] for i in range(len(parts)) if i not in covered]
    if rest:
        rest_keep = torch.zeros(sum(part.numel() for part in rest), dtype=torch.bool, device=device)
        rest_keep[_random_subset(rest_keep.numel(), fraction, generator)] = True
        for part, drawn in zip(rest, rest_keep.split([part.numel() for part in rest])):
            part.copy_(drawn)
    return keep.nonzero().squeeze(1)


def _random_subset(total: int, fraction: float, generator: torch.Generator) -> Tensor:
    """Random indices (max(1, ⌊f·total⌋),) of range(total), unsorted."""
    count = max(1, int(fraction * total))
    return torch.randperm(total, device=generator.device, generator=generator)[:count]


class MaskedJacobian(JacobianOperator):
    """M restricted to ``columns``: (rows, n) for a GramJacobian (rows, P) and sorted flat indices (n,).

    ``gram()`` sums each block's ``masked_gram`` over its kept entries; ``rmatmul`` is the
    full Mᵀu (one weighted sum, P values) read at the columns.
    """

    def __init__(self, base: GramJacobian, columns: Tensor) -> None:
        self.base = base
        self.columns = columns
        self.shape = (base.shape[0], columns.numel())
        self.dtype = base.dtype
        self.device = base.device

    def _full_mask(self, chosen: Tensor | None = None) -> Tensor:
        """A boolean mask (P,) of the base's columns: all of ``columns``, or those of them ``chosen`` (n,) keeps."""
        keep = torch.zeros(self.base.params.size, dtype=torch.bool, device=self.columns.device)
        keep[self.columns if chosen is None else self.columns[chosen]] = True
        return keep

    def _compute_gram(self) -> Tensor:
        return self.base.masked_gram(self._full_mask())

    def masked_gram(self, columns: Tensor) -> Tensor:
        return self.base.masked_gram(self._full_mask(columns))

    def nonfinite_rows(self) -> Tensor:
        """Rows of M holding a NaN or Inf: none while the base's rows are finite (M's entries are some of the
        base's), which its factors tell without a Gram matrix; else the masked Gram diagonal decides."""
        if "_cached_gram" in self.__dict__ or bool(self.base.nonfinite_rows().any()):
            return super().nonfinite_rows()
        return torch.zeros(self.shape[0], dtype=torch.bool, device=self.device)

    def matmul(self, v: Tensor) -> Tensor:
        full = torch.zeros(self.base.shape[1], *v.shape[1:], dtype=v.dtype, device=v.device)
        full[self.columns] = v
        return self.base.matmul(full)

    def rmatmul(self, u: Tensor) -> Tensor:
        return self.base.rmatmul(u)[self.columns]

    def dense(self) -> Tensor:
        return self.base.dense_columns(self.columns)
