"""A small GPT (token + position Embedding, causal attention blocks, an untied or tied LM head, per-token
cross-entropy averaged per sample) on the Gram engine against the dense float64 reference, and both Gram
forms of the Embedding."""

from __future__ import annotations

import pytest
import torch
from conftest import STEP_TOLERANCE, flat_parameters
from reference import reference_direction, reference_residuals_and_jacobian, relative_error
from torch import Tensor

from sven.bench.gpt import TinyGPT, per_sample_token_cross_entropy
from sven.jacobian import GramEngine, ParamSpace
from sven.jacobian.layers import embedding
from sven.jacobian.layers.embedding import EmbeddingBlock
from sven.jacobian.shared import SharedParameterBlock
from sven.nn import SvenWrapper
from sven.opt import Sven

GRAM_TOLERANCE = 1e-10
LR = 0.5


def tiny_gpt(block: str, dtype: torch.dtype, tied: bool = False) -> tuple[TinyGPT, tuple[Tensor, Tensor]]:
    """Vocabulary 7, context 5, width 8, two blocks; B = 6 sequences of 5 tokens and their next tokens."""
    torch.manual_seed(0)
    model = TinyGPT(vocab=7, context=5, dim=8, heads=2, hidden=12, layers=2, block=block, tied=tied).to(dtype)
    tokens = torch.randint(0, 7, (6, 6), generator=torch.Generator().manual_seed(1))
    return model, (tokens[:, :-1], tokens[:, 1:])


@pytest.fixture(params=["dense", "pairs"])
def embedding_form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Forces the Embedding's dense form (pairs priced out) or its pair form (priced at nothing)."""
    monkeypatch.setattr(embedding, "PAIR_COST", 10**9 if request.param == "dense" else 0)
    return request.param


@pytest.mark.parametrize("block, tied", [("torch", False), ("custom", False), ("torch", True)],
                         ids=["torch", "custom", "torch_tied_head"])
def test_gpt_operator_matches_the_dense_reference(block: str, tied: bool, embedding_form: str) -> None:
    model, batch = tiny_gpt(block, torch.float64, tied)
    engine = GramEngine(model, ParamSpace.of_module(model))
    losses, _, operator = engine.compute(per_sample_token_cross_entropy, batch)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_token_cross_entropy, batch)
    assert engine.plan()["fallback_parameters"] == []
    assert relative_error(losses, residuals) <= 1e-14
    assert relative_error(operator.gram(), jacobian @ jacobian.T) <= GRAM_TOLERANCE
    coeffs = torch.randn(jacobian.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert relative_error(operator.rmatmul(coeffs), jacobian.T @ coeffs) <= GRAM_TOLERANCE
    assert relative_error(operator.dense(), jacobian) <= GRAM_TOLERANCE
    vector = torch.randn(jacobian.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert relative_error(operator.matmul(vector), jacobian @ vector) <= GRAM_TOLERANCE
    assert tied == any(isinstance(block, SharedParameterBlock) for block in operator.blocks)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("block, tied", [("torch", False), ("custom", False), ("custom", True)],
                         ids=["torch", "custom", "custom_tied_head"])
def test_gpt_step_matches_the_reference(block: str, tied: bool, dtype: torch.dtype) -> None:
    model, batch = tiny_gpt(block, dtype, tied)
    residuals, jacobian = reference_residuals_and_jacobian(model, per_sample_token_cross_entropy, batch)
    wrapped = SvenWrapper(model, per_sample_token_cross_entropy, engine="gram")
    optimizer = Sven(wrapped, lr=LR, k=64, rtol=1e-3, svd_mode="gram")
    before = flat_parameters(model)
    wrapped.loss_and_grad(batch)
    optimizer.step()
    expected = -LR * reference_direction(jacobian, residuals, k=64, rtol=1e-3)
    assert relative_error(flat_parameters(model) - before, expected) <= STEP_TOLERANCE[dtype]


@pytest.mark.parametrize("chunk_numel", [1, 1 << 22], ids=["a_token_at_a_time", "one_chunk"])
def test_embedding_block_forms_give_the_gram_masked_gram_and_dots(
    embedding_form: str, chunk_numel: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repeated tokens within and across samples; the masked Gram keeps a random half of the entries."""
    monkeypatch.setattr(embedding, "CHUNK_NUMEL", chunk_numel)
    generator = torch.Generator().manual_seed(0)
    vocab, dim = 9, 3
    indices = torch.randint(0, vocab, (5, 7), generator=generator)
    backprops = torch.randn(5, 7, dim, dtype=torch.float64, generator=generator)
    block = EmbeddingBlock(torch.zeros(vocab, dim, dtype=torch.float64), indices, backprops)
    (grads,) = block.per_sample()
    flat = grads.reshape(5, -1)
    keep = torch.rand(vocab * dim, generator=generator) < 0.5
    vectors = torch.randn(4, vocab, dim, dtype=torch.float64, generator=generator)
    assert relative_error(block.gram(), flat @ flat.T) <= 1e-14
    assert relative_error(block.masked_gram([keep]), flat[:, keep] @ flat[:, keep].T) <= 1e-14
    assert relative_error(block.sample_dots_many([vectors]), flat @ vectors.reshape(4, -1).T) <= 1e-14
    assert relative_error(block.sample_dots([vectors[0]]), flat @ vectors[0].reshape(-1)) <= 1e-14
