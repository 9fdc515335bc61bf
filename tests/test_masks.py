"""param_fraction on the Gram engine: each mask_mode against the dense float64 reference restricted to its columns."""

from __future__ import annotations

import pytest
import torch
from conftest import STEP_TOLERANCE, Scaled, make_batch, make_mlp, per_sample_mse, per_sample_squared_error
from reference import reference_direction, reference_residuals_and_jacobian, relative_error
from torch import Tensor, nn

from sven.jacobian import MASK_MODES, MaskedJacobian
from sven.nn import SvenWrapper
from sven.opt import Sven

pytestmark = pytest.mark.usefixtures("single_thread")

LR, K, RTOL = 0.5, 64, 1e-3
GRAM_TOLERANCE = 1e-10


class TokenModel(nn.Module):
    """Embedding → LayerNorm → Linear over (B, T, d), the mix Linear applied twice (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4, padding_idx=0)
        self.norm = nn.LayerNorm(4)
        self.mix = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mix(torch.tanh(self.mix(self.norm(self.embed(tokens)))))))


def _model_and_batch(kind: str, batch_size: int = 9) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """A float64 model exercising every block type, and a batch for it."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    if kind == "cnn":
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(),
                              nn.Conv2d(4, 3, 3, stride=2), nn.Flatten(1), nn.Linear(12, 2))
        x = torch.randn(batch_size, 2, 6, 6, generator=generator, dtype=torch.float64)
        target_shape: tuple[int, ...] = (2,)
    elif kind == "tokens":
        model = TokenModel()
        x = torch.randint(0, 7, (batch_size, 5), generator=generator)
        x[:, 3] = x[:, 1]
        target_shape = (5, 2)
    else:
        model = nn.Sequential(nn.Linear(4, 3), Scaled(3), nn.Linear(3, 2))
        x = torch.randn(batch_size, 4, generator=generator, dtype=torch.float64)
        target_shape = (2,)
    y = torch.randn(batch_size, *target_shape, generator=generator, dtype=torch.float64)
    return model.double(), (x, y)


@pytest.mark.parametrize("kind", ["cnn", "tokens", "fallback"])
@pytest.mark.parametrize("fraction", [0.3, 0.7])
@pytest.mark.parametrize("mode", MASK_MODES)
def test_masked_operator_is_the_reference_jacobian_restricted_to_the_columns(
    mode: str, fraction: float, kind: str
) -> None:
    model, batch = _model_and_batch(kind)
    wrapped = SvenWrapper(model, per_sample_squared_error, param_fraction=fraction, mask_mode=mode, engine="gram")
    wrapped.loss_and_grad(batch)
    columns, operator = wrapped.state.columns, wrapped.state.operator
    _, jacobian = reference_residuals_and_jacobian(model, per_sample_squared_error, batch, columns=columns)
    assert operator.shape == tuple(jacobian.shape)
    assert relative_error(operator.gram(), jacobian @ jacobian.T) <= GRAM_TOLERANCE
    assert relative_error(operator.dense(), jacobian) <= GRAM_TOLERANCE
    coefficients = torch.linspace(-1, 1, jacobian.shape[0], dtype=torch.float64)
    assert relative_error(operator.rmatmul(coefficients), jacobian.T @ coefficients) <= GRAM_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kappa, microbatch_size", [(2.0, 1), (1.0, 3)], ids=["plain", "kappa1_microbatch3"])
@pytest.mark.parametrize("engine", ["gram", "functorch"])
@pytest.mark.parametrize("mode", MASK_MODES)
def test_each_mask_mode_takes_the_reference_step_on_its_columns_only(
    mode: str, engine: str, kappa: float, microbatch_size: int, dtype: torch.dtype
) -> None:
    model = make_mlp([4, 6, 3], dtype)  # P = 51
    batch = make_batch(10, 4, 3, dtype)
    wrapped = SvenWrapper(model, per_sample_mse, kappa=kappa, microbatch_size=microbatch_size, param_fraction=0.4,
                          mask_mode=mode, engine=engine)
    optimizer = Sven(wrapped, lr=LR, k=K, rtol=RTOL)
    wrapped.loss_and_grad(batch)
    columns = wrapped.state.columns
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_mse, batch, kappa, microbatch_size,
                                                           columns=columns)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    optimizer.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    untouched = torch.ones(before.numel(), dtype=torch.bool)
    untouched[columns] = False
    assert torch.equal(after[untouched], before[untouched])
    expected = -LR * reference_direction(jacobian, residuals, K, RTOL)
    assert relative_error(after[columns].double() - before[columns].double(), expected) <= STEP_TOLERANCE[dtype]


