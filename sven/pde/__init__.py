"""PDE residuals for Sven: input derivatives of an MLP by forward-mode Taylor propagation."""

from sven.pde.activations import supported_activations
from sven.pde.residuals import CollocationResidual, condition_losses, condition_weights, negative_laplacian
from sven.pde.taylor import Derivatives, derivatives

__all__ = [
    "CollocationResidual",
    "Derivatives",
    "condition_losses",
    "condition_weights",
    "derivatives",
    "negative_laplacian",
    "supported_activations",
]
