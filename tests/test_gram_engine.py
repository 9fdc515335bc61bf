"""The Gram engine against the dense float64 reference, layer type by layer type and in mixed models.

For every model: ``gram()`` equals J Jᵀ (1e-10 relative), ``dense()`` equals J,
``rmatmul(c)`` equals Jᵀ c, and a full Sven step on the engine equals the
reference step (float64 ≤ 1e-8, float32 ≤ 1e-4), with and without micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import STEP_TOLERANCE, Scaled, flat_parameters, make_batch, per_sample_squared_error
from reference import reference_direction, reference_residuals_and_jacobian, relative_error
from torch import Tensor, nn

import sven.jacobian.gram_engine as gram_module
import sven.opt.spectrum as spectrum_module
from sven.jacobian import GradientBlock, GramEngine, GramJacobian, OuterProductBlock, ParamSpace, register_gram_rule
from sven.jacobian.layers.embedding import EmbeddingBlock
from sven.nn import SvenWrapper
from sven.opt import Sven
from sven.opt.pinv import truncated_spectrum
from sven.opt.spectrum import REFINEMENT_REACH, CertifiedGramSpectrum, certify_nothing_cut

GRAM_TOLERANCE = 1e-10
LR = 0.5


class SharedLinear(nn.Module):
    """One Linear applied twice in a forward (weight sharing), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class SharedEmbedding(nn.Module):
    """One Embedding applied to the tokens and to the reversed tokens, then a Linear over (B, T, d)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 3, padding_idx=0)
        self.out = nn.Linear(3, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.embed(tokens) * self.embed(tokens.flip(1))))


class TokenModel(nn.Module):
    """Embedding (padding_idx 0) → LayerNorm → Linear over (B, T, d) → Linear, output (B, T, 2)."""

    def __init__(self, vocab: int = 7, dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mix(self.norm(self.embed(tokens)))))


def _key_padding(keys: Tensor) -> Tensor:
    """Per-sample key padding (B, S) read off each sample's keys: first feature < -0.3, never position 0."""
    mask = keys[..., 0] < -0.3
    mask[:, 0] = False
    return mask


def _mask_kwargs(masks: str, query: Tensor, keys: Tensor, heads: int) -> dict[str, Tensor | bool]:
    """Masks for queries (B, L, d) and keys (B, S, d): "causal" (bool (L, S) with the is_causal hint and
    need_weights=False, MultiheadAttention's is_causal route),
    "padding" (per-sample key padding and a float (L, S) mask) or "per_sample" (bool (B·heads, L, S))."""
    length, source = query.shape[1], keys.shape[1]
    if masks == "causal":
        return {"attn_mask": torch.ones(length, source, dtype=torch.bool).triu(1), "is_causal": True,
                "need_weights": False}
    if masks == "padding":
        scores = torch.linspace(-1, 1, length * source, dtype=query.dtype).view(length, source)
        return {"key_padding_mask": _key_padding(keys), "attn_mask": scores}
    if masks == "per_sample":
        blocked = (query[:, :, None, 1] * keys[:, None, :, 1] > 0.2) & ~torch.eye(length, source, dtype=torch.bool)
        return {"attn_mask": blocked.repeat_interleave(heads, dim=0)}
    return {}


class AttentionModel(nn.Module):
    """Linear → nn.MultiheadAttention → Linear, (B, T, 3) → (B, T, 2).

    ``source``: "self" (query = key = value), "cross" (key = value from the input's last T − 1
    positions) or "separate" (key and value from two other Linear maps, kdim 3 and vdim 5).
    """

    def __init__(self, source: str = "self", masks: str = "", batch_first: bool = True, **options: bool) -> None:
        super().__init__()
        self.source, self.masks, self.batch_first = source, masks, batch_first
        dims = {"kdim": 3, "vdim": 5} if source == "separate" else {}
        self.inp = nn.Linear(3, 4)
        self.key = nn.Linear(3, dims.get("kdim", 4))
        self.value = nn.Linear(3, dims.get("vdim", 4))
        self.attention = nn.MultiheadAttention(4, num_heads=2, batch_first=batch_first, **dims, **options)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        query = self.inp(x)
        key = value = query if self.source == "self" else torch.tanh(self.key(x[:, 1:]))
        if self.source == "separate":
            value = self.value(x[:, 1:])
        options = _mask_kwargs(self.masks, query, key, self.attention.num_heads)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        attended, _ = self.attention(query, key, value, **options)
        return self.out(attended if self.batch_first else attended.transpose(0, 1))


