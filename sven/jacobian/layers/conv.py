"""nn.Conv1d / nn.Conv2d (groups = 1, zero padding): a Linear over unfolded patches."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from sven.jacobian.blocks import GradientBlock, OuterProductBlock
from sven.jacobian.layers.registry import register_gram_rule


def _numeric_padding(layer: nn.Conv1d | nn.Conv2d) -> tuple[int, ...] | None:
    """The layer's padding as integers, or None where it is asymmetric ('same' with an even span)."""
    if layer.padding == "valid":
        return (0,) * len(layer.kernel_size)
    if layer.padding == "same":
        spans = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        if any(span % 2 for span in spans):
            return None
        return tuple(span // 2 for span in spans)
    return tuple(layer.padding)


def _supported(layer: nn.Conv1d | nn.Conv2d) -> bool:
    return layer.groups == 1 and layer.padding_mode == "zeros" and _numeric_padding(layer) is not None


@register_gram_rule(nn.Conv1d, nn.Conv2d, supports=_supported)
def conv_blocks(layer: nn.Conv1d | nn.Conv2d, activations: Tensor, backprops: Tensor) -> list[GradientBlock]:
    """Patches (B, L, C_in·∏kernel) against output gradients (B, L, C_out), made contiguous once.

    The block reshapes both to (B·L, ·) in gram, weighted_sum and per_sample: contiguous
    factors make those views instead of three copies each.
    """
    batch = activations.shape[0]
    padding = _numeric_padding(layer)
    if isinstance(layer, nn.Conv1d):
        activations = activations.unsqueeze(2)
        geometry = dict(
            kernel_size=(1, *layer.kernel_size), dilation=(1, *layer.dilation),
            padding=(0, *padding), stride=(1, *layer.stride),
        )
    else:
        geometry = dict(
            kernel_size=layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride
        )
    patches = F.unfold(activations, **geometry).transpose(1, 2).contiguous()
    out_grads = backprops.reshape(batch, layer.out_channels, -1).transpose(1, 2).contiguous()
    return [OuterProductBlock(layer.weight, layer.bias, patches, out_grads)]
