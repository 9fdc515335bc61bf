"""Gram rules per layer type; importing this package registers them all."""

from sven.jacobian.layers import conv, embedding, linear, norm  # noqa: F401
from sven.jacobian.layers.registry import fast_layer_types, register_gram_rule, rule_for

__all__ = ["fast_layer_types", "register_gram_rule", "rule_for"]
