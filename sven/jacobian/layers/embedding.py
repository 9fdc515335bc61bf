"""nn.Embedding (dense gradients, no max_norm): a one-hot Linear kept as token indices."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from sven.jacobian.blocks import GradientBlock
from sven.jacobian.layers.registry import register_gram_rule

PAIR_COST = 64
"""Measured cost of one multiply-add of the pair form (gathered rows) in units of one of the dense form's
float64 matrix product (``docs/GRAM_ENGINE.md``, "A small GPT"); the cheaper form is taken."""
CHUNK_NUMEL = 1 << 22
"""Most float64 entries either form holds at once (dense columns, or gathered pair rows)."""


class EmbeddingBlock(GradientBlock):
    """g_i = Σ_t e_{idx_it} b_itᵀ for token indices (B, T) and backprops (B, T, dim).

    The Gram matrix comes from the U distinct (sample, token) pairs and their summed backprops
    r_u (U, dim): ⟨g_i, g_j⟩ = Σ over pairs u of i, v of j with the same token of r_u·r_v. It takes the
    cheaper of two exact forms for the W distinct tokens of the batch, token v in n_v samples:
    the dense per-sample gradients restricted to those tokens (B, W·dim) and their matrix product,
    cost B²·W·dim, or the dot products of the Σ_v n_v² pairs sharing a token, cost Σ_v n_v²·dim at
    ``PAIR_COST`` times the price (gathers). Memory stays within ``CHUNK_NUMEL``, never B·V·dim.
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
        """(sample, token, summed backprop (U, dim) float64) for the U distinct (sample, token) pairs."""
        batch, tokens = self.indices.shape
        vocab = self.weight.shape[0]
        codes, inverse = torch.unique(self._sample_token_codes(), return_inverse=True)
        rows = torch.zeros(codes.numel(), self.weight.shape[1], dtype=torch.float64, device=self.indices.device)
        rows.index_add_(0, inverse, self.backprops.reshape(batch * tokens, -1).to(torch.float64))
        return codes // vocab, codes % vocab, rows

    def gram(self) -> Tensor:
        return self._gram(*self._sample_token_rows())

    def entrywise_entries(self, keep: Sequence[Tensor]) -> int:
        """0: ``masked_gram`` zeroes the unkept columns of the pair rows and costs what ``gram()`` does."""
        return 0

    def masked_gram(self, keep: Sequence[Tensor]) -> Tensor:
        """The Gram of the pair rows with the entries of unkept columns set to zero."""
        samples, tokens, rows = self._sample_token_rows()
        return self._gram(samples, tokens, rows * keep[0].view(self.weight.shape)[tokens])

    def _gram(self, samples: Tensor, tokens: Tensor, rows: Tensor) -> Tensor:
        """(B, B) float64 from the pairs' samples (U,), tokens (U,) and rows (U, dim), by the cheaper form."""
        batch = self.indices.shape[0]
        columns = torch.unique(tokens, return_inverse=True)[1]
        counts = torch.bincount(columns)
        if PAIR_COST * int((counts * counts).sum()) < batch * batch * counts.numel():
            return _pair_gram(samples, columns, counts, rows, batch)
        return sum(dense @ dense.T for _, dense in _dense_chunks(samples, tokens, rows, batch))

    def sample_dots(self, values: Sequence[Tensor]) -> Tensor:
        """Σ_t b_itᵀ V[idx_it] per sample."""
        return self.sample_dots_many([values[0][None]])[:, 0]

    def sample_dots_many(self, values: Sequence[Tensor]) -> Tensor:
        """Σ_t b_itᵀ V_k[idx_it] for V (K, vocab, dim): the dense per-sample gradients on the batch's tokens
        against V's rows for them, a group of tokens at a time."""
        batch = self.indices.shape[0]
        dots = torch.zeros(batch, values[0].shape[0], dtype=torch.float64, device=self.indices.device)
        for used, dense in _dense_chunks(*self._sample_token_rows(), batch):
            dots += dense @ values[0][:, used].reshape(values[0].shape[0], -1).to(torch.float64).T
        return dots

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


def _dense_chunks(samples: Tensor, tokens: Tensor, rows: Tensor, batch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """For groups of the batch's distinct tokens: (the group's tokens (w,), the per-sample gradients on them
    (B, w·dim) float64), from the pairs' samples (U,), tokens (U,) and rows (U, dim); ≤ CHUNK_NUMEL entries each."""
    used, columns = torch.unique(tokens, return_inverse=True)
    dim = rows.shape[1]
    group = max(1, CHUNK_NUMEL // (batch * dim))
    for start in range(0, used.numel(), group):
        inside = (columns >= start) & (columns < start + group)
        dense = torch.zeros(batch, min(group, used.numel() - start), dim, dtype=torch.float64, device=rows.device)
        dense[samples[inside], columns[inside] - start] = rows[inside]
        yield used[start:start + group], dense.view(batch, -1)


def _pair_gram(samples: Tensor, columns: Tensor, counts: Tensor, rows: Tensor, batch: int) -> Tensor:
    """Σ of r_u·r_v into entry (sample_u, sample_v) over every ordered pair (u, v) of rows of one token;
    ``counts`` (W,) the rows per distinct token."""
    order = torch.argsort(columns, stable=True)
    sizes = counts[columns[order]]  # of each sorted row's token group
    group_starts = (torch.cumsum(counts, 0) - counts)[columns[order]]
    left = torch.repeat_interleave(torch.arange(order.numel(), device=rows.device), sizes)
    within = torch.arange(left.numel(), device=rows.device) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes,
                                                                                       sizes)
    left, right = order[left], order[group_starts[left] + within]
    gram = torch.zeros(batch * batch, dtype=torch.float64, device=rows.device)
    for chunk in torch.arange(left.numel(), device=rows.device).split(max(1, CHUNK_NUMEL // rows.shape[1])):
        u, v = left[chunk], right[chunk]
        gram.index_add_(0, samples[u] * batch + samples[v], (rows[u] * rows[v]).sum(dim=1))
    return gram.view(batch, batch)


def _supported(layer: nn.Embedding) -> bool:
    return layer.max_norm is None and not layer.sparse and not layer.scale_grad_by_freq


@register_gram_rule(nn.Embedding, supports=_supported)
def embedding_blocks(layer: nn.Embedding, activations: Tensor, backprops: Tensor) -> list[GradientBlock]:
    if layer.padding_idx is not None:
        backprops = backprops * (activations != layer.padding_idx).unsqueeze(-1).to(backprops.dtype)
    return [EmbeddingBlock(layer.weight, activations, backprops)]