class TransformerModel(nn.Module):
    """Linear → nn.TransformerEncoderLayer or nn.TransformerDecoderLayer (memory: the input mapped by a
    Linear) with a causal mask and per-sample key padding (or no masks) → Linear, (B, T, 3) → (B, T, 2)."""

    def __init__(self, decoder: bool, batch_first: bool, norm_first: bool, dropout: float = 0.0,
                 masks: bool = True) -> None:
        super().__init__()
        self.decoder, self.batch_first, self.masks = decoder, batch_first, masks
        layer_type = nn.TransformerDecoderLayer if decoder else nn.TransformerEncoderLayer
        self.inp = nn.Linear(3, 4)
        self.memory = nn.Linear(3, 4)
        self.layer = layer_type(4, nhead=2, dim_feedforward=6, dropout=dropout, batch_first=batch_first,
                                norm_first=norm_first)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h, memory = self.inp(x), torch.tanh(self.memory(x))
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1) if self.masks else None
        padding, memory_padding = (_key_padding(h), _key_padding(memory)) if self.masks else (None, None)
        if not self.batch_first:
            h, memory = h.transpose(0, 1), memory.transpose(0, 1)
        if self.decoder:
            out = self.layer(h, memory, tgt_mask=causal, tgt_key_padding_mask=padding, tgt_is_causal=self.masks,
                             memory_key_padding_mask=memory_padding)
        else:
            out = self.layer(h, src_mask=causal, src_key_padding_mask=padding, is_causal=self.masks)
        return self.out(out if self.batch_first else out.transpose(0, 1))


@dataclass(frozen=True)
class ModelCase:
    """A model builder, input and target builders, and which parameter names must use the fallback."""

    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator, int], Tensor]
    target_shape: tuple[int, ...]
    fallback: tuple[str, ...] = ()
    batch_size: int = 10

    def model_and_batch(self, dtype: torch.dtype) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
        torch.manual_seed(0)
        model = self.build().to(dtype)
        generator = torch.Generator().manual_seed(1)
        x = self.inputs(generator, self.batch_size)
        x = x.to(dtype) if x.is_floating_point() else x
        y = torch.randn(self.batch_size, *self.target_shape, generator=generator, dtype=torch.float64).to(dtype)
        return model, (x, y)


def _normal(*shape: int) -> Callable[[torch.Generator, int], Tensor]:
    return lambda generator, batch: torch.randn(batch, *shape, generator=generator, dtype=torch.float64)


