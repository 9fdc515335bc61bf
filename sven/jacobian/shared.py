"""Blocks of different layers that share a parameter (a tied LM head and token Embedding) as one block.

For parts a, b with per-sample gradients g^a, g^b (zero on the parameters a part does not hold),
the per-sample gradient is g = Σ_a g^a and ⟨g_i, g_j⟩ = Σ_a ⟨g^a_i, g^a_j⟩ + Σ_{a≠b} ⟨g^a_i, g^b_j⟩.
Each part keeps its own (factored) Gram; a cross term C_ab[i, j] = ⟨g^a_i, g^b_j⟩ takes b's per-sample
gradients of the shared parameters (B, *shape) into a's ``sample_dots_many``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from sven.jacobian.blocks import GradientBlock


class SharedParameterBlock(GradientBlock):
    """The sum of ``parts``, blocks of different layers with at least one parameter in common."""

    def __init__(self, parts: list[GradientBlock]) -> None:
        self.parts = parts
        self.params = tuple({id(p): p for part in parts for p in part.params}.values())

    def _values_for(self, part: GradientBlock, values: dict[int, Tensor], leading: tuple[int, ...] = ()
                    ) -> list[Tensor]:
        """``values`` (one tensor (*leading, *shape) per parameter id) for ``part``'s parameters, zeros where absent."""
        return [values[id(p)] if id(p) in values else p.new_zeros(*leading, *p.shape) for p in part.params]

    def _cross(self, left: GradientBlock, right: GradientBlock) -> Tensor:
        """(B, B) float64 ⟨g^left_i, g^right_j⟩ over their common parameters."""
        common = {id(p) for p in left.params} & {id(p) for p in right.params}
        grads = {id(p): g for p, g in zip(right.params, right.per_sample()) if id(p) in common}
        batch = next(iter(grads.values())).shape[0]
        return left.sample_dots_many(self._values_for(left, grads, (batch,)))

    def gram(self) -> Tensor:
        gram = sum(part.gram() for part in self.parts)
        for a, left in enumerate(self.parts):
            for right in self.parts[a + 1:]:
                if {id(p) for p in left.params} & {id(p) for p in right.params}:
                    cross = self._cross(left, right)
                    gram = gram + cross + cross.T
        return gram

    def _summed(self, per_part: list[list[Tensor]]) -> list[Tensor]:
        """Per parameter of ``self.params``, the sum of the parts' tensors for it."""
        totals: dict[int, Tensor] = {}
        for part, tensors in zip(self.parts, per_part):
            for p, t in zip(part.params, tensors):
                totals[id(p)] = totals[id(p)] + t if id(p) in totals else t
        return [totals[id(p)] for p in self.params]

    def weighted_sum(self, coeffs: Tensor) -> list[Tensor]:
        return self._summed([part.weighted_sum(coeffs) for part in self.parts])

    def per_sample(self) -> list[Tensor]:
        return self._summed([part.per_sample() for part in self.parts])

    def sample_dots(self, values: Sequence[Tensor]) -> Tensor:
        by_id = {id(p): v for p, v in zip(self.params, values)}
        return sum(part.sample_dots(self._values_for(part, by_id)) for part in self.parts)

    def sample_sums(self) -> Tensor:
        return sum(part.sample_sums() for part in self.parts)

    def sample_factors(self) -> tuple[Tensor, ...]:
        """The parts' factors, in order."""
        return tuple(f for part in self.parts for f in part.sample_factors())

    def with_sample_factors(self, factors: Sequence[Tensor]) -> GradientBlock:
        parts, start = [], 0
        for part in self.parts:
            count = len(part.sample_factors())
            parts.append(part.with_sample_factors(factors[start:start + count]))
            start += count
        return SharedParameterBlock(parts)


def merge_shared(blocks: list[GradientBlock]) -> list[GradientBlock]:
    """``blocks`` with every group of blocks linked by common parameters replaced by one SharedParameterBlock.

    ``blocks`` itself when no parameter is in two of them (one set of ids instead of the pairwise search).
    """
    ids = [id(p) for block in blocks for p in block.params]
    if len(set(ids)) == len(ids):
        return blocks
    groups: list[list[GradientBlock]] = []
    for block in blocks:
        ids = {id(p) for p in block.params}
        linked = [g for g in groups if any(ids & {id(p) for p in b.params} for b in g)]
        merged = [b for g in linked for b in g] + [block]
        groups = [g for g in groups if all(g is not other for other in linked)] + [merged]
    return [group[0] if len(group) == 1 else SharedParameterBlock(group) for group in groups]
