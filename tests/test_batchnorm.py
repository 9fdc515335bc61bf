"""BatchNorm under ``SvenWrapper(..., bn_mode=...)`` against a dense float64 jacrev of the whole-batch residuals.

"batch": layers in train mode normalise with the batch's statistics, so M is the Jacobian of
the batch's residual vector (rows couple); the running statistics advance exactly as one
train-mode forward of the batch at the pre-step parameters would, however many passes the step
makes. "frozen": every pass uses the running statistics and none writes them. In both, every
module's train/eval flag is as the user left it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import STEP_TOLERANCE, flat_parameters, per_sample_mse
from reference import reference_direction, reference_residuals_and_jacobian, relative_error
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from sven import Sven, SvenWrapper
from sven.distributed import DistributedSvenWrapper

LR = 0.5
BATCH = 10


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def mlp_1d() -> nn.Module:
    """Linear → BatchNorm1d → Tanh → Linear on (B, 3), output (B, 2)."""
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))


def cnn_2d() -> nn.Module:
    """Conv → BatchNorm2d → Tanh → strided Conv → BatchNorm2d → Linear on (B, 2, 5, 5), output (B, 2)."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
        nn.Conv2d(3, 2, 3, stride=2), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2),
    )


def cnn_first_norm_eval() -> nn.Module:
    """``cnn_2d`` with its first BatchNorm in eval mode (running statistics under both policies)."""
    model = cnn_2d()
    model[1].eval()
    return model


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp_batchnorm1d": (mlp_1d, (3,)),
    "cnn_batchnorm2d": (cnn_2d, (2, 5, 5)),
    "cnn_one_norm_in_eval": (cnn_first_norm_eval, (2, 5, 5)),
}


def model_and_batch(name: str, batch_size: int = BATCH) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """A float64 model with non-trivial affine parameters and running statistics, and a regression batch."""
    build, input_shape = MODELS[name]
    torch.manual_seed(0)
    model = build().double()
    with torch.no_grad():
        for layer in batchnorm_layers(model):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_(0, 0.3)
            layer.running_mean.normal_(0, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, *input_shape, generator=generator, dtype=torch.float64)
    y = torch.randn(batch_size, 2, generator=generator, dtype=torch.float64)
    return model, (x, y)


def pure_model(model: nn.Module, bn_mode: str) -> nn.Module:
    """A copy whose forward is the whole-batch function each pass computes, writing no statistics.

    Layers in train mode: batch statistics ("batch") or running statistics ("frozen").
    """
    pure = copy.deepcopy(model)
    for layer in batchnorm_layers(pure):
        if layer.training and bn_mode == "frozen":
            layer.eval()
        elif layer.training:
            layer.track_running_stats = False
    return pure


def statistics(model: nn.Module) -> list[Tensor]:
    return [t.clone() for m in batchnorm_layers(model) for t in (m.running_mean, m.running_var, m.num_batches_tracked)]


def flags(model: nn.Module) -> list[tuple[bool, bool]]:
    return [(m.training, getattr(m, "track_running_stats", False)) for m in model.modules()]


def advanced_statistics(model: nn.Module, inputs: Tensor) -> list[Tensor]:
    """The running statistics after one plain train-mode forward of ``inputs`` (flags as they are)."""
    plain = copy.deepcopy(model)
    with torch.no_grad():
        plain(inputs)
    return statistics(plain)