def _in_eval_with_statistics(model: nn.Module) -> nn.Module:
    """``model`` in eval mode, its BatchNorm layers given random running statistics."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.running_mean.normal_(0, 0.5)
                layer.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _tokens(generator: torch.Generator, batch: int) -> Tensor:
    """Tokens (B, 6) from a vocabulary of 7: repeated tokens in every row, padding (0) in most rows."""
    tokens = torch.randint(1, 7, (batch, 6), generator=generator)
    tokens[:, 3] = tokens[:, 1]
    tokens[::2, -1] = 0
    tokens[1::3, 0] = 0
    return tokens


CASES = {
    "linear": ModelCase(lambda: nn.Linear(5, 3), _normal(5), (3,)),
    "linear_no_bias": ModelCase(lambda: nn.Linear(5, 3, bias=False), _normal(5), (3,)),
    "linear_over_tokens": ModelCase(lambda: nn.Linear(3, 2), _normal(4, 3), (4, 2)),
    "mlp": ModelCase(lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), _normal(5), (3,)),
    "conv1d": ModelCase(lambda: nn.Conv1d(2, 3, 3, padding=1, stride=2), _normal(2, 9), (3, 5)),
    "conv2d": ModelCase(lambda: nn.Conv2d(2, 3, 3, dilation=2, padding="same"), _normal(2, 6, 6), (3, 6, 6)),
    "group_norm": ModelCase(lambda: nn.GroupNorm(2, 4), _normal(4, 3, 3), (4, 3, 3)),
    "layer_norm": ModelCase(lambda: nn.LayerNorm(4), _normal(3, 4), (3, 4)),
    "layer_norm_flat": ModelCase(lambda: nn.LayerNorm(4), _normal(4), (4,)),
    "group_norm_flat": ModelCase(lambda: nn.GroupNorm(2, 4), _normal(4), (4,)),
    "embedding": ModelCase(lambda: nn.Embedding(7, 3, padding_idx=0), _tokens, (6, 3)),
    "cnn": ModelCase(
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(),
            nn.Conv2d(4, 3, 3, stride=2), nn.Flatten(1), nn.Unflatten(1, (3, 4)),
            nn.Conv1d(3, 2, 2), nn.Flatten(1), nn.Tanh(), nn.Linear(6, 2),
        ),
        _normal(2, 6, 6), (2,),
    ),
    "tokens": ModelCase(TokenModel, _tokens, (6, 2)),
    "custom_layer": ModelCase(
        lambda: nn.Sequential(nn.Linear(4, 3), Scaled(3), nn.Linear(3, 2)), _normal(4), (2,),
        fallback=("1.scale", "1.shift"),
    ),
    "shared_weights": ModelCase(SharedLinear, _normal(4), (2,)),
    "shared_embedding": ModelCase(SharedEmbedding, _tokens, (6, 2)),
    "attention": ModelCase(AttentionModel, _normal(4, 3), (4, 2)),
    "attention_sequence_first_causal": ModelCase(lambda: AttentionModel(masks="causal", batch_first=False),
                                                 _normal(4, 3), (4, 2)),
    "attention_padding_float_mask": ModelCase(lambda: AttentionModel(masks="padding"), _normal(4, 3), (4, 2)),
    "attention_per_sample_mask_no_bias": ModelCase(lambda: AttentionModel(masks="per_sample", bias=False),
                                                   _normal(4, 3), (4, 2)),
    "cross_attention_padding": ModelCase(lambda: AttentionModel("cross", "padding", batch_first=False),
                                         _normal(4, 3), (4, 2)),
    "cross_attention_kdim_vdim": ModelCase(lambda: AttentionModel("separate", "padding"), _normal(4, 3), (4, 2)),
    "attention_bias_kv_on_the_fallback": ModelCase(
        lambda: AttentionModel(add_bias_kv=True), _normal(4, 3), (4, 2),
        fallback=tuple(f"attention.{name}" for name in ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v",
                                                        "out_proj.weight", "out_proj.bias")),
    ),
    **{
        f"{kind}_{layout}_{norm}": ModelCase(
            lambda kind=kind, layout=layout, norm=norm: TransformerModel(
                kind == "decoder", layout == "batch_first", norm == "norm_first"),
            _normal(5, 3), (5, 2),
        )
        for kind in ("encoder", "decoder")
        for layout in ("batch_first", "sequence_first")
        for norm in ("norm_first", "norm_last")
    },
    "decoder_no_masks": ModelCase(
        lambda: TransformerModel(decoder=True, batch_first=False, norm_first=False, masks=False), _normal(5, 3), (5, 2),
    ),
    "encoder_eval_with_dropout": ModelCase(
        lambda: TransformerModel(decoder=False, batch_first=True, norm_first=False, dropout=0.1).eval(),
        _normal(5, 3), (5, 2),
    ),
    "batch_norm_eval": ModelCase(
        lambda: _in_eval_with_statistics(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))),
        _normal(4), (2,),
    ),
    "batch_norm2d_eval": ModelCase(
        lambda: _in_eval_with_statistics(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh())),
        _normal(2, 5, 5), (3, 3, 3),
    ),
}


def engine_operator(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[GramEngine, Tensor, GramJacobian]:
    """The Gram engine over ``model``, its losses (B,) and its operator on ``batch``."""
    engine = GramEngine(model, ParamSpace.of_module(model))
    losses, _, operator = engine.compute(per_sample_squared_error, batch)
    return engine, losses, operator


SHORTCUT = [False, pytest.param(True, marks=pytest.mark.small_jacobian)]
"""Factored operator, and the same with M itself held when small (``SMALL_JACOBIAN_ELEMENTS``)."""


@pytest.mark.parametrize("shortcut", SHORTCUT, ids=["factored", "small_m"])
@pytest.mark.parametrize("case_name", CASES)
def test_operator_matches_the_dense_reference(case_name: str, shortcut: bool) -> None:
    case = CASES[case_name]
    model, batch = case.model_and_batch(torch.float64)
    engine, losses, operator = engine_operator(model, batch)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_squared_error, batch)
    assert engine.plan()["fallback_parameters"] == list(case.fallback)
    assert (operator.small_dense is not None) == shortcut
    vector = torch.randn(jacobian.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert relative_error(operator.matmul(vector), jacobian @ vector) <= GRAM_TOLERANCE
    assert relative_error(losses, residuals) <= 1e-14
    assert relative_error(operator.gram(), jacobian @ jacobian.T) <= GRAM_TOLERANCE
    assert relative_error(operator.dense(), jacobian) <= GRAM_TOLERANCE
    coeffs = torch.randn(jacobian.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert relative_error(operator.rmatmul(coeffs[:, 0]), jacobian.T @ coeffs[:, 0]) <= GRAM_TOLERANCE
    assert relative_error(operator.rmatmul(coeffs), jacobian.T @ coeffs) <= GRAM_TOLERANCE


@pytest.mark.parametrize("shortcut", SHORTCUT, ids=["factored", "small_m"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("case_name", ["mlp", "conv2d", "custom_layer", "shared_weights", "shared_embedding"])
def test_finite_checks_match_the_dense_reference(case_name: str, value: float, shortcut: bool) -> None:
    """``all_rows_finite`` (one sum per factor) and ``nonfinite_rows`` against the rows of the dense Jacobian,
    clean and with a NaN or Inf target in sample 2 (so NaN or Inf backprops in that sample's factors). Each
    reference row is the Jacobian of its sample alone (a batched jacrev spreads a NaN through 0·NaN)."""
    model, (x, y) = CASES[case_name].model_and_batch(torch.float64)
    _, _, clean = engine_operator(model, (x, y))
    assert clean.all_rows_finite() and not bool(clean.nonfinite_rows().any())
    y[2] = value
    _, _, operator = engine_operator(model, (x, y))
    rows = [reference_residuals_and_jacobian(model, per_sample_squared_error, (x[i:i + 1], y[i:i + 1]))[1]
            for i in range(y.shape[0])]
    expected = torch.tensor([not bool(torch.isfinite(row).all()) for row in rows])
    assert expected.tolist() == [i == 2 for i in range(len(expected))]
    assert not operator.all_rows_finite()
    assert torch.equal(operator.nonfinite_rows(), expected)


@pytest.mark.parametrize("chunk_numel", [1, 12, 30, 1 << 22],
                         ids=["one_sample_groups", "sample_pairs", "one_chunk_per_parameter", "one_chunk"])
def test_fallback_chunks_match_the_dense_reference(chunk_numel: int) -> None:
    """Two 3-entry fallback parameters, B = 10: chunk sizes that force one parameter per chunk, sample groups
    of 2 and of 1 (every pair of groups re-evaluated), or a single chunk; all exact."""
    model, batch = CASES["custom_layer"].model_and_batch(torch.float64)
    engine = GramEngine(model, ParamSpace.of_module(model), chunk_numel=chunk_numel)
    _, _, operator = engine.compute(per_sample_squared_error, batch)
    _, jacobian = reference_residuals_and_jacobian(model, per_sample_squared_error, batch)
    coeffs = torch.randn(jacobian.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert relative_error(operator.gram(), jacobian @ jacobian.T) <= GRAM_TOLERANCE
    assert relative_error(operator.rmatmul(coeffs), jacobian.T @ coeffs) <= GRAM_TOLERANCE


@pytest.mark.parametrize("chunk_numel", [1, 1 << 22], ids=["recomputed", "kept"])
def test_fallback_block_keeps_the_parameters_it_was_computed_at(chunk_numel: int) -> None:
    """Mᵀc and J Jᵀ stay those of the batch's parameters after the model is changed in place."""
    model, batch = CASES["custom_layer"].model_and_batch(torch.float64)
    engine = GramEngine(model, ParamSpace.of_module(model), chunk_numel=chunk_numel)
    _, _, operator = engine.compute(per_sample_squared_error, batch)
    _, jacobian = reference_residuals_and_jacobian(model, per_sample_squared_error, batch)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.5)
    coeffs = torch.ones(jacobian.shape[0], dtype=torch.float64)
    assert relative_error(operator.gram(), jacobian @ jacobian.T) <= GRAM_TOLERANCE
    assert relative_error(operator.rmatmul(coeffs), jacobian.T @ coeffs) <= GRAM_TOLERANCE


