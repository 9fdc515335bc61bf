"""Gradient blocks: one layer's share of the per-sample Jacobian, kept as factors.

A block covers some parameters of one layer and knows three things about the
per-sample gradients g_i (i = 1 … B) of those parameters without the engine
having to know the layer type:

- ``gram()``: the (B, B) float64 matrix ⟨g_i, g_j⟩;
- ``weighted_sum(c)``: Σ_i c_i g_i, one tensor per parameter (the update Mᵀc);
- ``per_sample()``: the g_i themselves, (B, *param.shape) per parameter;
- ``masked_gram(keep)``: ⟨g_i, g_j⟩ over some entries only (``param_fraction``), and
  ``entrywise_entries(keep)``: how many of them it sums one by one (B² multiply-adds each);
- ``add_gram(out, rows_per_block)`` and ``gram_matmul(u)``: the Gram share assembled a block of rows at a
  time, and Σ_j ⟨g_i, g_j⟩ u_j without it (large batches, ``sven.opt.matrix_free``).

and exposes its factors — tensors with the sample on dim 0 from which the block is
rebuilt (``sample_factors`` / ``with_sample_factors``) — so that code outside the
engine (``sven.distributed``) can move a block's samples without knowing its type.
Writing a Gram rule for a new layer type means returning these blocks (see
docs/GRAM_ENGINE.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

GRAM_MATMUL_CHUNK = 2**22
"""float64 elements of the (B·T, columns·d_out) temporaries of ``OuterProductBlock.gram_matmul`` (32 MiB)."""


class GradientBlock(ABC):
    """The per-sample gradients of ``params`` in factored form."""

    params: tuple[Tensor, ...]

    @abstractmethod
    def gram(self) -> Tensor:
        """(B, B) float64: ⟨g_i, g_j⟩ summed over this block's parameters."""

    @abstractmethod
    def weighted_sum(self, coeffs: Tensor) -> list[Tensor]:
        """Σ_i coeffs_i · g_i for coeffs (B,); one tensor shaped like each parameter."""

    @abstractmethod
    def per_sample(self) -> list[Tensor]:
        """g_i for every sample: one tensor (B, *param.shape) per parameter."""

    def flat_per_sample(self) -> list[Tensor]:
        """g_i for every sample, flattened: one tensor (B, param.numel()) per parameter."""
        return [g.reshape(g.shape[0], -1) for g in self.per_sample()]

    def add_gram(self, out: Tensor, rows_per_block: int) -> None:
        """out (B, B) float64 += ``gram()``; blocks with a row form build it ``rows_per_block`` rows at a time.

        This default forms the whole (B, B) share at once.
        """
        out += self.gram()

    def gram_matmul(self, coeffs: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """Σ_j ⟨g_i, g_j⟩ coeffs_j for coeffs (B,) or (B, m): (B,) or (B, m) float64, never forming the Gram share.

        Factored blocks multiply their factors in ``dtype``; this default is ``sample_dots(weighted_sum(c))``
        per column, in the parameters' dtype.
        """
        if coeffs.dim() == 2:
            return torch.stack([self.gram_matmul(column, dtype) for column in coeffs.T], dim=1)
        return self.sample_dots(self.weighted_sum(coeffs))

    def masked_gram(self, keep: Sequence[Tensor]) -> Tensor:
        """(B, B) float64: ⟨g_i, g_j⟩ over the kept entries; ``keep`` one boolean (numel,) per parameter.

        This default gathers the kept entries of ``per_sample()``; factored blocks override it.
        """
        grads = [g.reshape(g.shape[0], -1)[:, k] for g, k in zip(self.per_sample(), keep)]
        return MaterializedBlock(self.params, grads).gram()

    def add_masked_gram(self, out: Tensor, keep: Sequence[Tensor], rows_per_block: int) -> None:
        """out (B, B) float64 += ``masked_gram(keep)``; blocks with a row form build it ``rows_per_block`` rows at a
        time. This default forms the whole (B, B) share at once."""
        out += self.masked_gram(keep)

    def entrywise_entries(self, keep: Sequence[Tensor]) -> int:
        """How many of the kept entries ``masked_gram(keep)`` sums one by one (it costs B² multiply-adds each).

        This default (which gathers them from ``per_sample()``): all of them.
        """
        return sum(int(k.sum()) for k in keep)

    @classmethod
    def summed(cls, blocks: list[GradientBlock]) -> GradientBlock:
        """One block for Σ of the blocks' per-sample gradients (same params: a layer called repeatedly).

        This default materialises the sums; factored blocks override it to stay factored.
        """
        totals = [sum(grads) for grads in zip(*(block.per_sample() for block in blocks))]
        return MaterializedBlock(blocks[0].params, totals)

    def sample_dots(self, values: Sequence[Tensor]) -> Tensor:
        """(B,) float64: ⟨g_i, v⟩ for v given as one tensor per parameter, shaped like it (a row of M v).

        This default materialises the per-sample gradients; factored blocks override it.
        """
        grads = self.per_sample()
        batch = grads[0].shape[0]
        return sum(g.reshape(batch, -1).to(torch.float64) @ v.reshape(-1).to(torch.float64)
                   for g, v in zip(grads, values))

    def sample_dots_many(self, values: Sequence[Tensor]) -> Tensor:
        """(B, K) float64: ⟨g_i, v_k⟩ for K vectors given as one tensor (K, *param.shape) per parameter.

        This default takes one ``sample_dots`` per vector; blocks with a batched form override it.
        """
        return torch.stack([self.sample_dots([v[k] for v in values]) for k in range(values[0].shape[0])], dim=1)

    def sample_sums(self) -> Tensor:
        """(B,) float64: the sum of every entry of each sample's floating-point factors.

        A NaN or Inf among a sample's factors (so possibly in its gradients) makes its sum NaN or
        Inf: one reduction per factor instead of a test of every entry. A float64 sum can overflow
        only for entries whose squares, in the Gram matrix, would.
        """
        factors = [f for f in self.sample_factors() if f.is_floating_point()]
        return sum(f.reshape(f.shape[0], -1).sum(dim=1, dtype=torch.float64) for f in factors)

    def factor_totals(self) -> list[Tensor]:
        """0-d float64 sums of each floating-point factor over all samples: all finite only if every entry is
        (one reduction per factor, no per-sample sums; ``sample_sums`` says which samples when one is not)."""
        return [f.sum(dtype=torch.float64) for f in self.sample_factors() if f.is_floating_point()]

    def sample_factors(self) -> tuple[Tensor, ...]:
        """Tensors (B, …) that determine this block's per-sample gradients; by default the gradients themselves."""
        return tuple(self.per_sample())

    def with_sample_factors(self, factors: Sequence[Tensor]) -> GradientBlock:
        """A block of the same parameters from factors shaped like ``sample_factors()`` but for other samples."""
        return MaterializedBlock(self.params, list(factors))


class MaterializedBlock(GradientBlock):
    """Per-sample gradients held explicitly (cheap layers, fallback, repeated calls)."""

    def __init__(self, params: tuple[Tensor, ...], grads: list[Tensor]) -> None:
        self.params = params
        self.grads = grads

    def _flat(self, dtype: torch.dtype = torch.float64) -> Tensor:
        batch = self.grads[0].shape[0]
        return torch.cat([g.reshape(batch, -1) for g in self.grads], dim=1).to(dtype)

    def gram(self) -> Tensor:
        flat = self._flat()
        return flat @ flat.T

    def gram_matmul(self, coeffs: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        flat = self._flat(dtype)
        return (flat @ (flat.T @ coeffs.to(dtype))).to(torch.float64)

    def weighted_sum(self, coeffs: Tensor) -> list[Tensor]:
        return [torch.tensordot(coeffs.to(g.dtype), g, dims=1) for g in self.grads]

    def per_sample(self) -> list[Tensor]:
        return self.grads


class OuterProductBlock(GradientBlock):
    """Weight gradients Σ_t b_t a_tᵀ (Linear, unfolded Conv) and bias gradients Σ_t b_t.

    ``activations`` (B, T, d_in) and ``backprops`` (B, T, d_out); T = 1 for a plain
    Linear on (B, d_in). The weight is any tensor of d_out · d_in entries laid out
    as (d_out, d_in) in memory.

    The Gram matrix takes the cheaper of two forms (as in mixed ghost clipping):
    the ghost form Σ_{t,s} (a_it·a_js)(b_it·b_js), costing (B·T)²·(d_in + d_out),
    or the materialised per-sample gradients, costing B·T·d_in·d_out + B²·d_in·d_out.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, activations: Tensor, backprops: Tensor) -> None:
        self.weight = weight
        self.bias = bias
        self.params = (weight,) if bias is None else (weight, bias)
        self.activations = activations
        self.backprops = backprops
        self._cast_factors: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    @property
    def uses_ghost_form(self) -> bool:
        """Whether ``gram()`` takes the ghost form (cheaper than materialising for these shapes)."""
        batch, tokens, d_in = self.activations.shape
        d_out = self.backprops.shape[-1]
        ghost = (batch * tokens) ** 2 * (d_in + d_out)
        materialised = batch * tokens * d_in * d_out + batch**2 * d_in * d_out
        return ghost <= materialised

    def gram(self) -> Tensor:
        return self._gram_rows()(slice(None))

    def _gram_rows(self) -> Callable[[slice], Tensor]:
        """rows ↦ those n rows of ``gram()``, (n, B) float64, with the float64 factors prepared once.

        Ghost form: temporaries (n·T, B·T); materialised form: the per-sample gradients (B, d_out·d_in) once.
        All rows (``slice(None)``) take the factors themselves, without slicing them.
        """
        batch, tokens, _ = self.activations.shape
        if not self.uses_ghost_form:
            flat = torch.cat(self.flat_per_sample(), dim=1).to(torch.float64)
            return lambda rows: (flat if rows == slice(None) else flat[rows]) @ flat.T
        acts = self.activations.reshape(batch * tokens, -1).to(torch.float64)
        grads = self.backprops.reshape(batch * tokens, -1).to(torch.float64)

        def rows_of(rows: slice) -> Tensor:
            row_grads, row_acts = grads, acts
            if rows != slice(None):
                chosen = slice(rows.start * tokens, rows.stop * tokens)
                row_grads, row_acts = grads[chosen], acts[chosen]
            grad_gram = row_grads @ grads.T
            gram = (row_acts @ acts.T) * grad_gram
            if self.bias is not None:
                gram = gram + grad_gram
            if tokens > 1:
                gram = gram.view(-1, tokens, batch, tokens).sum(dim=(1, 3))
            return gram

        return rows_of

    def _factors_in(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Activations (B·T, d_in) and backprops (B, T, d_out) in ``dtype``, cast once: CG multiplies by them
        at every iteration (one copy of the factors per dtype, O(activations) memory)."""
        if dtype not in self._cast_factors:
            self._cast_factors[dtype] = (self.activations.reshape(-1, self.activations.shape[-1]).to(dtype),
                                         self.backprops.to(dtype))
        return self._cast_factors[dtype]

    def add_gram(self, out: Tensor, rows_per_block: int) -> None:
        """``gram()`` a block of ``rows_per_block`` rows at a time: ghost temporaries (rows_per_block·T, B·T)."""
        batch = out.shape[0]
        if rows_per_block >= batch:
            out += self.gram()
            return
        rows_of = self._gram_rows()
        for start in range(0, batch, rows_per_block):
            rows = slice(start, min(start + rows_per_block, batch))
            out[rows] += rows_of(rows)

    def gram_matmul(self, coeffs: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """M_b (M_bᵀ U) from the factors in ``dtype``, ``GRAM_MATMUL_CHUNK`` elements of (B·T, m·d_out) at a time.

        Mᵀ U is W_k = Σ_{i,t} U_ik b_it a_itᵀ (d_out, d_in) per column k, one GEMM for a group of columns;
        row i of M W_k is Σ_t b_itᵀ W_k a_it (+ the bias part s_i·(sᵀ U), s_i = Σ_t b_it).
        """
        if coeffs.dim() == 1:
            return self.gram_matmul(coeffs.unsqueeze(1), dtype).squeeze(1)
        batch, tokens, d_in = self.activations.shape
        d_out = self.backprops.shape[-1]
        acts, grads = self._factors_in(dtype)
        coeffs = coeffs.to(dtype)
        group = max(1, GRAM_MATMUL_CHUNK // (batch * tokens * d_out))
        products = []
        for start in range(0, coeffs.shape[1], group):
            chosen = coeffs[:, start:start + group]
            width = chosen.shape[1]
            weighted = (chosen[:, None, :, None] * grads[:, :, None, :]).reshape(batch * tokens, width * d_out)
            weights = weighted.T @ acts  # (width·d_out, d_in): W_k stacked
            applied = (acts @ weights.T).view(batch, tokens, width, d_out)
            products.append((applied * grads[:, :, None, :]).sum(dim=(1, 3)))
        product = torch.cat(products, dim=1)
        if self.bias is not None:
            sums = grads.sum(dim=1)
            product = product + sums @ (sums.T @ coeffs)
        return product.to(torch.float64)

    def sample_dots(self, values: Sequence[Tensor]) -> Tensor:
        """Σ_t b_tᵀ V a_t (+ Σ_t b_t·v_bias) per sample, from the factors."""
        weight = values[0].reshape(self.backprops.shape[-1], -1).to(self.activations.dtype)
        dots = ((self.activations @ weight.T) * self.backprops).sum(dim=(1, 2)).to(torch.float64)
        if self.bias is not None:
            dots = dots + self.backprops.sum(dim=1).to(torch.float64) @ values[1].reshape(-1).to(torch.float64)
        return dots

    def _kept_rows(self, keep: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor | None, bool]:
        """The weight's keep mask (d_out, d_in), its whole and partly kept rows (d_out,), the bias keep mask and
        whether it equals the whole rows (the bias then joins their factored Gram)."""
        rows = keep[0].view(self.backprops.shape[-1], -1)
        whole, partial = rows.all(dim=1), rows.any(dim=1) & ~rows.all(dim=1)
        bias_keep = keep[1] if self.bias is not None else None
        return rows, whole, partial, bias_keep, bias_keep is not None and torch.equal(bias_keep, whole)

    def entrywise_entries(self, keep: Sequence[Tensor]) -> int:
        """The kept entries of partly kept weight rows, and of the bias unless it joins the whole rows."""
        rows, _, partial, bias_keep, joint_bias = self._kept_rows(keep)
        return int(rows[partial].sum()) + (0 if bias_keep is None or joint_bias else int(bias_keep.sum()))

    def masked_gram(self, keep: Sequence[Tensor]) -> Tensor:
        batch = self.activations.shape[0]
        gram = torch.zeros(batch, batch, dtype=torch.float64, device=self.activations.device)
        self.add_masked_gram(gram, keep, batch)
        return gram

    def add_masked_gram(self, out: Tensor, keep: Sequence[Tensor], rows_per_block: int) -> None:
        """Whole kept weight rows (output units) add ``gram()`` on their backprops G_S, T = 1: (A Aᵀ) ⊙ (G_S G_Sᵀ),
        ``rows_per_block`` rows at a time like the full Gram (no (B, B) temporary); partly kept rows add their kept
        per-sample entries, a chunk of rows at a time, into ``out`` itself."""
        rows, whole, partial, bias_keep, joint_bias = self._kept_rows(keep)
        if bool(whole.any()):
            units = OuterProductBlock(self.weight, self.bias if joint_bias else None, self.activations,
                                      self.backprops[..., whole])
            units.add_gram(out, rows_per_block)
        if bias_keep is not None and not joint_bias and bool(bias_keep.any()):
            sums = self.backprops.sum(dim=1)[:, bias_keep].to(torch.float64)
            out.addmm_(sums, sums.T)
        if bool(partial.any()):
            self._add_entrywise_gram(out, rows, partial.nonzero().squeeze(1))

    def _add_entrywise_gram(self, out: Tensor, keep_rows: Tensor, units: Tensor) -> None:
        """out (B, B) += Σ over the kept entries of weight rows ``units`` (u,) of g_i g_jᵀ; keep_rows (d_out, d_in).

        A group of rows at a time, the kept per-sample entries Σ_t b_to a_ti (B, kept) in float64,
        gathered straight from the factors: at most B·T·(d_in + d_out) values per group.
        """
        d_in = self.activations.shape[-1]
        for group in units.split(max(1, (d_in + self.backprops.shape[-1]) // d_in)):
            rows, inputs = keep_rows[group].nonzero().unbind(1)
            per_sample = self.activations[..., inputs].to(torch.float64)
            per_sample = per_sample.mul_(self.backprops[..., group[rows]]).sum(dim=1)
            out.addmm_(per_sample, per_sample.T)

    def weighted_sum(self, coeffs: Tensor) -> list[Tensor]:
        batch, tokens, d_in = self.activations.shape
        weighted = (self.backprops * coeffs.to(self.backprops.dtype).view(batch, 1, 1)).reshape(batch * tokens, -1)
        sums = [(weighted.T @ self.activations.reshape(batch * tokens, d_in)).view_as(self.weight)]
        if self.bias is not None:
            sums.append(weighted.sum(dim=0).view_as(self.bias))
        return sums

    @classmethod
    def summed(cls, blocks: list[GradientBlock]) -> GradientBlock:
        """Repeated calls of one layer are more positions t: concatenate them along dim 1."""
        first = blocks[0]
        return cls(
            first.weight, first.bias,
            torch.cat([b.activations for b in blocks], dim=1), torch.cat([b.backprops for b in blocks], dim=1),
        )

    def per_sample(self) -> list[Tensor]:
        batch = self.activations.shape[0]
        return [g.reshape(batch, *p.shape) for g, p in zip(self.flat_per_sample(), self.params)]

    def flat_per_sample(self) -> list[Tensor]:
        """Σ_t b_t a_tᵀ flattened (B, d_out·d_in) and Σ_t b_t (B, d_out): the per-sample gradients of the units held.

        T = 1 by a broadcast product (a batched matmul of B tiny matrices costs 3× more: 50 against 15 µs at
        B = 32, 16 × 16); d_in = 1 or d_out = 1 by a product summed over t (a batched matmul with a dimension of
        1 is 4–5× slower: 540–650 against 120–150 µs at B = 1024, T = 5, 64 × 1 and 1 × 64); else ``torch.bmm``.
        """
        batch, tokens, d_in = self.activations.shape
        if tokens == 1:
            backprops = self.backprops[:, 0]
            grads = [(backprops.unsqueeze(2) * self.activations[:, 0].unsqueeze(1)).reshape(batch, -1)]
            return grads + [backprops] if self.bias is not None else grads
        if d_in == 1 or self.backprops.shape[-1] == 1:
            grads = [(self.backprops * self.activations).sum(dim=1)]
        else:
            grads = [torch.bmm(self.backprops.transpose(1, 2), self.activations).reshape(batch, -1)]
        if self.bias is not None:
            grads.append(self.backprops.sum(dim=1))
        return grads

    def sample_factors(self) -> tuple[Tensor, ...]:
        """(activations (B, T, d_in), backprops (B, T, d_out))."""
        return self.activations, self.backprops

    def with_sample_factors(self, factors: Sequence[Tensor]) -> GradientBlock:
        activations, backprops = factors
        return OuterProductBlock(self.weight, self.bias, activations, backprops)
