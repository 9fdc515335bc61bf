"""nn.Embedding (dense gradients, no max_norm): a one-hot Linear kept as token indices."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sven.jacobian.blocks import GradientBlock
from sven.jacobian.layers.registry import register_gram_rule


class EmbeddingBlock(GradientBlock):
    """g_i = Σ_t e_{idx_it} b_itᵀ for token indices (B, T) and backprops (B, T, dim).

    The Gram matrix is S Sᵀ for the sparse (B, V·dim) matrix S whose row i holds
    sample i's gradient rows, aggregated over repeated tokens: memory grows with
    the number of distinct (sample, token) pairs, never with B·V·dim.
    """

    def __init__(self, weight: Tensor, indices: Tensor, backprops: Tensor) -> None:
        self.weight = weight
        self.params = (weight,)
        self.indices = indices.reshape(indices.shape[0], -1)
        self.backprops = backprops.reshape(*self.indices.shape, weight.shape[1])

    def _sample_token_codes(self) -> Tensor:
        """sample · V + token for every position, flattened (B·T,): the row of (B·V, dim) it writes."""
        batch, tokens = self.indices.shape
        samples = torch.arange(batch, device=self.indices.device).repeat_interleave(tokens)
        return samples * self.weight.shape[0] + self.indices.reshape(-1)

    def _sample_token_rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """(sample, token, summed backprop (U, dim)) for the U distinct (sample, token) pairs."""
        batch, tokens = self.indices.shape
        vocab = self.weight.shape[0]
        codes, inverse = torch.unique(self._sample_token_codes(), return_inverse=True)
        rows = torch.zeros(codes.numel(), self.weight.shape[1], dtype=torch.float64, device=self.indices.device)
        rows.index_add_(0, inverse, self.backprops.reshape(batch * tokens, -1).to(torch.float64))
        return codes // vocab, codes % vocab, rows

    def _sparse_gradients(self) -> Tensor:
        """The per-sample gradients as a coalesced sparse (B, V·dim) float64 matrix."""
        batch = self.indices.shape[0]
        vocab, dim = self.weight.shape
        samples, tokens, rows = self._sample_token_rows()
        columns = (tokens[:, None] * dim + torch.arange(dim, device=rows.device)).reshape(-1)
        return torch.sparse_coo_tensor(
            torch.stack([samples.repeat_interleave(dim), columns]), rows.reshape(-1), (batch, vocab * dim),
            check_invariants=False,
        ).coalesce()

    def gram(self) -> Tensor:
        sparse = self._sparse_gradients()
        return torch.sparse.mm(sparse, sparse.t()).to_dense()

    def masked_gram(self, keep: Sequence[Tensor]) -> Tensor:
        """The sparse product over the nonzero entries whose column is kept."""
        sparse = self._sparse_gradients()
        kept = keep[0][sparse.indices()[1]]
        masked = torch.sparse_coo_tensor(sparse.indices()[:, kept], sparse.values()[kept], sparse.shape,
                                         check_invariants=False).coalesce()
        return torch.sparse.mm(masked, masked.t()).to_dense()

    def sample_dots(self, values: Sequence[Tensor]) -> Tensor:
        """Σ_t b_itᵀ V[idx_it] per sample."""
        rows = values[0].to(self.backprops.dtype)[self.indices]
        return (rows * self.backprops).sum(dim=(1, 2)).to(torch.float64)

    def weighted_sum(self, coeffs: Tensor) -> list[Tensor]:
        batch, tokens = self.indices.shape
        weighted = self.backprops * coeffs.to(self.backprops.dtype).view(batch, 1, 1)
        total = torch.zeros_like(self.weight)
        total.index_add_(0, self.indices.reshape(-1), weighted.reshape(batch * tokens, -1))
        return [total]

    @classmethod
    def summed(cls, blocks: list[GradientBlock]) -> GradientBlock:
        """Repeated calls of one embedding are more tokens: concatenate them along dim 1."""
        return cls(
            blocks[0].weight,
            torch.cat([b.indices for b in blocks], dim=1), torch.cat([b.backprops for b in blocks], dim=1),
        )

    def per_sample(self) -> list[Tensor]:
        batch, tokens = self.indices.shape
        vocab, dim = self.weight.shape
        grads = torch.zeros(batch * vocab, dim, dtype=self.weight.dtype, device=self.weight.device)
        grads.index_add_(0, self._sample_token_codes(), self.backprops.reshape(batch * tokens, dim))
        return [grads.view(batch, vocab, dim)]

    def sample_factors(self) -> tuple[Tensor, ...]:
        """(token indices (B, T), backprops (B, T, dim))."""
        return self.indices, self.backprops

    def with_sample_factors(self, factors: Sequence[Tensor]) -> GradientBlock:
        indices, backprops = factors
        return EmbeddingBlock(self.weight, indices, backprops)


def _supported(layer: nn.Embedding) -> bool:
    return layer.max_norm is None and not layer.sparse and not layer.scale_grad_by_freq


@register_gram_rule(nn.Embedding, supports=_supported)
def embedding_blocks(layer: nn.Embedding, activations: Tensor, backprops: Tensor) -> list[GradientBlock]:
    if layer.padding_idx is not None:
        backprops = backprops * (activations != layer.padding_idx).unsqueeze(-1).to(backprops.dtype)
    return [EmbeddingBlock(layer.weight, activations, backprops)]