def test_attention_masks_of_the_cases_mask_some_keys_but_no_whole_row() -> None:
    model, (x, _) = CASES["attention_padding_float_mask"].model_and_batch(torch.float64)
    padding = _key_padding(model.inp(x))
    assert bool(padding.any()) and not bool(padding.all(dim=1).any())
    blocked = _mask_kwargs("per_sample", model.inp(x), model.inp(x), 2)["attn_mask"]
    assert bool(blocked.any()) and not bool(blocked.all(dim=-1).any())


def test_attention_weights_in_the_loss_are_refused() -> None:
    """The rule covers the attention output only; a loss that reads the weights must not get a wrong Jacobian."""

    class WeightedByAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x: Tensor) -> Tensor:
            attended, weights = self.attention(x, x, x)
            return attended * weights[..., :1]

    model = WeightedByAttention().to(torch.float64)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"other than its first \(e.g. attention weights\).*functorch"):
        engine_operator(model, (x, x))


def test_attention_dropout_in_train_mode_is_refused() -> None:
    model = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.1, batch_first=True).to(torch.float64)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"MultiheadAttention\(dropout=0.1\) in train mode.*eval"):
        engine_operator(model, (x, x))


def test_attention_dropout_is_refused_when_attention_takes_the_fallback() -> None:
    """On the fallback (bias_k) the per-sample pass would draw other attention dropout masks."""
    model = AttentionModel(add_bias_kv=True, dropout=0.2).to(torch.float64)
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"module 'attention' \(MultiheadAttention, p=0.2\) is active"):
        engine_operator(model, (x, torch.zeros(3, 4, 2, dtype=torch.float64)))


