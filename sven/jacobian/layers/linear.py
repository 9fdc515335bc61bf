"""nn.Linear on inputs of any leading shape (B, d_in) or (B, T…, d_in)."""

from __future__ import annotations

from torch import Tensor, nn

from sven.jacobian.blocks import GradientBlock, OuterProductBlock
from sven.jacobian.layers.registry import register_gram_rule


@register_gram_rule(nn.Linear)
def linear_blocks(layer: nn.Linear, activations: Tensor, backprops: Tensor) -> list[GradientBlock]:
    batch = activations.shape[0]
    return [
        OuterProductBlock(
            layer.weight,
            layer.bias,
            activations.reshape(batch, -1, layer.in_features),
            backprops.reshape(batch, -1, layer.out_features),
        )
    ]
