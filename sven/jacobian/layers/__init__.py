"""Gram rules per layer type; importing this package registers them all."""

from sven.jacobian.layers import attention, conv, embedding, linear, norm  # noqa: F401
from sven.jacobian.layers.attention import children_batch_dim
from sven.jacobian.layers.registry import fast_layer_types, register_gram_rule, rule_for

__all__ = ["children_batch_dim", "fast_layer_types", "register_gram_rule", "rule_for"]