@pytest.mark.parametrize("microbatch_size", [1, 3], ids=["no_microbatch", "ragged_microbatch_3"])
@pytest.mark.parametrize("bn_mode", ["batch", "frozen"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_jacobian_and_step_match_the_whole_batch_reference(
    name: str, bn_mode: str, microbatch_size: int, single_thread: None
) -> None:
    model, batch = model_and_batch(name)
    residuals, jacobian = reference_residuals_and_jacobian(
        pure_model(model, bn_mode), per_sample_mse, batch, microbatch_size=microbatch_size
    )
    expected_step = -LR * reference_direction(jacobian, residuals, k=64, rtol=1e-3)
    wrapped = SvenWrapper(model, per_sample_mse, bn_mode=bn_mode, microbatch_size=microbatch_size)
    before = flat_parameters(model)
    wrapped.loss_and_grad(batch)
    assert relative_error(wrapped.state.residuals, residuals) <= 1e-12
    assert relative_error(wrapped.state.operator.dense(), jacobian) <= 1e-8
    Sven(wrapped, lr=LR, k=64, rtol=1e-3).step()
    assert relative_error(flat_parameters(model) - before, expected_step) <= STEP_TOLERANCE[torch.float64]


@pytest.mark.parametrize("options", [{}, {"damping": "adaptive"}, {"variable_k": True, "k": 4}],
                         ids=["plain", "adaptive_damping", "variable_k"])
@pytest.mark.parametrize("name", ["mlp_batchnorm1d", "cnn_one_norm_in_eval"])
def test_batch_mode_advances_running_statistics_once_per_step(name: str, options: dict, single_thread: None) -> None:
    """Two steps; after each, the statistics of one train-mode forward at the pre-step parameters."""
    model, (x, y) = model_and_batch(name)
    user_flags = flags(model)
    forwards = []
    model.register_forward_hook(lambda module, args, out: forwards.append(1))
    optimizer = Sven(SvenWrapper(model, per_sample_mse), lr=LR, **options)
    for step in (1, 2):
        expected = advanced_statistics(model, x)
        optimizer.step((x, y))
        assert not optimizer.last_step["skipped"]
        assert all(torch.equal(a, b) for a, b in zip(statistics(model), expected))
        assert int(batchnorm_layers(model)[-1].num_batches_tracked) == step
        assert flags(model) == user_flags
    assert len(forwards) > 2 or not options, "the searches must have re-evaluated the batch"


@pytest.mark.parametrize("engine", ["gram", "functorch"])
def test_frozen_mode_writes_no_statistics_and_keeps_the_gram_fast_path(engine: str, single_thread: None) -> None:
    model, batch = model_and_batch("cnn_batchnorm2d")
    user_flags, before = flags(model), statistics(model)
    wrapped = SvenWrapper(model, per_sample_mse, bn_mode="frozen", engine=engine)
    if engine == "gram":
        plan = wrapped.engine_plan()
        assert "1 (BatchNorm2d)" in plan["fast_layers"] and plan["fallback_parameters"] == []
        assert plan["batch_statistics_layers"] == [] and plan["coupled_parameters"] == []
    optimizer = Sven(wrapped, lr=LR, damping="adaptive")
    for _ in range(2):
        optimizer.step(batch)
        assert not optimizer.last_step["skipped"]
    assert all(torch.equal(a, b) for a, b in zip(statistics(model), before))
    assert flags(model) == user_flags


def test_batch_mode_plan_says_the_jacobian_is_materialised() -> None:
    model, _ = model_and_batch("cnn_one_norm_in_eval")
    plan = SvenWrapper(model, per_sample_mse).engine_plan()
    assert plan["batch_statistics_layers"] == ["4 (BatchNorm2d)"]
    assert plan["coupled_parameters"] == [n for n, _ in model.named_parameters()]
    model.eval()
    plan = SvenWrapper(model, per_sample_mse).engine_plan()
    assert plan["batch_statistics_layers"] == [] and "4 (BatchNorm2d)" in plan["fast_layers"]


def test_param_fraction_columns_of_the_coupled_jacobian(single_thread: None) -> None:
    model, batch = model_and_batch("cnn_batchnorm2d")
    torch.manual_seed(3)
    wrapped = SvenWrapper(model, per_sample_mse, param_fraction=0.4)
    wrapped.loss_and_grad(batch)
    columns = wrapped.state.columns
    _, jacobian = reference_residuals_and_jacobian(pure_model(model, "batch"), per_sample_mse, batch,
                                                   columns=columns)
    assert relative_error(wrapped.state.operator.dense(), jacobian) <= 1e-8


def test_a_skipped_step_leaves_the_running_statistics_alone() -> None:
    model, (x, y) = model_and_batch("mlp_batchnorm1d")
    before = statistics(model)
    x[3, 0] = float("nan")
    optimizer = Sven(SvenWrapper(model, per_sample_mse), lr=LR)
    with pytest.warns(RuntimeWarning):
        optimizer.step((x, y))
    assert optimizer.last_step["skipped"]
    assert all(torch.equal(a, b) for a, b in zip(statistics(model), before))


def test_distributed_wrapper_refuses_batch_statistics_and_takes_frozen(tmp_path: Path) -> None:
    model, (x, y) = model_and_batch("mlp_batchnorm1d")
    with pytest.raises(ValueError, match=r"\['1 \(BatchNorm1d\)'\] normalise with batch statistics.*bn_mode='frozen'"):
        DistributedSvenWrapper(model, per_sample_mse)
    single = copy.deepcopy(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model.eval()
        in_eval = DistributedSvenWrapper(model, per_sample_mse)  # running statistics: accepted
        model.train()
        with pytest.raises(ValueError, match="bn_mode='frozen'"):
            in_eval.loss_and_grad((x, y))
        Sven(DistributedSvenWrapper(model, per_sample_mse, bn_mode="frozen"), lr=LR).step((x, y))
    finally:
        dist.destroy_process_group()
    Sven(SvenWrapper(single, per_sample_mse, bn_mode="frozen"), lr=LR).step((x, y))
    assert relative_error(flat_parameters(model), flat_parameters(single)) <= 1e-12
