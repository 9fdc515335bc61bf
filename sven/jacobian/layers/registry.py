"""Registry of Gram rules: one function per layer type, Opacus-style.

A rule maps (layer, input activation, output backprops) to the gradient blocks
of the layer's own parameters. Lookup is by exact type, so a subclass that
changes ``forward`` is never mistaken for its parent; unregistered layers go to
the functorch fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from sven.jacobian.blocks import GradientBlock

GramRule = Callable[[nn.Module, Tensor, Tensor], list[GradientBlock]]


@dataclass(frozen=True)
class _Registration:
    rule: GramRule
    supports: Callable[[nn.Module], bool]


_RULES: dict[type[nn.Module], _Registration] = {}


def register_gram_rule(
    *layer_types: type[nn.Module], supports: Callable[[nn.Module], bool] = lambda layer: True
) -> Callable[[GramRule], GramRule]:
    """Decorator: ``rule(layer, activations, backprops) -> list[GradientBlock]`` for these types.

    ``activations`` is the layer's first positional input and ``backprops`` the
    gradient of Σ_i l_i w.r.t. its output (row i depends on sample i only).
    ``supports(layer)`` may decline a configuration (the fallback then handles it).
    """

    def decorate(rule: GramRule) -> GramRule:
        for layer_type in layer_types:
            _RULES[layer_type] = _Registration(rule, supports)
        return rule

    return decorate


def rule_for(layer: nn.Module) -> GramRule | None:
    """The registered rule for this layer's exact type and configuration, or None."""
    registration = _RULES.get(type(layer))
    if registration is None or not registration.supports(layer):
        return None
    return registration.rule


def fast_layer_types() -> list[str]:
    """Names of the layer types the Gram engine handles without the fallback."""
    return sorted(t.__name__ for t in _RULES)
