"""nn.MultiheadAttention (no bias_k / bias_v, no add_zero_attn): its projections as Linear layers.

The rule recomputes the attention from the recorded call with the q, k, v projections as
leaves; one backward of the output backprops through ``out_proj`` and the attention gives
their per-sample backprops (samples stay independent along the batch dim). Then the input
projection is a Linear over the query, key and value tokens, and ``out_proj`` a Linear
over the attention output.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sven.jacobian.blocks import GradientBlock, MaterializedBlock, OuterProductBlock
from sven.jacobian.layers.registry import register_gram_rule

_FORWARD = inspect.signature(nn.MultiheadAttention.forward)


def children_batch_dim(module: nn.Module, batch_dim: int) -> int:
    """The dim of the batch in the tensors ``module`` passes to its children, ``batch_dim`` where it is
    outside: 1 inside the nn.Transformer* modules built with batch_first=False (their Linear and
    LayerNorm layers see (T, B, d)), 0 inside those with batch_first=True."""
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return 0 if module.self_attn.batch_first else 1
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return 0 if module.layers[0].self_attn.batch_first else 1
    if isinstance(module, nn.Transformer):
        return 0 if module.batch_first else 1
    return batch_dim


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = not attended) as 0 / -inf, or a float mask as it is, in ``dtype``."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _projection_weights(layer: nn.MultiheadAttention) -> tuple[Tensor, Tensor, Tensor]:
    """The q, k, v projection weights (E, d_q), (E, d_k), (E, d_v): views of in_proj_weight when packed."""
    if layer._qkv_same_embed_dim:
        return layer.in_proj_weight.chunk(3)
    return layer.q_proj_weight, layer.k_proj_weight, layer.v_proj_weight


def _attention(layer: nn.MultiheadAttention, q: Tensor, k: Tensor, v: Tensor, call: dict[str, Any]) -> Tensor:
    """softmax(q kᵀ/√d + mask) v per head as ``layer`` computes it, before ``out_proj``.

    q (N, L, E), k and v (N, S, E) projected; ``call`` the bound arguments of the forward.
    Returns (N, L, E).
    """
    batch, target, embed = q.shape
    attn_mask, padding = call["attn_mask"], call["key_padding_mask"]
    causal = call["is_causal"] and padding is None and not call["need_weights"]
    mask = None
    if attn_mask is not None and not causal:
        mask = _additive(attn_mask, q.dtype)
        mask = mask.reshape(batch, layer.num_heads, target, -1) if mask.dim() == 3 else mask
    if padding is not None:
        padding = _additive(padding, q.dtype).view(batch, 1, 1, -1)
        mask = padding if mask is None else mask + padding
    heads = [t.view(batch, t.shape[1], layer.num_heads, -1).transpose(1, 2) for t in (q, k, v)]
    attended = F.scaled_dot_product_attention(*heads, attn_mask=mask, is_causal=causal)
    return attended.transpose(1, 2).reshape(batch, target, embed)


def _input_projection_blocks(
    layer: nn.MultiheadAttention, inputs: list[Tensor], grads: list[Tensor]
) -> list[GradientBlock]:
    """Blocks of the q, k, v projections for inputs (N, T_r, d_r) and backprops (N, T_r, E), r = q, k, v.

    Packed weights (3E, E): one Linear whose tokens are the distinct inputs (a tensor passed
    as query and key counts once), each with its backprops in the rows of its roles, zero elsewhere.
    """
    if not layer._qkv_same_embed_dim:
        blocks: list[GradientBlock] = [
            OuterProductBlock(w, None, x, g) for w, x, g in zip(_projection_weights(layer), inputs, grads)
        ]
        if layer.in_proj_bias is not None:
            blocks.append(MaterializedBlock((layer.in_proj_bias,), [torch.cat([g.sum(dim=1) for g in grads], 1)]))
        return blocks
    distinct = [x for i, x in enumerate(inputs) if all(x is not seen for seen in inputs[:i])]
    rows = [
        torch.cat([g if source is x else g.new_zeros(*x.shape[:2], g.shape[2]) for source, g in zip(inputs, grads)], 2)
        for x in distinct
    ]
    return [OuterProductBlock(layer.in_proj_weight, layer.in_proj_bias, torch.cat(distinct, 1), torch.cat(rows, 1))]


def _supported(layer: nn.MultiheadAttention) -> bool:
    return layer.bias_k is None and not layer.add_zero_attn


@register_gram_rule(nn.MultiheadAttention, supports=_supported, all_inputs=True)
def attention_blocks(
    layer: nn.MultiheadAttention, inputs: tuple[tuple, dict[str, Any]], backprops: Tensor
) -> list[GradientBlock]:
    """Input projection and ``out_proj`` blocks from the call's (args, kwargs) and the output backprops."""
    args, kwargs = inputs
    bound = _FORWARD.bind(layer, *args, **kwargs)
    bound.apply_defaults()
    call = bound.arguments
    if call["query"].dim() != 3:
        raise ValueError("Sven's Gram rule for nn.MultiheadAttention needs batched inputs (3-D query, key, value)")
    if layer.training and layer.dropout > 0:
        raise ValueError(
            f"nn.MultiheadAttention(dropout={layer.dropout}) in train mode draws attention dropout masks that "
            "the Gram engine cannot replay; set its dropout to 0, call model.eval(), or use engine='functorch'"
        )
    batch_major = (lambda t: t) if layer.batch_first else (lambda t: t.transpose(0, 1))
    originals = [call[name] for name in ("query", "key", "value")]
    transposed = {id(x): batch_major(x) for x in originals}
    tokens = [transposed[id(x)] for x in originals]  # "query is key" stays true after the transpose
    biases = (None,) * 3 if layer.in_proj_bias is None else layer.in_proj_bias.chunk(3)
    with torch.no_grad():
        projected = [
            F.linear(x, w, b).requires_grad_() for x, w, b in zip(tokens, _projection_weights(layer), biases)
        ]
    out_grads = batch_major(backprops)
    with torch.enable_grad():
        attended = _attention(layer, *projected, call)
        grads = torch.autograd.grad(attended, projected, out_grads @ layer.out_proj.weight.detach())
    out_proj = OuterProductBlock(layer.out_proj.weight, layer.out_proj.bias, attended.detach(), out_grads)
    return [*_input_projection_blocks(layer, tokens, list(grads)), out_proj]
