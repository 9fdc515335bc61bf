"""Never a silent wrong step: each bad input ends in a clear error or in a reported skip that changes nothing.

A skipped step leaves every parameter and the whole optimizer state bit-identical
and says why in ``optimizer.last_step``. Inputs that are unusual but valid (k > B,
k > P, B = 1, frozen parameters, half precision, Dropout, extra batch tensors)
give the dense float64 reference step.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import DEVICES, STEP_TOLERANCE, flat_parameters, make_batch, make_mlp, parameter_snapshot, per_sample_mse
from reference import reference_direction, reference_residuals_and_jacobian, relative_error
from torch import Tensor, nn

import sven.opt.eigen
from sven import Sven, SvenWrapper
from sven.jacobian import GramEngine, ParamSpace, all_finite
from sven.opt.regularized import RegularizedSolve

ENGINES = ["gram", "functorch"]


def stepped_optimizer(model: nn.Module, engine: str = "gram", **options) -> tuple[SvenWrapper, Sven]:
    """A wrapper and an optimizer with RMSProp and momentum buffers already filled by one good step."""
    wrapped = SvenWrapper(model, per_sample_mse, engine=engine)
    optimizer = Sven(wrapped, rmsprop="pre", momentum=0.5, **options)
    optimizer.step(make_batch(8, model[0].in_features, model[-1].out_features, seed=7))
    return wrapped, optimizer


def assert_skipped_without_change(optimizer: Sven, batch: tuple, reason: str) -> None:
    params = parameter_snapshot(optimizer.wrapped.model)
    before = optimizer.state_dict()
    with pytest.warns(RuntimeWarning, match="skipped the step"):
        optimizer.step(batch)
    after = optimizer.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(params, parameter_snapshot(optimizer.wrapped.model)))
    assert before["param_groups"] == after["param_groups"]
    for key, value in before["sven"].items():
        same = torch.equal(value, after["sven"][key]) if isinstance(value, Tensor) else value == after["sven"][key]
        assert same, f"optimizer state {key!r} changed on a skipped step"
    assert optimizer.last_step["skipped"] is True
    assert reason in optimizer.last_step["reason"]


def assert_reference_step(model: nn.Module, batch: tuple, lr: float = 0.1, k: int = 64, rtol: float = 1e-3,
                          engine: str = "gram", tolerance: float = 1e-8) -> Sven:
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch)
    expected = -lr * reference_direction(jacobian, residuals, k, rtol)
    before = flat_parameters(model)
    optimizer = Sven(SvenWrapper(model, per_sample_mse, engine=engine), lr=lr, k=k, rtol=rtol)
    optimizer.step(batch)
    assert relative_error(flat_parameters(model) - before, expected) < tolerance
    return optimizer


@pytest.mark.parametrize("svd_mode", ["auto", "torch"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("where, value", [("target", float("nan")), ("target", float("inf")),
                                          ("input", float("nan")), ("input", float("inf"))])
def test_non_finite_losses_or_inputs_skip_the_step(engine: str, where: str, value: float, svd_mode: str) -> None:
    _, optimizer = stepped_optimizer(make_mlp([3, 4, 2]), engine, svd_mode=svd_mode)
    x, y = make_batch(8, 3, 2)
    (y if where == "target" else x)[3, 0] = value
    assert_skipped_without_change(optimizer, (x, y), "1 of 8 samples have a non-finite loss or Jacobian row")
    assert optimizer.last_step["bad_samples"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite_matches_the_entrywise_test(dtype: torch.dtype) -> None:
    """One sum decides for finite tensors; a sum that overflows on finite entries falls back to the entrywise test."""
    largest = torch.finfo(dtype).max
    cases = {"finite": torch.randn(5, 4, dtype=dtype), "overflowing sum": torch.full((3,), largest, dtype=dtype)}
    for value in (float("nan"), float("inf"), -float("inf")):
        cases[f"one {value}"] = torch.randn(5, 4, dtype=dtype).index_put_((torch.tensor(3), torch.tensor(1)),
                                                                         torch.tensor(value, dtype=dtype))
    cases["inf and -inf"] = torch.tensor([float("inf"), -float("inf")], dtype=dtype)
    assert not math.isfinite(float(cases["overflowing sum"].sum()))
    for name, tensor in cases.items():
        assert all_finite(tensor) == bool(torch.isfinite(tensor).all()), name


def mse_with_nan_gradient_where_scale_is_zero(pred: Tensor, target: Tensor, scale: Tensor) -> Tensor:
    """Per-sample MSE plus 0·√(scale·‖pred‖²): a finite loss whose gradient is NaN where scale = 0."""
    return per_sample_mse(pred, target) + 0.0 * (scale * (pred**2).sum(dim=1)).sqrt()


@pytest.mark.parametrize("svd_mode", ["auto", "torch"])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_nan_jacobian_row_with_finite_losses_skips_the_step(engine: str, svd_mode: str) -> None:
    model = make_mlp([3, 4, 2])
    wrapped = SvenWrapper(model, mse_with_nan_gradient_where_scale_is_zero, engine=engine)
    optimizer = Sven(wrapped, svd_mode=svd_mode)
    x, y = make_batch(8, 3, 2)
    scale = torch.ones(8, dtype=torch.float64)
    scale[5] = 0.0
    losses, _ = wrapped.loss_and_grad((x, y, scale))
    assert bool(torch.isfinite(losses).all())
    assert_skipped_without_change(optimizer, (x, y, scale), "1 of 8 samples")


def test_the_step_after_a_skipped_one_is_the_reference_step() -> None:
    model = make_mlp([3, 4, 2])
    optimizer = Sven(SvenWrapper(model, per_sample_mse), lr=0.5)
    x, y = make_batch(12, 3, 2)
    x_bad = x.clone()
    x_bad[5, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="1 of 12 samples"):
        optimizer.step((x_bad, y))
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, (x, y))
    expected = -0.5 * reference_direction(jacobian, residuals, 64, 1e-3)
    before = flat_parameters(model)
    optimizer.step((x, y))
    assert optimizer.last_step["skipped"] is False
    assert relative_error(flat_parameters(model) - before, expected) <= STEP_TOLERANCE[torch.float64]


def test_an_all_zero_jacobian_skips_with_the_reason() -> None:
    """ReLUs that died after a step, before a bias-free output layer: no loss depends on any parameter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False)).double()
    _, optimizer = stepped_optimizer(model)
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    assert_skipped_without_change(optimizer, make_batch(8, 3, 2), "the Jacobian is zero (σ_max = 0)")


