"""The flat parameter space a Jacobian's columns index."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ParamSpace:
    """The trainable parameters of a model, flattened in a fixed order.

    Column j of every Jacobian is entry j of ``torch.cat([p.reshape(-1) for p in tensors])``.
    Parameters with ``requires_grad=False`` are not part of the space.
    """

    names: tuple[str, ...]
    tensors: tuple[Tensor, ...]

    @classmethod
    def of_module(cls, model: nn.Module) -> ParamSpace:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameter with requires_grad=True: nothing to optimise")
        names, tensors = zip(*named)
        return cls(tuple(names), tuple(tensors))

    @property
    def numels(self) -> list[int]:
        return [p.numel() for p in self.tensors]

    @property
    def size(self) -> int:
        """P, the number of scalar parameters."""
        return sum(self.numels)

    @property
    def offsets(self) -> Tensor:
        """Start of each parameter's slice in the flat vector, shape (len(tensors) + 1,)."""
        return torch.tensor([0, *self.numels]).cumsum(0)

    def per_entry(self, values: list[float], columns: Tensor | None = None,
                  device: torch.device | None = None) -> Tensor:
        """One value per parameter tensor spread over its entries: (P,) float64, or (n,) at sorted ``columns``."""
        spread = torch.repeat_interleave(torch.tensor(values, dtype=torch.float64), torch.tensor(self.numels))
        spread = spread.to(device if device is not None else self.tensors[0].device)
        return spread if columns is None else spread[columns]

    def flatten(self, per_param: list[Tensor], leading: tuple[int, ...] = ()) -> Tensor:
        """Concatenate tensors shaped ``(*leading, *p.shape)`` into ``(*leading, P)``."""
        return torch.cat([t.reshape(*leading, -1) for t in per_param], dim=len(leading))

    def scale_(self, factors: list[float], columns: Tensor | None = None) -> None:
        """In place: parameter *= factor, one factor per tensor; with ``columns`` (sorted flat indices)
        only those entries (the others stay bit-identical). A factor of 1 writes nothing."""
        offsets = self.offsets.to(columns.device) if columns is not None else None
        for i, (p, factor) in enumerate(zip(self.tensors, factors)):
            if factor == 1:
                continue
            if columns is None:
                p.mul_(factor)
                continue
            mine = columns[(columns >= offsets[i]) & (columns < offsets[i + 1])] - offsets[i]
            p.view(-1)[mine] *= factor

    def add_flat_(self, flat_step: Tensor, scales: list[float], columns: Tensor | None = None) -> None:
        """In place: parameter += scale · step for a flat step vector.

        ``flat_step`` has shape (P,) when ``columns`` is None, else (n,) with
        ``columns`` (n,) the sorted flat indices it belongs to; entries outside
        ``columns`` are not written at all (they stay bit-identical).
        """
        if columns is None:
            chunks = [chunk.view_as(p).to(p.dtype) for chunk, p in zip(flat_step.split(self.numels), self.tensors)]
            if len(set(scales)) == 1:  # one scale: one multi-tensor op (the same p + scale·chunk, one dispatch)
                torch._foreach_add_(list(self.tensors), chunks, alpha=scales[0])
                return
            for p, chunk, scale in zip(self.tensors, chunks, scales):
                p.add_(chunk, alpha=scale)
            return
        offsets = self.offsets.tolist()
        bounds = torch.searchsorted(columns, torch.tensor(offsets, device=columns.device)).tolist()
        for i, (p, scale) in enumerate(zip(self.tensors, scales)):
            mine = slice(bounds[i], bounds[i + 1])
            if mine.start < mine.stop:
                p.view(-1).index_add_(0, columns[mine] - offsets[i], flat_step[mine].to(p.dtype), alpha=scale)