def _kept(wrapped: SvenWrapper) -> list[Tensor]:
    """The drawn columns as one boolean tensor shaped like each parameter."""
    keep = torch.zeros(wrapped.params.size, dtype=torch.bool)
    keep[wrapped.draw_columns()] = True
    return [k.view(p.shape) for k, p in zip(keep.split(wrapped.params.numels), wrapped.params.tensors)]


def test_rows_mode_keeps_round_f_whole_output_units_with_their_bias_entries() -> None:
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Conv1d(1, 6, 3), nn.Flatten(1), nn.Embedding(4, 10),
                          nn.LayerNorm(10))
    wrapped = SvenWrapper(model, per_sample_mse, param_fraction=0.3, mask_mode="rows")
    linear_w, linear_b, conv_w, conv_b, embed_w, norm_w, norm_b = _kept(wrapped)
    for weight, bias, units in [(linear_w, linear_b, 2), (conv_w.reshape(6, -1), conv_b, 2)]:
        rows = weight.all(dim=1)
        assert torch.equal(rows, weight.any(dim=1)) and torch.equal(rows, bias) and int(rows.sum()) == units
    dims = embed_w.all(dim=0)  # an Embedding's units are its dimensions: columns of the weight
    assert torch.equal(dims, embed_w.any(dim=0)) and int(dims.sum()) == 3
    assert int(norm_w.sum() + norm_b.sum()) == int(0.3 * 20), "other parameters are drawn elementwise"


def test_tensor_mode_keeps_whole_tensors_holding_about_f_p_entries() -> None:
    model = make_mlp([4, 6, 3])  # tensors of 24, 6, 18 and 3 entries, P = 51
    for fraction in (0.01, 0.5, 0.99):
        wrapped = SvenWrapper(model, per_sample_mse, param_fraction=fraction, mask_mode="tensor")
        for _ in range(5):
            kept = _kept(wrapped)
            count = sum(int(k.sum()) for k in kept)
            assert all(bool(k.all()) or not bool(k.any()) for k in kept)
            assert count >= 1 and abs(count - fraction * 51) <= 24


@pytest.mark.parametrize("mode", MASK_MODES)
def test_each_mode_draws_a_fresh_subset_each_step_reproducible_from_the_seed(mode: str) -> None:
    model = make_mlp([4, 6, 3])
    draws = []
    for _ in range(2):
        torch.manual_seed(11)
        wrapped = SvenWrapper(model, per_sample_mse, param_fraction=0.5, mask_mode=mode)
        draws.append([wrapped.draw_columns() for _ in range(6)])
    assert all(torch.equal(a, b) for a, b in zip(*draws))
    assert any(not torch.equal(draws[0][0], later) for later in draws[0][1:])


def test_elementwise_draws_the_same_columns_as_before_masks_had_modes() -> None:
    """⌊f·P⌋ sorted indices of one randperm(P) from the wrapper's generator."""
    model = make_mlp([4, 6, 3])
    torch.manual_seed(5)
    wrapped = SvenWrapper(model, per_sample_mse, param_fraction=0.5)
    generator = torch.Generator().manual_seed(0)
    generator.set_state(wrapped.generator.get_state())
    assert torch.equal(wrapped.draw_columns(), torch.randperm(51, generator=generator)[:25].sort().values)


def test_auto_picks_the_gram_engine_for_any_param_fraction() -> None:
    wrapped = SvenWrapper(make_mlp([4, 6, 3]), per_sample_mse, param_fraction=0.5)
    wrapped.loss_and_grad(make_batch(8, 4, 3))
    assert wrapped.engine_plan()["engine"] == "gram" and isinstance(wrapped.state.operator, MaskedJacobian)


@pytest.mark.parametrize("mode", MASK_MODES)
def test_the_masked_finiteness_check_forms_no_gram_matrix_and_finds_the_bad_row(mode: str) -> None:
    """Finite factors: no non-finite row and no Gram matrix formed; a NaN input: exactly the rows of M with a NaN."""
    model, (x, y) = _model_and_batch("fallback")
    wrapped = SvenWrapper(model, per_sample_squared_error, param_fraction=0.5, mask_mode=mode, engine="gram")
    wrapped.loss_and_grad((x, y))
    operator = wrapped.state.operator
    assert not bool(operator.nonfinite_rows().any()) and "_cached_gram" not in operator.__dict__
    x[2, 1] = float("nan")
    wrapped.loss_and_grad((x, y))
    operator = wrapped.state.operator
    expected = ~torch.isfinite(operator.dense()).all(dim=1)
    assert expected.tolist() == [i == 2 for i in range(x.shape[0])]
    assert torch.equal(operator.nonfinite_rows(), expected)