def test_eval_mode_transformer_takes_no_fused_path_while_recording(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's fused inference kernels (which skip the hooked submodules) run only without grad."""
    model, batch = CASES["encoder_eval_with_dropout"].model_and_batch(torch.float64)
    _, jacobian = reference_residuals_and_jacobian(model, per_sample_squared_error, batch)  # (takes the fused path)

    def fused(*args: object, **kwargs: object) -> None:
        raise AssertionError("fused fast path taken")

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", fused)
    monkeypatch.setattr(torch, "_native_multi_head_attention", fused)
    with torch.no_grad(), pytest.raises(AssertionError, match="fused fast path taken"):
        model.layer(torch.randn(2, 5, 4, dtype=torch.float64))
    _, _, operator = engine_operator(model, batch)
    assert relative_error(operator.gram(), jacobian @ jacobian.T) <= GRAM_TOLERANCE


def test_token_case_has_repeats_and_padding_that_matter() -> None:
    """The token batch repeats tokens within rows and pads, and the padding row gets no gradient."""
    model, (tokens, _) = CASES["tokens"].model_and_batch(torch.float64)
    assert bool((tokens[:, 1] == tokens[:, 3]).all()) and bool((tokens == 0).any())
    _, _, operator = engine_operator(model, CASES["tokens"].model_and_batch(torch.float64)[1])
    vocab, dim = model.embed.weight.shape
    embedding_columns = operator.dense()[:, :vocab * dim].reshape(-1, vocab, dim)
    assert bool((embedding_columns[:, 0] == 0).all()) and bool((embedding_columns[:, 1:] != 0).any())


def sven_step(case: ModelCase, dtype: torch.dtype, svd_mode: str, microbatch_size: int) -> Tensor:
    """The float64 parameter change of one Sven step on the Gram engine."""
    model, batch = case.model_and_batch(dtype)
    wrapped = SvenWrapper(model, per_sample_squared_error, engine="gram", microbatch_size=microbatch_size)
    optimizer = Sven(wrapped, lr=LR, k=64, rtol=1e-3, svd_mode=svd_mode)
    before = flat_parameters(model)
    wrapped.loss_and_grad(batch)
    optimizer.step()
    assert not optimizer.last_step["skipped"] and optimizer.last_step["svd_mode"] == "gram"
    return flat_parameters(model) - before


def reference_step(case: ModelCase, dtype: torch.dtype, microbatch_size: int) -> Tensor:
    model, batch = case.model_and_batch(dtype)
    residuals, jacobian = reference_residuals_and_jacobian(
        model, per_sample_squared_error, batch, microbatch_size=microbatch_size
    )
    return -LR * reference_direction(jacobian, residuals, k=64, rtol=1e-3)


@pytest.mark.parametrize("microbatch_size", [1, 2, 3], ids=["no_microbatch", "microbatch_2", "ragged_3"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("svd_mode", ["gram", "auto"])
@pytest.mark.parametrize("case_name", ["mlp", "cnn", "tokens", "custom_layer", "shared_weights", "attention",
                                       "decoder_batch_first_norm_first", "encoder_sequence_first_norm_last"])
def test_sven_step_on_the_gram_engine_matches_the_reference(
    case_name: str, svd_mode: str, dtype: torch.dtype, microbatch_size: int
) -> None:
    case = CASES[case_name]
    step = sven_step(case, dtype, svd_mode, microbatch_size)
    assert relative_error(step, reference_step(case, dtype, microbatch_size)) <= STEP_TOLERANCE[dtype]


@pytest.mark.parametrize(
    "tokens, d_in, d_out, ghost",
    [(1, 30, 20, True), (40, 2, 3, False)],
    ids=["ghost_form", "materialised_form"],
)
def test_outer_product_block_takes_each_gram_form_exactly(tokens: int, d_in: int, d_out: int, ghost: bool) -> None:
    """Shapes that force the ghost (T²) form and the materialised per-sample form; both equal J Jᵀ."""
    torch.manual_seed(0)
    model = nn.Linear(d_in, d_out).to(torch.float64)
    batch = (torch.randn(6, tokens, d_in, dtype=torch.float64), torch.randn(6, tokens, d_out, dtype=torch.float64))
    _, _, operator = engine_operator(model, batch)
    (block,) = operator.blocks
    assert isinstance(block, OuterProductBlock) and block.uses_ghost_form == ghost
    _, jacobian = reference_residuals_and_jacobian(model, per_sample_squared_error, batch)
    assert relative_error(operator.gram(), jacobian @ jacobian.T) <= GRAM_TOLERANCE


@pytest.mark.parametrize("d_in, d_out", [(1, 5), (5, 1), (1, 1), (3, 5)],
                         ids=["one_input", "one_output", "one_each", "bmm"])
def test_per_sample_gradients_of_several_tokens_match_the_dense_reference(d_in: int, d_out: int) -> None:
    """Σ_t b_t a_tᵀ per sample (T = 4) by each of flat_per_sample's forms equals the explicit Jacobian."""
    torch.manual_seed(0)
    model = nn.Linear(d_in, d_out).to(torch.float64)
    batch = (torch.randn(6, 4, d_in, dtype=torch.float64), torch.randn(6, 4, d_out, dtype=torch.float64))
    _, _, operator = engine_operator(model, batch)
    _, jacobian = reference_residuals_and_jacobian(model, per_sample_squared_error, batch)
    assert relative_error(operator.dense(), jacobian) <= GRAM_TOLERANCE


class BiasForgettingLinear(nn.Linear):
    """A Linear whose (deliberately wrong) Gram rule returns a block for the weight only."""


@register_gram_rule(BiasForgettingLinear)
def weight_only_blocks(layer: nn.Linear, activations: Tensor, backprops: Tensor) -> list[GradientBlock]:
    return [OuterProductBlock(layer.weight, None, activations[:, None], backprops[:, None])]


def test_a_rule_that_leaves_a_parameter_uncovered_is_an_error_naming_layer_and_parameter() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), BiasForgettingLinear(3, 2)).to(torch.float64)
    wrapped = SvenWrapper(model, per_sample_squared_error, engine="gram")
    batch = (torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))
    expected = r"rule for layer '2' \(BiasForgettingLinear\).*miss parameter\(s\) \['2.bias'\]"
    with pytest.raises(RuntimeError, match=expected):
        wrapped.loss_and_grad(batch)


