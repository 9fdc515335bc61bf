"""Closed-form derivatives of the elementwise activations ``sven.pde`` supports.

Each rule maps (module, pre-activation h) to (σ(h), σ'(h), σ''(h)), all shaped like h; each
third-derivative rule maps (module, h, that jet) to σ'''(h), which the Taylor engine's reverse pass
needs (``sven.pde.jacobian``). Lookup is by exact type, so a subclass that changes ``forward`` is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Jet = tuple[Tensor, Tensor, Tensor]
ActivationRule = Callable[[nn.Module, Tensor], Jet]
ThirdDerivativeRule = Callable[[nn.Module, Tensor, Jet], Tensor]

_RULES: dict[type[nn.Module], ActivationRule] = {}
_THIRD: dict[type[nn.Module], ThirdDerivativeRule] = {}
_GELU_TANH_SCALE = math.sqrt(2 / math.pi)
_GELU_TANH_CUBIC = 0.044715


def _register(layer_type: type[nn.Module]) -> Callable[[ActivationRule], ActivationRule]:
    def decorate(rule: ActivationRule) -> ActivationRule:
        _RULES[layer_type] = rule
        return rule

    return decorate


def _register_third(layer_type: type[nn.Module]) -> Callable[[ThirdDerivativeRule], ThirdDerivativeRule]:
    def decorate(rule: ThirdDerivativeRule) -> ThirdDerivativeRule:
        _THIRD[layer_type] = rule
        return rule

    return decorate


def activation_rule(module: nn.Module) -> ActivationRule | None:
    """The rule for this module's exact type, or None."""
    return _RULES.get(type(module))


def third_derivative_rule(module: nn.Module) -> ThirdDerivativeRule | None:
    """σ''' for this module's exact type, or None."""
    return _THIRD.get(type(module))


def supported_activations() -> list[str]:
    """Names of the activation types with a rule."""
    return sorted(t.__name__ for t in _RULES)


def _sigmoid_jet(s: Tensor) -> tuple[Tensor, Tensor]:
    """(s', s'') of the logistic function from its value s."""
    first = s * (1 - s)
    return first, first * (1 - 2 * s)


@_register(nn.Tanh)
def _tanh(module: nn.Module, h: Tensor) -> Jet:
    t = torch.tanh(h)
    first = 1 - t * t
    return t, first, -2 * t * first


@_register(nn.Sigmoid)
def _sigmoid(module: nn.Module, h: Tensor) -> Jet:
    s = torch.sigmoid(h)
    return (s, *_sigmoid_jet(s))


@_register(nn.SiLU)
def _silu(module: nn.Module, h: Tensor) -> Jet:
    s = torch.sigmoid(h)
    ds, dds = _sigmoid_jet(s)
    return h * s, s + h * ds, 2 * ds + h * dds


@_register(nn.Softplus)
def _softplus(module: nn.Softplus, h: Tensor) -> Jet:
    """Above ``threshold`` (on β·h) torch's softplus is the identity: σ' = 1, σ'' = 0 there."""
    beta = module.beta
    s = torch.sigmoid(beta * h)
    ds, _ = _sigmoid_jet(s)
    linear = beta * h > module.threshold
    first = torch.where(linear, torch.ones_like(s), s)
    second = torch.where(linear, torch.zeros_like(s), beta * ds)
    return F.softplus(h, beta, module.threshold), first, second


@_register(nn.GELU)
def _gelu(module: nn.GELU, h: Tensor) -> Jet:
    if module.approximate == "tanh":
        return _gelu_tanh(h)
    cdf = 0.5 * (1 + torch.erf(h / math.sqrt(2)))
    pdf = torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)
    return h * cdf, cdf + h * pdf, pdf * (2 - h * h)


def _gelu_tanh(h: Tensor) -> Jet:
    """0.5·h·(1 + tanh(u)), u = c·(h + 0.044715·h³), c = √(2/π)."""
    u = _GELU_TANH_SCALE * (h + _GELU_TANH_CUBIC * h**3)
    du = _GELU_TANH_SCALE * (1 + 3 * _GELU_TANH_CUBIC * h * h)
    ddu = _GELU_TANH_SCALE * 6 * _GELU_TANH_CUBIC * h
    t = torch.tanh(u)
    sech2 = 1 - t * t
    value = 0.5 * h * (1 + t)
    first = 0.5 * (1 + t) + 0.5 * h * sech2 * du
    second = sech2 * (du + 0.5 * h * (ddu - 2 * t * du * du))
    return value, first, second


def _sigmoid_third(s: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """s''' of the logistic function from s, s' and s''."""
    return second * (1 - 2 * s) - 2 * first * first


@_register_third(nn.Tanh)
def _tanh_third(module: nn.Module, h: Tensor, jet: Jet) -> Tensor:
    t, first, second = jet
    return -2 * (first * first + t * second)


@_register_third(nn.Sigmoid)
def _sigmoid_third_rule(module: nn.Module, h: Tensor, jet: Jet) -> Tensor:
    return _sigmoid_third(*jet)


@_register_third(nn.SiLU)
def _silu_third(module: nn.Module, h: Tensor, jet: Jet) -> Tensor:
    """(h·s)''' = 3 s'' + h s'''."""
    s = torch.sigmoid(h)
    ds, dds = _sigmoid_jet(s)
    return 3 * dds + h * _sigmoid_third(s, ds, dds)


@_register_third(nn.Softplus)
def _softplus_third(module: nn.Softplus, h: Tensor, jet: Jet) -> Tensor:
    """β² s''(βh), s the logistic function, from σ' = s(βh); 0 above the threshold, where σ' = 1."""
    _, s, _ = jet
    _, dds = _sigmoid_jet(s)
    return module.beta**2 * dds


@_register_third(nn.GELU)
def _gelu_third(module: nn.GELU, h: Tensor, jet: Jet) -> Tensor:
    if module.approximate == "tanh":
        return _gelu_tanh_third(h)
    pdf = torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)
    return h * pdf * (h * h - 4)


def _gelu_tanh_third(h: Tensor) -> Tensor:
    """d/dh of ``_gelu_tanh``'s second derivative sech²(u)·K, K = u' + ½h(u'' − 2t·u'²), t = tanh(u)."""
    u = _GELU_TANH_SCALE * (h + _GELU_TANH_CUBIC * h**3)
    du = _GELU_TANH_SCALE * (1 + 3 * _GELU_TANH_CUBIC * h * h)
    ddu = _GELU_TANH_SCALE * 6 * _GELU_TANH_CUBIC * h
    dddu = _GELU_TANH_SCALE * 6 * _GELU_TANH_CUBIC
    t = torch.tanh(u)
    sech2 = 1 - t * t
    dt = sech2 * du
    k = du + 0.5 * h * (ddu - 2 * t * du * du)
    dk = ddu + 0.5 * (ddu - 2 * t * du * du) + 0.5 * h * (dddu - 2 * dt * du * du - 4 * t * du * ddu)
    return -2 * t * dt * k + sech2 * dk
