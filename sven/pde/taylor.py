"""Forward Laplacian: value, input gradient and Laplacian of an MLP by forward-mode Taylor propagation.

Three streams travel through the network together: the value z (B, w), the first
derivatives ∂z (B, d, w) with respect to the d input coordinates, and the Laplacian
Δz (B, w) over the chosen coordinates. Each ``nn.Linear`` is called once, on all
streams stacked as tokens, so that the Gram engine's hook on it sees every use of
its weight (see ``_linear``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sven.pde.activations import activation_rule, supported_activations


@dataclass(frozen=True)
class Derivatives:
    """u and its input derivatives at B points: ``value`` (B, out), ``gradient`` (B, out, d),
    ``laplacian`` (B, out) summed over the chosen input coordinates."""

    value: Tensor
    gradient: Tensor
    laplacian: Tensor


@dataclass(frozen=True)
class _Streams:
    """The three streams with the token dimension kept, so that splitting and joining them stays cheap in
    autograd (a split's backward is one concatenation; a slice's allocates and fills a zero tensor)."""

    value: Tensor  # (B, 1, w)
    gradient: Tensor  # (B, d, w)
    laplacian: Tensor  # (B, 1, w)


def _linear(layer: nn.Linear, streams: _Streams) -> _Streams:
    """W z + b on the value, W ∂z and W Δz on the derivative streams, in one call of ``layer``.

    The tokens [z, ∂_1 z … ∂_d z, Δz, 0] go through the module together; the zero
    token's output is exactly b and is subtracted from the derivative tokens. Through
    that subtraction the zero token receives minus their backprops, so the per-token
    sums a Linear Gram rule forms (bias: Σ_t g_t, weight: Σ_t g_t a_tᵀ) equal the true
    per-sample gradients.
    """
    dims = streams.gradient.shape[1]
    tokens = layer(torch.cat([streams.value, streams.gradient, streams.laplacian, torch.zeros_like(streams.value)],
                             dim=1))
    value, gradient, laplacian, bias = tokens.split([1, dims, 1, 1], dim=1)
    return _Streams(value, gradient - bias, laplacian - bias)


def _activation(module: nn.Module, streams: _Streams, dims: Tensor | None) -> _Streams:
    """a = σ(h): ∂a = σ'(h) ∂h, Δa = σ'(h) Δh + σ''(h) Σ_{k in dims} (∂_k h)²."""
    rule = activation_rule(module)
    value, first, second = rule(module, streams.value)
    chosen = chosen_coordinates(streams.gradient, dims)
    squares = (chosen * chosen).sum(dim=1, keepdim=True)
    return _Streams(value, first * streams.gradient, first * streams.laplacian + second * squares)


def _check_network(net: nn.Module) -> None:
    if not isinstance(net, nn.Sequential):
        raise TypeError(
            f"sven.pde.derivatives needs an nn.Sequential of nn.Linear and elementwise activations; "
            f"got {type(net).__name__}"
        )
    for name, module in net.named_children():
        if not isinstance(module, nn.Linear) and activation_rule(module) is None:
            raise TypeError(
                f"sven.pde.derivatives cannot propagate Taylor streams through module '{name}' "
                f"({type(module).__name__}); supported: Linear, {', '.join(supported_activations())}"
            )


def chosen_coordinates(gradient: Tensor, dims: Tensor | None) -> Tensor:
    """The Laplacian's coordinates of a gradient stream (B, d, w): (B, |dims|, w), all d for None."""
    return gradient if dims is None else gradient.index_select(1, dims)


def laplacian_index(laplacian_dims: Sequence[int] | None, dims: int, device: torch.device) -> Tensor | None:
    """The coordinates of the Laplacian as an index tensor, or None for all ``dims``."""
    if laplacian_dims is None:
        return None
    chosen = [int(k) for k in laplacian_dims]
    if not chosen or len(set(chosen)) != len(chosen) or not all(0 <= k < dims for k in chosen):
        raise ValueError(
            f"laplacian_dims must be distinct input coordinates in [0, {dims}); got {list(laplacian_dims)}"
        )
    return None if sorted(chosen) == list(range(dims)) else torch.tensor(chosen, device=device)


def derivatives(net: nn.Sequential, x: Tensor, laplacian_dims: Sequence[int] | None = None) -> Derivatives:
    """Value, gradient and Laplacian of ``net`` at the points x (B, d).

    ``net`` is an ``nn.Sequential`` of ``nn.Linear`` and the activations listed by
    ``sven.pde.activations.supported_activations()``. ``laplacian_dims`` picks the
    coordinates the Laplacian sums over (default all d); ``gradient`` always has all d.
    """
    _check_network(net)
    if x.dim() != 2:
        raise ValueError(f"x must be a batch of points (B, d); got shape {tuple(x.shape)}")
    batch, dims = x.shape
    index = laplacian_index(laplacian_dims, dims, x.device)
    eye = torch.eye(dims, dtype=x.dtype, device=x.device)
    streams = _Streams(x[:, None], eye.expand(batch, dims, dims), x.new_zeros(batch, 1, dims))
    for module in net:
        streams = _linear(module, streams) if isinstance(module, nn.Linear) else _activation(module, streams, index)
    return Derivatives(streams.value[:, 0], streams.gradient.transpose(1, 2), streams.laplacian[:, 0])
