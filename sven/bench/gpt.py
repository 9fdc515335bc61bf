"""A small GPT for the step-cost benchmark and the tests: token + position Embedding, causal
self-attention blocks, a final LayerNorm and an LM head; per-token cross-entropy averaged per sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalBlock(nn.Module):
    """A pre-norm block written by hand: x + attn(LN(x)), then x + MLP(LN(x)); (B, T, d) → (B, T, d)."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device, dtype=x.dtype)
        h = self.norm1(x)
        x = x + self.attention(h, h, h, attn_mask=mask, is_causal=True, need_weights=False)[0]
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyGPT(nn.Module):
    """Tokens (B, T) → logits (B, T, vocab) through ``layers`` causal blocks of width ``dim``.

    ``block="torch"``: nn.TransformerEncoderLayer (norm_first, causal mask, dropout 0);
    ``block="custom"``: ``CausalBlock``. ``tied``: the LM head's weight is the token Embedding's.
    """

    def __init__(self, vocab: int = 64, context: int = 32, dim: int = 64, heads: int = 4, hidden: int = 256,
                 layers: int = 2, block: str = "torch", tied: bool = False) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(context, dim)
        if block == "torch":
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(dim, heads, hidden, dropout=0.0, batch_first=True, norm_first=True)
                for _ in range(layers)
            )
        else:
            self.blocks = nn.ModuleList(CausalBlock(dim, heads, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        if tied:
            self.head.weight = self.tokens.weight

    def forward(self, tokens: Tensor) -> Tensor:
        batch, length = tokens.shape
        positions = torch.arange(length, device=tokens.device).expand(batch, length)
        x = self.tokens(tokens) + self.positions(positions)
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x) if isinstance(block, CausalBlock) else block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


def per_sample_token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token cross-entropy averaged per sample: logits (B, T, vocab), targets (B, T) → (B,)."""
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)
