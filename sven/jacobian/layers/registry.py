"""Registry of Gram rules: one function per layer type, Opacus-style.

A rule maps (layer, input activation, output backprops) to the gradient blocks
of the layer's parameters (its children's included). Lookup is by exact type, so a subclass that
changes ``forward`` is never mistaken for its parent; unregistered layers go to
the functorch fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from sven.jacobian.blocks import GradientBlock

BlocksFn = Callable[[nn.Module, Any, Tensor], list[GradientBlock]]


@dataclass(frozen=True)
class GramRule:
    """A registered rule: the function giving a call's blocks, and which inputs of the call it reads."""

    blocks: BlocksFn
    supports: Callable[[nn.Module], bool]
    all_inputs: bool

    def inputs(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """What the rule reads of a call: its first positional input, or ``(args, kwargs)`` for ``all_inputs``."""
        return (args, kwargs) if self.all_inputs else args[0]

    def __call__(self, layer: nn.Module, inputs: Any, backprops: Tensor, batch_dim: int = 0) -> list[GradientBlock]:
        """The call's blocks; a first-input rule gets the samples (on ``batch_dim`` in the call) on dim 0,
        an ``all_inputs`` rule reads the call as it was (its layer knows its own layout)."""
        if batch_dim != 0 and not self.all_inputs:
            inputs, backprops = inputs.movedim(batch_dim, 0), backprops.movedim(batch_dim, 0)
        return self.blocks(layer, inputs, backprops)


_RULES: dict[type[nn.Module], GramRule] = {}


def register_gram_rule(
    *layer_types: type[nn.Module], supports: Callable[[nn.Module], bool] = lambda layer: True,
    all_inputs: bool = False,
) -> Callable[[BlocksFn], BlocksFn]:
    """Decorator: ``rule(layer, activations, backprops) -> list[GradientBlock]`` for these types.

    ``activations`` is the layer's first positional input — or, with ``all_inputs``,
    ``(args, kwargs)`` of the call — detached, and ``backprops`` the gradient of Σ_i l_i
    w.r.t. its output (its first element if the output is a tuple; row i depends on
    sample i only). ``supports(layer)`` may decline a configuration (the fallback then
    handles it). A rule covers every parameter of the layer, its children's included.
    """

    def decorate(rule: BlocksFn) -> BlocksFn:
        for layer_type in layer_types:
            _RULES[layer_type] = GramRule(rule, supports, all_inputs)
        return rule

    return decorate


def rule_for(layer: nn.Module) -> GramRule | None:
    """The registered rule for this layer's exact type and configuration, or None."""
    rule = _RULES.get(type(layer))
    if rule is None or not rule.supports(layer):
        return None
    return rule


def fast_layer_types() -> list[str]:
    """Names of the layer types the Gram engine handles without the fallback."""
    return sorted(t.__name__ for t in _RULES)
