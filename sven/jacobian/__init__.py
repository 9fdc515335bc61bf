"""Jacobian engines and the linear-operator interface they share."""

from sven.jacobian.blocks import GradientBlock, MaterializedBlock, OuterProductBlock
from sven.jacobian.checks import all_finite, check_no_batch_coupling, check_per_sample_losses
from sven.jacobian.coupled import coupled_jacobian
from sven.jacobian.functorch_engine import functorch_jacobian, per_sample_loss_grads
from sven.jacobian.gram_engine import GramEngine, GramJacobian
from sven.jacobian.layers import fast_layer_types, register_gram_rule
from sven.jacobian.masks import MASK_MODES, MaskedJacobian
from sven.jacobian.operator import DenseJacobian, JacobianOperator, RowTransformedJacobian
from sven.jacobian.params import ParamSpace

__all__ = [
    "DenseJacobian",
    "GradientBlock",
    "GramEngine",
    "GramJacobian",
    "JacobianOperator",
    "MASK_MODES",
    "MaskedJacobian",
    "MaterializedBlock",
    "OuterProductBlock",
    "ParamSpace",
    "RowTransformedJacobian",
    "all_finite",
    "check_no_batch_coupling",
    "check_per_sample_losses",
    "coupled_jacobian",
    "fast_layer_types",
    "functorch_jacobian",
    "per_sample_loss_grads",
    "register_gram_rule",
]