@pytest.mark.parametrize(
    "case_name, block_type, positions",
    [("shared_weights", OuterProductBlock, 2), ("shared_embedding", EmbeddingBlock, 12)],
)
def test_a_layer_called_twice_stays_one_factored_block(case_name: str, block_type: type, positions: int) -> None:
    """Repeated calls concatenate positions (1 or 6 per call here) instead of materialising per-sample gradients."""
    model, batch = CASES[case_name].model_and_batch(torch.float64)
    _, _, operator = engine_operator(model, batch)
    first_layer = next(model.children())
    (shared,) = [block for block in operator.blocks if block.params[0] is first_layer.weight]
    assert len(operator.blocks) == 2 and isinstance(shared, block_type)
    assert shared.backprops.shape[1] == positions


def mlp_operator(batch_size: int, duplicated: bool = False) -> tuple[GramJacobian, Tensor, Tensor]:
    """(operator, residuals r, reference J) for the per-sample losses of a 5-16-3 MLP (P = 147)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(torch.float64)
    generator = torch.Generator().manual_seed(3)
    distinct = batch_size // 2 if duplicated else batch_size
    x = torch.randn(distinct, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(distinct, 3, generator=generator, dtype=torch.float64)
    batch = (torch.cat([x, x]), torch.cat([y, y])) if duplicated else (x, y)
    _, losses, operator = engine_operator(model, batch)
    _, jacobian = reference_residuals_and_jacobian(model, per_sample_squared_error, batch)
    return operator, losses, jacobian


@pytest.mark.parametrize(
    "batch_size, k, rtol, duplicated, certified",
    [
        (12, 12, 1e-3, False, True),  # well conditioned, k ≥ rows: Cholesky, no eigh
        (12, 64, 0.0, False, True),  # rtol 0: the cut is the Gram route's floor
        (12, 11, 1e-3, False, False),  # k < rows: the top k need eigh
        (12, 64, 0.3, False, False),  # rtol cuts some σ: certification must fail
        (12, 64, 1e-3, True, False),  # duplicated samples: rank 6 of 12
    ],
    ids=["certified", "rtol_zero", "k_below_rows", "rtol_cuts", "rank_deficient"],
)
def test_gram_route_certifies_only_when_nothing_is_cut(
    batch_size: int, k: int, rtol: float, duplicated: bool, certified: bool
) -> None:
    operator, residuals, jacobian = mlp_operator(batch_size, duplicated)
    sigma = torch.linalg.svdvals(jacobian)
    spectrum = truncated_spectrum(operator, "gram", k, rtol)
    assert isinstance(spectrum, CertifiedGramSpectrum) == certified
    assert certified == (k >= batch_size and bool(sigma[-1] > max(rtol, 1e-7) * sigma[0]))
    direction = spectrum.direction(operator, residuals)
    assert relative_error(direction, reference_direction(jacobian, residuals, k, rtol)) <= 1e-9
    assert spectrum.rank_kept == min(k, int((sigma > max(rtol, 1e-7) * sigma[0]).sum()))
    assert relative_error(spectrum.sigma, sigma[: spectrum.rank_kept]) <= 1e-10


@pytest.mark.parametrize("damping_over_smallest_eigenvalue, direct_size, factorisations",
                         [(0.0, 0, 0), (1e-3, 0, 0), (1e3, 0, 1), (0.0, 128, 0), (1e-3, 128, 1)],
                         ids=["refined", "small_damping_refined", "large_damping_factorised", "small_undamped_refined",
                              "small_damped_factorised"])
def test_certified_route_solves_the_damped_system_exactly(
    damping_over_smallest_eigenvalue: float, direct_size: int, factorisations: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Cholesky route gives V diag(σ/(σ² + λ)) Uᵀ r: by refinement on the certificate's factor while
    that contracts, else (λ far above the smallest eigenvalue, or a damped side of at most DIRECT_SOLVE_SIZE)
    by factorising M Mᵀ + λI."""
    monkeypatch.setattr(spectrum_module, "DIRECT_SOLVE_SIZE", direct_size)
    operator, residuals, jacobian = mlp_operator(12)
    spectrum = truncated_spectrum(operator, "gram", 64, 1e-3)
    assert isinstance(spectrum, CertifiedGramSpectrum)
    u, sigma, vh = torch.linalg.svd(jacobian, full_matrices=False)
    damping = damping_over_smallest_eigenvalue * float(sigma[-1]) ** 2
    expected = vh.T @ (sigma / (sigma**2 + damping) * (u.T @ residuals))
    calls = []
    cholesky = torch.linalg.cholesky
    monkeypatch.setattr(torch.linalg, "cholesky", lambda matrix: calls.append(1) or cholesky(matrix))
    assert relative_error(spectrum.direction(operator, residuals, damping), expected) <= 1e-10
    assert len(calls) == factorisations


