"""nn.LayerNorm, nn.GroupNorm, eval-mode nn.BatchNorm1d/2d/3d (affine): cheap per-sample gradients, materialised."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from sven.jacobian.blocks import GradientBlock, MaterializedBlock
from sven.jacobian.layers.registry import register_gram_rule


def _affine_blocks(
    layer: nn.Module, normalised: Tensor, backprops: Tensor, reduce_dims: tuple[int, ...]
) -> list[GradientBlock]:
    """Per-sample gradients summed over ``reduce_dims`` (none for inputs without extra dims, e.g. (B, d))."""
    per_sample = lambda t: t.sum(dim=reduce_dims) if reduce_dims else t  # noqa: E731
    params, grads = [], []
    if layer.weight is not None:
        params.append(layer.weight)
        grads.append(per_sample(backprops * normalised))
    if layer.bias is not None:
        params.append(layer.bias)
        grads.append(per_sample(backprops))
    return [MaterializedBlock(tuple(params), grads)]


@register_gram_rule(nn.LayerNorm, supports=lambda layer: layer.elementwise_affine)
def layer_norm_blocks(layer: nn.LayerNorm, activations: Tensor, backprops: Tensor) -> list[GradientBlock]:
    """x (B, …, *normalized_shape): weight gradient Σ_… b ⊙ x̂, bias gradient Σ_… b."""
    normalised = F.layer_norm(activations, layer.normalized_shape, None, None, layer.eps)
    leading = activations.dim() - len(layer.normalized_shape)
    return _affine_blocks(layer, normalised, backprops, tuple(range(1, leading)))


@register_gram_rule(nn.GroupNorm, supports=lambda layer: layer.affine)
def group_norm_blocks(layer: nn.GroupNorm, activations: Tensor, backprops: Tensor) -> list[GradientBlock]:
    """x (B, C, *spatial): per-channel weight gradient Σ_spatial b ⊙ x̂, bias Σ_spatial b."""
    normalised = F.group_norm(activations, layer.num_groups, None, None, layer.eps)
    return _affine_blocks(layer, normalised, backprops, tuple(range(2, activations.dim())))


@register_gram_rule(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    supports=lambda layer: layer.affine and layer.track_running_stats,
)
def batch_norm_blocks(layer: nn.modules.batchnorm._BatchNorm, activations: Tensor,
                      backprops: Tensor) -> list[GradientBlock]:
    """x (B, C, *spatial) normalised by the running statistics (the engine refuses batch statistics):
    per-channel weight gradient Σ_spatial b ⊙ x̂, bias Σ_spatial b."""
    normalised = F.batch_norm(activations, layer.running_mean, layer.running_var, eps=layer.eps)
    return _affine_blocks(layer, normalised, backprops, tuple(range(2, activations.dim())))
