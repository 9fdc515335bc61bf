"""The Taylor engine: the per-sample Jacobian of a ``CollocationResidual`` without autograd through the network.

The Gram engine sees the Taylor streams of ``sven.pde.derivatives`` through hooks on the Linear
layers and one autograd backward through the whole forward Laplacian. This engine writes both
passes out: a forward pass of the streams u (B, w), ∂u (B, d, w) and Δu (B, w), keeping what the
reverse pass needs, then a reverse pass of their adjoints from the output back to the input.
Autograd only runs through the residual's ``compose`` and the loss, on (B, out) tensors. At the
input the derivative streams are constant (∂x = I, Δx = 0), so the first Linear gives ∂h = Wᵀ for
every sample (a broadcast view) and Δh = 0, and nothing is computed for them.

Each Linear's share of M stays factored as the Gram engine keeps it: an ``OuterProductBlock`` of the
weight over the streams as tokens, and the per-sample bias gradients (the value stream's adjoint),
so the solvers downstream are the Gram engine's.

For a = σ(h) with Q = Σ_{k in dims} (∂_k h)², the forward rules ∂a = σ' ∂h and Δa = σ' Δh + σ'' Q
give the reverse rules
    h̄ = ā σ' + σ'' Σ_k ∂̄a_k ∂_k h + Δ̄a (σ'' Δh + σ''' Q),
    ∂̄h_k = σ' ∂̄a_k (+ 2 σ'' Δ̄a ∂_k h for k in dims),   Δ̄h = σ' Δ̄a;
and for h = W z (+ b on the value stream): z̄ = W h̄ on every stream, W's gradient Σ_streams h̄ zᵀ
and b's h̄ of the value stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sven.jacobian.blocks import GradientBlock, MaterializedBlock, OuterProductBlock
from sven.jacobian.checks import check_per_sample_losses
from sven.jacobian.functorch_engine import LossFn
from sven.jacobian.gram_engine import GramJacobian
from sven.jacobian.params import ParamSpace
from sven.pde.activations import activation_rule, third_derivative_rule
from sven.pde.residuals import CollocationResidual
from sven.pde.taylor import Derivatives, chosen_coordinates, laplacian_index


@dataclass
class _Streams:
    """u (B, w), ∂u (B, d, w) and Δu (B, w); Δu None where it is zero (before the first activation)."""

    value: Tensor
    gradient: Tensor
    laplacian: Tensor | None

    def tokens(self) -> Tensor:
        """The streams as tokens (B, T, w): u, ∂_1 u … ∂_d u and Δu unless it is zero."""
        parts = [self.value[:, None], self.gradient.expand(self.value.shape[0], -1, -1)]
        return torch.cat(parts if self.laplacian is None else [*parts, self.laplacian[:, None]], dim=1)


@dataclass
class _LinearTape:
    layer: nn.Linear
    inputs: _Streams


@dataclass
class _ActivationTape:
    module: nn.Module
    jet: tuple[Tensor, Tensor, Tensor]  # σ(h), σ'(h), σ''(h) (B, w)
    pre: _Streams  # h, ∂h, Δh
    squares: Tensor  # Q = Σ_{k in dims} (∂_k h)² (B, w), or (1, w) while ∂h is the same for every sample


def taylor_engine_refusal(model: nn.Module, params: ParamSpace) -> str | None:
    """Why the Taylor engine cannot give ``model``'s Jacobian over ``params``, or None when it can."""
    if not isinstance(model, CollocationResidual):
        return f"the model is a {type(model).__name__}, not a sven.pde.CollocationResidual"
    if type(model).forward is not CollocationResidual.forward:
        return f"{type(model).__name__} overrides CollocationResidual.forward (the engine calls compose instead)"
    covered = set()
    for name, module in model.net.named_children():
        if isinstance(module, nn.Linear):
            covered.update(id(p) for p in module.parameters())
        elif third_derivative_rule(module) is None:
            return f"module '{name}' ({type(module).__name__}) of its network has no Taylor rule"
    outside = [name for name, p in zip(params.names, params.tensors) if id(p) not in covered]
    if outside:
        return f"parameters {outside} are not weights or biases of the network's Linear layers"
    return None