def test_certified_route_factorises_at_once_when_refinement_cannot_reach_the_tolerance(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """λ ≥ REFINEMENT_REACH·min_i L_ii² bounds the contraction λ/λ_min(G) from below by REFINEMENT_REACH: the
    solve factorises G + λI and solves once, with no refinement (which would run MAX_REFINEMENTS corrections
    in vain), and still gives the damped step of the dense SVD."""
    monkeypatch.setattr(spectrum_module, "DIRECT_SOLVE_SIZE", 0)
    operator, residuals, jacobian = mlp_operator(12)
    spectrum = truncated_spectrum(operator, "gram", 64, 1e-3)
    assert isinstance(spectrum, CertifiedGramSpectrum)
    damping = 2 * REFINEMENT_REACH * spectrum.smallest_pivot
    u, sigma, vh = torch.linalg.svd(jacobian, full_matrices=False)
    expected = vh.T @ (sigma / (sigma**2 + damping) * (u.T @ residuals))
    solves = []
    cholesky_solve = torch.cholesky_solve
    monkeypatch.setattr(torch, "cholesky_solve", lambda *args: solves.append(1) or cholesky_solve(*args))
    assert not spectrum.refinement_pays(damping)
    assert relative_error(spectrum.direction(operator, residuals, damping), expected) <= 1e-10
    assert len(solves) == 1


@pytest.mark.parametrize("ratio", [0.999, 0.9, 0.5, 1e-3])
def test_certificate_never_accepts_a_spectrum_with_a_value_below_the_cut(ratio: float) -> None:
    """Gram matrices whose smallest σ is ratio·(cut) < cut: the certificate must always refuse."""
    rtol = 1e-3
    generator = torch.Generator().manual_seed(4)
    for size in (2, 16, 64):
        q = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64)).Q
        sigma = torch.logspace(0, -2, size, dtype=torch.float64)
        sigma[-1] = ratio * rtol
        assert certify_nothing_cut(q @ torch.diag(sigma**2) @ q.T, rtol) is None
        sigma[-1] = 4 * rtol
        assert certify_nothing_cut(q @ torch.diag(sigma**2) @ q.T, rtol) is not None