def test_an_rtol_that_keeps_nothing_skips_with_the_reason() -> None:
    _, optimizer = stepped_optimizer(make_mlp([3, 4, 2]))
    optimizer.param_groups[0]["rtol"] = 1.0
    assert_skipped_without_change(optimizer, make_batch(8, 3, 2), "no singular value is above the cut")


def test_k_larger_than_the_batch_keeps_every_value_above_the_cut() -> None:
    optimizer = assert_reference_step(make_mlp([3, 6, 2]), make_batch(8, 3, 2), k=100)
    assert optimizer.last_step["rank_kept"] == 8


def test_k_larger_than_the_parameter_count_keeps_at_most_p_values() -> None:
    model = make_mlp([2, 1])
    optimizer = assert_reference_step(model, make_batch(16, 2, 1), k=50)
    assert optimizer.last_step["rank_kept"] == 3 and optimizer.last_step["svd_mode"] == "gram"  # the P × P side


@pytest.mark.parametrize("engine", ENGINES)
def test_a_batch_of_one_sample_takes_the_reference_step(engine: str) -> None:
    optimizer = assert_reference_step(make_mlp([3, 4, 2]), make_batch(1, 3, 2), engine=engine)
    assert optimizer.last_step["rank_kept"] == 1


def test_an_empty_batch_is_refused() -> None:
    wrapped = SvenWrapper(make_mlp([3, 4, 2]), per_sample_mse)
    x, y = make_batch(8, 3, 2)
    with pytest.raises(ValueError, match=r"at least one sample along dim 0; got y of shape \(0, 2\)"):
        Sven(wrapped).step((x[:0], y[:0]))