def taylor_layers(model: CollocationResidual) -> list[str]:
    """The Linear layers whose shares of M the Taylor engine gives, named as in ``model.named_modules()``."""
    return [f"{name} (Linear)" for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _linear(layer: nn.Linear, streams: _Streams) -> _Streams:
    value = streams.value @ layer.weight.T
    if layer.bias is not None:
        value += layer.bias
    laplacian = None if streams.laplacian is None else streams.laplacian @ layer.weight.T
    return _Streams(value, streams.gradient @ layer.weight.T, laplacian)


def _activation(module: nn.Module, pre: _Streams, dims: Tensor | None) -> tuple[_Streams, _ActivationTape]:
    jet = activation_rule(module)(module, pre.value)
    value, first, second = jet
    chosen = chosen_coordinates(pre.gradient, dims)
    squares = (chosen * chosen).sum(dim=1)
    laplacian = second * squares if pre.laplacian is None else first * pre.laplacian + second * squares
    return _Streams(value, first[:, None] * pre.gradient, laplacian), _ActivationTape(module, jet, pre, squares)


def _forward(net: nn.Sequential, x: Tensor, dims: Tensor | None
             ) -> tuple[_Streams, list[_LinearTape | _ActivationTape]]:
    """The output streams of ``net`` at x (B, d) and the tape of the reverse pass."""
    d = x.shape[1]
    streams = _Streams(x, torch.eye(d, dtype=x.dtype, device=x.device)[None], None)
    tape: list[_LinearTape | _ActivationTape] = []
    for module in net:
        if isinstance(module, nn.Linear):
            tape.append(_LinearTape(module, streams))
            streams = _linear(module, streams)
        else:
            streams, step = _activation(module, streams, dims)
            tape.append(step)
    return streams, tape


def _activation_adjoint(step: _ActivationTape, adjoint: _Streams, dims: Tensor | None) -> _Streams:
    """The adjoint of h, ∂h and Δh from that of a, ∂a and Δa (Δh's None when Δh is zero). σ''' is taken
    here, so that a forward pass without a reverse pass (``taylor_predictions``) does not pay for it."""
    pre, lap_bar = step.pre, adjoint.laplacian
    _, first, second = step.jet
    curvature = third_derivative_rule(step.module)(step.module, pre.value, step.jet) * step.squares
    if pre.laplacian is not None:
        curvature = curvature + second * pre.laplacian
    value = adjoint.value * first + second * (adjoint.gradient * pre.gradient).sum(dim=1) + lap_bar * curvature
    gradient = adjoint.gradient * first[:, None]
    spread = 2 * (lap_bar * second)[:, None]
    if dims is None:
        gradient = gradient + spread * pre.gradient
    else:
        gradient = gradient.index_add(1, dims, spread * chosen_coordinates(pre.gradient, dims))
    return _Streams(value, gradient, None if pre.laplacian is None else lap_bar * first)


def _linear_adjoint(layer: nn.Linear, adjoint: _Streams) -> _Streams:
    laplacian = None if adjoint.laplacian is None else adjoint.laplacian @ layer.weight
    return _Streams(adjoint.value @ layer.weight, adjoint.gradient @ layer.weight, laplacian)


def _blocks(tape: list[_LinearTape | _ActivationTape], adjoint: _Streams, params: ParamSpace,
            dims: Tensor | None) -> list[GradientBlock]:
    """The reverse pass: per Linear layer, its weight's and its bias's per-sample gradients (factored)."""
    calls: dict[int, list[tuple[nn.Linear, _Streams, _Streams]]] = {}
    for index, step in reversed(list(enumerate(tape))):
        if isinstance(step, _ActivationTape):
            adjoint = _activation_adjoint(step, adjoint, dims)
            continue
        if step.inputs.laplacian is None:
            adjoint = _Streams(adjoint.value, adjoint.gradient, None)
        calls.setdefault(id(step.layer), []).append((step.layer, step.inputs, adjoint))
        if index:
            adjoint = _linear_adjoint(step.layer, adjoint)
    trainable = {id(p) for p in params.tensors}
    blocks: list[GradientBlock] = []
    for uses in calls.values():
        layer = uses[0][0]
        if id(layer.weight) in trainable:
            blocks.append(OuterProductBlock(layer.weight, None, _joined([s.tokens() for _, s, _ in uses]),
                                            _joined([a.tokens() for _, _, a in uses])))
        if layer.bias is not None and id(layer.bias) in trainable:
            blocks.append(MaterializedBlock((layer.bias,), [sum(a.value for _, _, a in uses)]))
    return blocks


def _joined(tokens: list[Tensor]) -> Tensor:
    return tokens[0] if len(tokens) == 1 else torch.cat(tokens, dim=1)


def taylor_jacobian(model: CollocationResidual, loss_fn: LossFn, batch: tuple, params: ParamSpace
                    ) -> tuple[Tensor, Tensor, GramJacobian]:
    """(per-sample losses (B,), predictions (B, 2), M (B, P) as Gram-engine blocks) of a ``CollocationResidual``.

    ``taylor_engine_refusal(model, params)`` must be None.
    """
    inputs, targets, *extra = batch
    streams, tape, dims = _forward_of(model, inputs)
    leaves = [tensor.requires_grad_() for tensor in _output(streams)]
    with torch.enable_grad():
        preds = model.compose(Derivatives(*leaves))
        losses = check_per_sample_losses(loss_fn(preds, targets, *extra), inputs.shape[0])
        grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
    value, gradient, laplacian = (torch.zeros_like(leaf) if grad is None else grad for grad, leaf in zip(grads, leaves))
    with torch.no_grad():
        blocks = _blocks(tape, _Streams(value, gradient.transpose(1, 2), laplacian), params, dims)
    return losses.detach(), preds.detach(), GramJacobian(blocks, params, inputs.shape[0])


def taylor_predictions(model: CollocationResidual, x: Tensor) -> Tensor:
    """``model(x)`` (B, 2) by the Taylor engine's forward pass, so that losses evaluated between its Jacobians
    (line search, adaptive damping) round as the losses it returns do; cheaper than the module's forward,
    which calls each Linear on stacked streams for the Gram engine's hooks."""
    return model.compose(Derivatives(*_output(_forward_of(model, x)[0])))


def _forward_of(model: CollocationResidual, x: Tensor
                ) -> tuple[_Streams, list[_LinearTape | _ActivationTape], Tensor | None]:
    """The output streams and tape of ``model.net`` at x (B, d), and the Laplacian's coordinates."""
    if x.dim() != 2:
        raise ValueError(f"x must be a batch of points (B, d); got shape {tuple(x.shape)}")
    dims = laplacian_index(model.laplacian_dims, x.shape[1], x.device)
    with torch.no_grad():
        streams, tape = _forward(model.net, x, dims)
    return streams, tape, dims


def _output(streams: _Streams) -> tuple[Tensor, Tensor, Tensor]:
    """u (B, out), ∂u (B, out, d) and Δu (B, out) of the output streams, detached (Δu zero when it is None)."""
    batch = streams.value.shape[0]
    laplacian = torch.zeros_like(streams.value) if streams.laplacian is None else streams.laplacian
    return (streams.value.detach(), streams.gradient.expand(batch, -1, -1).transpose(1, 2).detach(),
            laplacian.detach())
