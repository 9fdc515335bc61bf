"""The Gram ("ghost") engine: J Jᵀ and Jᵀc from layer activations and backprops.

One batched forward with hooks keeps each hooked layer's input; one
``autograd.grad`` of Σ_i l_i with respect to zero "probes" added to the layers'
outputs gives every layer's per-sample output gradients (row i depends on
sample i only, since samples do not interact). No parameter gradient is
computed and no (B, P) tensor is formed: each layer's share of J stays in
factored form (``sven.jacobian.blocks``). Layers without a registered rule are
handled exactly by the functorch engine, restricted to their parameters, in
chunks of at most ``chunk_numel`` per-sample gradient entries (``sven.jacobian.fallback``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_leaves, tree_map_only

from sven.cost import entrywise_gram_cost, warn_cost
from sven.jacobian.blocks import GradientBlock
from sven.jacobian.checks import all_finite, check_no_batch_coupling, check_per_sample_losses
from sven.jacobian.fallback import RecomputedBlock
from sven.jacobian.functorch_engine import LossFn
from sven.jacobian.layers import children_batch_dim, rule_for
from sven.jacobian.layers.registry import GramRule
from sven.jacobian.operator import JacobianOperator
from sven.jacobian.params import ParamSpace
from sven.jacobian.shared import merge_shared

SMALL_JACOBIAN_ELEMENTS = 2**15
"""rows·cols up to which the Gram engine's operator holds M itself in float64 (256 KiB at most): there one
matmul (M Mᵀ), one sum (the finite check) and one matvec (Mᵀ u) replace a few small operations per layer
(docs/GRAM_ENGINE.md, "Small models")."""
GRAM_ROW_BLOCK_ELEMENTS = 2**22
"""float64 elements of one row block (rows × B) of a layer's Gram share while M Mᵀ is assembled (32 MiB):
up to B = 2048 the whole share is one block."""


@dataclass
class _Call:
    inputs: Any  # what the rule reads (``GramRule.inputs``), detached
    versions: tuple[int, ...]  # of the tensors in ``inputs``, when recorded
    probe: Tensor  # added to the output (its first element if a tuple)
    side_probes: tuple[Tensor, ...]  # added to the other outputs that require grad: their backprops must vanish


@dataclass
class _HookedLayer:
    name: str
    module: nn.Module
    rule: GramRule
    params: tuple[Tensor, ...]
    """The trainable parameters under ``module`` (its own and its children's): what the rule must cover."""
    batch_dim: int  # where the samples are in its first input and output (its rule gets them on dim 0)
    calls: list[_Call] = field(default_factory=list)


class GramJacobian(JacobianOperator):
    """The per-sample loss Jacobian (B, P) held as per-layer gradient blocks.

    Every parameter of ``params`` is covered by exactly one block, or listed in
    ``zero_params`` (parameters of layers that did not run: their gradients are zero).
    """

    def __init__(self, blocks: list[GradientBlock], params: ParamSpace, batch_size: int,
                 zero_params: tuple[Tensor, ...] = ()) -> None:
        self.blocks = blocks
        self.params = params
        self.zero_params = zero_params
        self.shape = (batch_size, params.size)
        self.dtype = params.tensors[0].dtype
        self.device = params.tensors[0].device
        self._position = {id(p): i for i, p in enumerate(params.tensors)}
        _check_coverage(blocks, params, zero_params)

    @cached_property
    def small_dense(self) -> Tensor | None:
        """M (rows, cols) in float64 when rows·cols ≤ ``SMALL_JACOBIAN_ELEMENTS``, else None (M is never formed)."""
        rows, cols = self.shape
        return self.dense().to(torch.float64) if rows * cols <= SMALL_JACOBIAN_ELEMENTS else None

    def _compute_gram(self) -> Tensor:
        """Σ of the blocks' shares, each added ``GRAM_ROW_BLOCK_ELEMENTS // B`` rows at a time (``add_gram``);
        M Mᵀ itself for a ``small_dense`` M."""
        if self.small_dense is not None:
            return self.small_dense @ self.small_dense.T
        batch = self.shape[0]
        gram = torch.zeros(batch, batch, dtype=torch.float64, device=self.device)
        for block in self.blocks:
            block.add_gram(gram, max(1, GRAM_ROW_BLOCK_ELEMENTS // batch))
        return gram

    def gram_matmul(self, u: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """M (Mᵀ u), float64, as Σ of the blocks' ``gram_matmul`` in ``dtype``: no (B, B) and no (B, P) tensor."""
        product = torch.zeros(u.shape, dtype=torch.float64, device=self.device)
        for block in self.blocks:
            product += block.gram_matmul(u, dtype)
        return product

    def _assemble(self, per_block: list[list[Tensor]], leading: tuple[int, ...]) -> Tensor:
        pieces: list[Tensor | None] = [None] * len(self.params.tensors)
        for block, tensors in zip(self.blocks, per_block):
            for param, tensor in zip(block.params, tensors):
                pieces[self._position[id(param)]] = tensor
        filled = [
            torch.zeros(*leading, *p.shape, dtype=self.dtype, device=self.device) if t is None else t
            for t, p in zip(pieces, self.params.tensors)
        ]
        return self.params.flatten(filled, leading=leading)

    def nonfinite_rows(self) -> Tensor:
        """Rows with a NaN or Inf among their blocks' sample factors (the Gram diagonal once it is formed)."""
        if "_cached_gram" in self.__dict__:
            return super().nonfinite_rows()
        return ~torch.isfinite(torch.stack([block.sample_sums() for block in self.blocks])).all(dim=0)

    def all_rows_finite(self) -> bool:
        """One sum per factor of every block and one sync (``GradientBlock.factor_totals``); the rows are
        examined only when that total is not finite."""
        if "_cached_gram" in self.__dict__:
            return super().all_rows_finite()
        if self.small_dense is not None:
            return all_finite(self.small_dense) or super().all_rows_finite()
        totals = torch.stack([total for block in self.blocks for total in block.factor_totals()])
        return math.isfinite(float(totals.sum())) or super().all_rows_finite()

    def masked_gram(self, columns: Tensor) -> Tensor:
        """Σ of the blocks' Gram shares over the chosen columns (``GradientBlock.masked_gram``), never forming M.

        Warns (``SvenCostWarning``) first when the entries summed one by one cost far more than the full Gram.
        """
        keep = [piece for piece in columns.split(self.params.numels)]
        batch = self.shape[0]
        rows_per_block = max(1, GRAM_ROW_BLOCK_ELEMENTS // batch)
        gram = torch.zeros(batch, batch, dtype=torch.float64, device=self.device)
        partial = []
        for block in self.blocks:
            kept = [keep[self._position[id(p)]] for p in block.params]
            if all(bool(k.all()) for k in kept):
                block.add_gram(gram, rows_per_block)
            elif any(bool(k.any()) for k in kept):
                partial.append((block, kept))
        cost = entrywise_gram_cost(batch, sum(block.entrywise_entries(kept) for block, kept in partial))
        if cost is not None:
            warn_cost(cost)
        for block, kept in partial:
            block.add_masked_gram(gram, kept, rows_per_block)
        return gram

    def matmul(self, v: Tensor) -> Tensor:
        """M v from each block's factors (``GradientBlock.sample_dots``); a ``small_dense`` M multiplies itself."""
        if self.small_dense is not None:
            return (self.small_dense @ v.to(torch.float64)).to(self.dtype)
        if v.dim() == 2:
            return torch.stack([self.matmul(column) for column in v.T], dim=1)
        pieces = [piece.view_as(p) for piece, p in zip(v.split(self.params.numels), self.params.tensors)]
        product = torch.zeros(self.shape[0], dtype=torch.float64, device=self.device)
        for block in self.blocks:
            product += block.sample_dots([pieces[self._position[id(p)]] for p in block.params])
        return product.to(self.dtype)

    def rmatmul(self, u: Tensor) -> Tensor:
        if self.small_dense is not None:
            return (self.small_dense.T @ u.to(torch.float64)).to(self.dtype)
        u = u.to(self.dtype)
        if u.dim() == 2:
            return torch.stack([self.rmatmul(column) for column in u.T], dim=1)
        return self._assemble([block.weighted_sum(u) for block in self.blocks], leading=())

    def dense(self) -> Tensor:
        """M (rows, cols) from the blocks' flat per-sample gradients, zeros for the parameters of uncalled layers."""
        return self._assemble([block.flat_per_sample() for block in self.blocks], leading=(self.shape[0],))

    def dense_columns(self, columns: Tensor) -> Tensor:
        """M[:, columns] (rows, n): the per-sample gradients of the blocks holding a kept column, read at their
        kept entries — never B × P (a block's own B × P_block at most)."""
        rows = self.shape[0]
        keep = torch.zeros(self.params.size, dtype=torch.bool, device=self.device)
        keep[columns] = True
        kept = [part.nonzero().squeeze(1) for part in keep.split(self.params.numels)]
        pieces = [torch.zeros(rows, k.numel(), dtype=self.dtype, device=self.device) for k in kept]
        for block in self.blocks:
            positions = [self._position[id(p)] for p in block.params]
            if any(kept[i].numel() for i in positions):
                for i, grads in zip(positions, block.per_sample()):
                    pieces[i] = grads.reshape(rows, -1)[:, kept[i]]
        return torch.cat(pieces, dim=1)


class GramEngine:
    """Plans hooks over a model once, then computes (losses, predictions, GramJacobian) per batch.

    ``chunk_numel`` bounds the per-sample gradient entries (samples × parameter entries)
    the fallback holds at once. The model's modules are those it had when the engine was built
    (the plan and the BatchNorm check rely on them).
    """

    def __init__(self, model: nn.Module, params: ParamSpace, chunk_numel: int = 1 << 22) -> None:
        if not (isinstance(chunk_numel, int) and chunk_numel >= 1):
            raise ValueError(f"chunk_numel must be an integer >= 1; got {chunk_numel!r}")
        self.model = model
        self.params = params
        self.chunk_numel = chunk_numel
        self.hooked: list[_HookedLayer] = []
        self.fallback_names: list[str] = []
        trainable = {id(p) for p in params.tensors}
        self._name_of = {id(p): n for n, p in zip(params.names, params.tensors)}
        self._has_batch_norm = any(isinstance(module, _BatchNorm) for module in model.modules())
        self._plan(model, "", trainable, self._name_of, batch_dim=0)

    def _plan(
        self, module: nn.Module, prefix: str, trainable: set[int], name_of: dict[int, str], batch_dim: int
    ) -> None:
        own = list(module.parameters(recurse=False))
        own_trainable = [p for p in own if id(p) in trainable]
        if not own_trainable:
            inside = children_batch_dim(module, batch_dim)
            for child_name, child in module.named_children():
                self._plan(child, f"{prefix}.{child_name}" if prefix else child_name, trainable, name_of, inside)
        elif rule_for(module) is not None and all(id(p) in trainable for p in module.parameters()):
            params = tuple(module.parameters())
            self.hooked.append(_HookedLayer(prefix, module, rule_for(module), params, batch_dim))
        else:
            self.fallback_names += [name_of[id(p)] for p in module.parameters() if id(p) in trainable]

    def plan(self) -> dict[str, list[str]]:
        """Which layers are on the fast path and which parameters use the functorch fallback."""
        return {
            "fast_layers": [f"{layer.name} ({type(layer.module).__name__})" for layer in self.hooked],
            "fallback_parameters": list(self.fallback_names),
        }

    @contextmanager
    def _recording(self) -> Iterator[None]:
        handles = []
        for layer in self.hooked:
            layer.calls.clear()

            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any, layer: _HookedLayer = layer) -> Any:
                inputs = _detached(layer.rule.inputs(args, kwargs))
                first, *others = output if isinstance(output, tuple) else (output,)
                probe = torch.zeros_like(first, requires_grad=True)
                side = {i: torch.zeros_like(t, requires_grad=True) for i, t in enumerate(others)
                        if isinstance(t, Tensor) and t.requires_grad}
                layer.calls.append(_Call(inputs, _versions(inputs), probe, tuple(side.values())))
                probed = [t + side[i] if i in side else t for i, t in enumerate(others)]
                return (first + probe, *probed) if isinstance(output, tuple) else first + probe

            handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def compute(self, loss_fn: LossFn, batch: tuple) -> tuple[Tensor, Tensor, GramJacobian]:
        """Run the batch; return (losses (B,), predictions, GramJacobian (B, P))."""
        if self._has_batch_norm:
            check_no_batch_coupling(self.model)
        if self.fallback_names:
            self._check_no_active_dropout()
        inputs, targets, *extra = batch
        batch_size = targets.shape[0]
        with torch.enable_grad(), self._recording():
            preds = self.model(inputs)
            losses = check_per_sample_losses(loss_fn(preds, targets, *extra), batch_size)
            probes = [call.probe for layer in self.hooked for call in layer.calls]
            side = [(layer, probe) for layer in self.hooked for call in layer.calls for probe in call.side_probes]
            uncalled = [layer for layer in self.hooked if not layer.calls]
            uncalled_params = [p for layer in uncalled for p in layer.params]
            wanted = probes + [probe for _, probe in side] + uncalled_params
            grads = torch.autograd.grad(losses.sum(), wanted, allow_unused=True) if wanted else ()
        _check_side_outputs_unused([layer for layer, _ in side], grads[len(probes):len(probes) + len(side)])
        _check_uncalled_layers_unused(uncalled, grads[len(probes) + len(side):])
        blocks = merge_shared(self._layer_blocks(iter(grads[: len(probes)])))
        if self.fallback_names:
            blocks.append(self._fallback_block(loss_fn, batch))
        zero_params = tuple(p for layer in uncalled for p in layer.params)
        return losses.detach(), preds.detach(), GramJacobian(blocks, self.params, batch_size, zero_params)

    def _layer_blocks(self, backprops: Iterator[Tensor | None]) -> list[GradientBlock]:
        blocks: list[GradientBlock] = []
        for layer in self.hooked:
            per_call = []
            for call in layer.calls:
                grad = next(backprops)
                if _versions(call.inputs) != call.versions:
                    raise RuntimeError(
                        f"the input of layer '{layer.name}' was modified in place after the layer used it; "
                        "Sven's Gram engine needs it unchanged (avoid inplace=True on that tensor, "
                        "or use SvenWrapper(..., engine='functorch'))"
                    )
                grad = torch.zeros_like(call.probe) if grad is None else grad
                per_call.append(layer.rule(layer.module, call.inputs, grad, layer.batch_dim))
                _check_rule_covers_layer(layer, per_call[-1], self._name_of)
            if len(per_call) == 1:
                blocks += per_call[0]
            elif per_call:
                blocks += [type(calls[0]).summed(list(calls)) for calls in zip(*per_call)]
        return blocks

    def _check_no_active_dropout(self) -> None:
        """The fallback re-runs the model per sample and would draw other dropout masks than the batched pass."""
        for name, module in self.model.named_modules():
            if module.training and _dropout_probability(module) > 0:
                raise ValueError(
                    f"module '{name}' ({type(module).__name__}, p={_dropout_probability(module)}) is active "
                    f"while parameters "
                    f"{self.fallback_names} use the Gram engine's functorch fallback, which re-runs the model "
                    "per sample with different dropout masks, so the Jacobian would not match the losses. "
                    "Use SvenWrapper(..., engine='functorch') (one evaluation gives both), or model.eval()."
                )

    def _fallback_block(self, loss_fn: LossFn, batch: tuple) -> GradientBlock:
        return RecomputedBlock(self.model, loss_fn, batch, self.fallback_names, self.chunk_numel)


def _check_coverage(blocks: list[GradientBlock], params: ParamSpace, zero_params: tuple[Tensor, ...]) -> None:
    """Raise unless every parameter is in exactly one block or in ``zero_params`` (never a silent zero column)."""
    count = {id(p): 0 for p in params.tensors}
    for param in [*(p for block in blocks for p in block.params), *zero_params]:
        count[id(param)] = count.get(id(param), 0) + 1
    wrong = {name: count[id(p)] for name, p in zip(params.names, params.tensors) if count[id(p)] != 1}
    if wrong:
        raise RuntimeError(f"the Gram engine's blocks must cover each trainable parameter once; got {wrong} "
                           "(parameter name: number of blocks covering it)")


def _check_rule_covers_layer(layer: _HookedLayer, blocks: list[GradientBlock], name_of: dict[int, str]) -> None:
    """Raise unless the rule's blocks cover every trainable parameter under the hooked layer exactly once."""
    covered = [id(p) for block in blocks for p in block.params]
    missing = [name_of[id(p)] for p in layer.params if id(p) not in covered]
    repeated = sorted({name_of.get(i, "?") for i in covered if covered.count(i) > 1})
    if missing or repeated:
        raise RuntimeError(
            f"the Gram rule for layer '{layer.name}' ({type(layer.module).__name__}) returned blocks that "
            + (f"miss parameter(s) {missing}" if missing else f"cover parameter(s) {repeated} more than once")
            + "; a rule must return exactly one block entry per trainable parameter of its layer "
            "(see docs/GRAM_ENGINE.md, 'Writing a Gram rule')"
        )


def _check_uncalled_layers_unused(uncalled: list[_HookedLayer], param_grads: tuple) -> None:
    """A hooked layer whose forward never ran must not influence the loss (else its rows would be lost)."""
    grads = iter(param_grads)
    for layer in uncalled:
        for _ in layer.params:
            grad = next(grads)
            if grad is not None and bool(grad.ne(0).any()):
                raise RuntimeError(
                    f"the parameters of layer '{layer.name}' ({type(layer.module).__name__}) affect the loss "
                    "although the layer's forward was never called (its weights are used functionally "
                    "elsewhere); the Gram engine cannot see them. Use SvenWrapper(..., engine='functorch')."
                )



def _dropout_probability(module: nn.Module) -> float:
    """p of a Dropout layer or of nn.MultiheadAttention's attention dropout; 0 for other modules."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p
    if isinstance(module, nn.MultiheadAttention):
        return module.dropout
    return 0.0


def _detached(inputs: Any) -> Any:
    """``inputs`` with every tensor detached; a tensor passed twice stays one tensor (``query is key``)."""
    if isinstance(inputs, Tensor):
        return inputs.detach()
    seen: dict[int, Tensor] = {}
    return tree_map_only(Tensor, lambda t: seen.setdefault(id(t), t.detach()), inputs)


def _versions(inputs: Any) -> tuple[int, ...]:
    """The version counters of the tensors in ``inputs`` (shared with the tensors they were detached from)."""
    if isinstance(inputs, Tensor):
        return (inputs._version,)
    return tuple(t._version for t in tree_leaves(inputs) if isinstance(t, Tensor))


def _check_side_outputs_unused(layers: list[_HookedLayer], side_grads: tuple) -> None:
    """Outputs of a hooked call other than the first (attention weights) must not influence the loss."""
    for layer, grad in zip(layers, side_grads):
        if grad is not None and bool(grad.ne(0).any()):
            raise RuntimeError(
                f"the loss depends on an output of layer '{layer.name}' ({type(layer.module).__name__}) other than "
                "its first (e.g. attention weights), which its Gram rule does not cover. "
                "Use SvenWrapper(..., engine='functorch')."
            )