@pytest.mark.parametrize("engine", ENGINES)
def test_frozen_parameters_stay_untouched_and_are_not_counted(engine: str) -> None:
    model = make_mlp([3, 4, 2])
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    wrapped = SvenWrapper(model, per_sample_mse, engine=engine)
    assert wrapped.params.size == sum(p.numel() for p in model.parameters()) - frozen.numel()
    assert_reference_step(model, make_batch(8, 3, 2), engine=engine)
    assert torch.equal(model[0].weight, frozen)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_step_close_to_the_float32_step(dtype: torch.dtype) -> None:
    """Gram and solve run in float64, the update is cast back: the step differs from float32 by round-off only.

    The half model's forward and backward perturb M and r by about its unit round-off u (4.9e-4 for
    float16, 3.9e-3 for bfloat16) relative; the step M⁺r of this consistent full-row-rank system moves
    by at most about κ(M)·u, the tolerance (κ ≈ 25 here: 1.2e-2 and 9.8e-2; measured 1.6e-3 and 1.9e-2).
    """
    half = make_mlp([3, 16, 2], dtype=dtype)
    single = copy.deepcopy(half).float()
    x, y = make_batch(8, 3, 2, dtype=torch.float32)
    sigma = torch.linalg.svdvals(reference_residuals_and_jacobian(single, per_sample_mse, (x, y))[1])
    tolerance = float(sigma[0] / sigma[-1]) * torch.finfo(dtype).eps / 2
    steps = []
    for model, batch in ((half, (x.to(dtype), y.to(dtype))), (single, (x, y))):
        before = flat_parameters(model)
        Sven(SvenWrapper(model, per_sample_mse), lr=1.0).step(batch)
        steps.append(flat_parameters(model) - before)
    assert all(p.dtype == dtype for p in half.parameters())
    assert relative_error(steps[0], steps[1]) < tolerance


@pytest.mark.cuda
def test_a_batch_on_another_device_is_moved_to_the_model() -> None:
    model = make_mlp([3, 4, 2])
    reference = copy.deepcopy(model)
    batch = make_batch(8, 3, 2)
    wrapped = SvenWrapper(model, per_sample_mse, device="cuda")
    losses = Sven(wrapped).step(batch)
    assert losses.device.type == "cuda"
    assert_reference_step(reference, batch, tolerance=1e-6)
    assert relative_error(flat_parameters(model.cpu()), flat_parameters(reference)) < 1e-6


def test_bad_bn_modes_are_refused_and_per_sample_engines_refuse_batch_statistics() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match=r"bn_mode must be one of \('batch', 'frozen'\); got 'train'"):
        SvenWrapper(model, per_sample_mse, bn_mode="train")
    untracked = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).double()
    with pytest.raises(ValueError, match=r"bn_mode='frozen'.*\['1'\] have none \(track_running_stats=False\)"):
        SvenWrapper(untracked, per_sample_mse, bn_mode="frozen")
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm1d\) normalises with batch statistics.*bn_mode"):
        GramEngine(model, ParamSpace.of_module(model)).compute(per_sample_mse, make_batch(8, 3, 2))


class FixedMask(nn.Module):
    """Multiplies by one stored dropout mask (B, d): the reference model for a Dropout forward."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_uses_one_mask_for_the_losses_and_the_jacobian(device: str) -> None:
    """engine="auto" checks its engine on the same masks: it replays the RNG of the model's device."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    masks = []
    model[2].register_forward_hook(lambda module, args, out: masks.append((out / args[0]).detach()))
    wrapped = SvenWrapper(model, per_sample_mse, device=device)
    batch = make_batch(8, 3, 2)
    losses, _ = wrapped.loss_and_grad(batch)
    assert bool((masks[0] == 0).any()) and masks[0].device.type == device
    assert all(torch.equal(mask, masks[0]) for mask in masks), "engine='auto' checks its engine on the same masks"
    frozen_mask = nn.Sequential(model[0], model[1], FixedMask(masks[0]), model[3]).cpu()
    residuals, jacobian = reference_residuals_and_jacobian(frozen_mask, per_sample_mse, batch)
    assert relative_error(losses.cpu(), residuals) < 1e-12
    assert relative_error(wrapped.state.operator.dense().cpu(), jacobian) < 1e-12