@pytest.mark.small_jacobian
@pytest.mark.parametrize("options", [dict(lr=0.5, k=64, rtol=1e-3), dict(lr=1.0, k=6, damping="adaptive"),
                                     dict(lr=0.5, weight_decay=1e-2), dict(lr=0.5, line_search=True)],
                         ids=["exact", "adaptive_top_k", "weight_decay", "line_search"])
def test_small_m_takes_the_factored_operators_steps(options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three steps with M held (B·P = 12·147 ≤ SMALL_JACOBIAN_ELEMENTS) and with the factored operator, from the
    same start on the same batches: the same parameters to round-off."""
    batches = [make_batch(12, 5, 3, seed=seed) for seed in range(3)]

    def trained() -> Tensor:
        model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(torch.float64)
        model.load_state_dict(start)
        held = engine_operator(model, batches[0])[2].small_dense is not None
        assert held == (gram_module.SMALL_JACOBIAN_ELEMENTS > 0)
        optimizer = Sven(SvenWrapper(model, per_sample_squared_error), **options)
        for batch in batches:
            optimizer.step(batch)
        return flat_parameters(model)

    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(torch.float64).state_dict()
    small = trained()
    monkeypatch.setattr(gram_module, "SMALL_JACOBIAN_ELEMENTS", 0)
    assert relative_error(small, trained()) <= 1e-12


@pytest.mark.small_jacobian
def test_m_is_held_only_up_to_small_jacobian_elements() -> None:
    """B·P above the bound: the operator never forms M (the factored Gram, Mᵀu and finite check)."""
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(torch.float64)
    rows = gram_module.SMALL_JACOBIAN_ELEMENTS // 147
    _, _, held = engine_operator(model, make_batch(rows, 5, 3))
    _, _, factored = engine_operator(model, make_batch(rows + 1, 5, 3))
    assert held.small_dense is not None and factored.small_dense is None and factored.all_rows_finite()