class ScaledFeatures(nn.Module):
    """A parametrised layer without a Gram rule: the Gram engine sends it to the functorch fallback."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_dropout_with_a_fallback_layer_is_refused_on_the_gram_engine_and_works_on_functorch() -> None:
    """The fallback would draw other masks than the batched pass: an error, never an inconsistent Jacobian."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), ScaledFeatures(8), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    batch = make_batch(8, 3, 2)
    with pytest.raises(ValueError, match=r"module '2' \(Dropout, p=0.5\).*\['1.scale'\].*engine='functorch'"):
        SvenWrapper(model, per_sample_mse, engine="gram").loss_and_grad(batch)
    losses, _ = SvenWrapper(model, per_sample_mse, engine="functorch").loss_and_grad(batch)
    assert losses.shape == (8,)
    model.eval()
    SvenWrapper(model, per_sample_mse, engine="gram").loss_and_grad(batch)


@pytest.mark.parametrize("engine", ENGINES)
def test_extra_batch_tensors_reach_the_loss(engine: str) -> None:
    weighted = lambda pred, target, weight: weight * per_sample_mse(pred, target)  # noqa: E731
    model = make_mlp([3, 4, 2])
    x, y = make_batch(8, 3, 2)
    weight = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
    residuals, jacobian = reference_residuals_and_jacobian(model, weighted, (x, y, weight))
    wrapped = SvenWrapper(model, weighted, engine=engine)
    losses, _ = wrapped.loss_and_grad((x, y, weight))
    assert relative_error(losses, residuals) < 1e-12
    assert relative_error(wrapped.state.operator.dense(), jacobian) < 1e-12


def test_a_loss_closing_over_batch_tensors_works_batched_and_is_refused_per_sample() -> None:
    """The Gram engine evaluates the loss on the whole batch; the functorch engine per sample, where a
    closed-over (B,) tensor turns one sample's loss into B values: that must be an error, not a wrong step."""
    weight = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
    closing = lambda pred, target: weight * per_sample_mse(pred, target)  # noqa: E731
    model = make_mlp([3, 4, 2])
    batch = make_batch(8, 3, 2)
    residuals, jacobian = reference_residuals_and_jacobian(model, closing, batch)
    wrapped = SvenWrapper(model, closing, engine="gram")
    wrapped.loss_and_grad(batch)
    assert relative_error(wrapped.state.operator.dense(), jacobian) < 1e-12
    with pytest.raises(ValueError, match=r"shape \(8,\) for one sample inside torch.func.vmap .*batch-sized tensor"):
        SvenWrapper(model, closing, engine="functorch").loss_and_grad(batch)


def failing(name: str):
    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError(f"{name}: simulated convergence failure")
    return fail


def test_an_eigensolver_failure_falls_back_to_a_float64_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_mlp([3, 6, 2])
    batch = make_batch(8, 3, 2)
    monkeypatch.setattr(sven.opt.eigen, "top_eigh", failing("eigh"))
    with pytest.warns(RuntimeWarning, match="fell back to the float64 SVD"):
        optimizer = assert_reference_step(model, batch, k=5)
    assert optimizer.last_step["svd_mode"] == "torch"
    assert "svd_mode 'gram' failed (eigh: simulated convergence failure)" in optimizer.last_step["solver_note"]


def test_when_the_svd_fallback_fails_too_the_step_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    _, optimizer = stepped_optimizer(make_mlp([3, 6, 2]), k=5)
    monkeypatch.setattr(sven.opt.eigen, "top_eigh", failing("eigh"))
    monkeypatch.setattr(torch.linalg, "svd", failing("svd"))
    assert_skipped_without_change(optimizer, make_batch(8, 3, 2), "its float64 SVD fallback failed too")


def test_a_direction_whose_solve_fails_skips_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A LinAlgError while a direction is built (here the regularised solve's) leaves everything as it was."""
    model = make_mlp([3, 6, 2])
    optimizer = Sven(SvenWrapper(model, per_sample_mse), rmsprop="post", momentum=0.5, fisher_decay=0.1)
    optimizer.step(make_batch(8, 3, 2, seed=7))
    monkeypatch.setattr(RegularizedSolve, "direction", failing("direction"))
    assert_skipped_without_change(optimizer, make_batch(8, 3, 2), "the direction's solve failed (direction: simulated")
