"""SvenWrapper: a model plus a per-sample loss, producing the Jacobian operator Sven inverts."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from sven.cost import warn_cost
from sven.jacobian import (
    GramEngine,
    JacobianOperator,
    ParamSpace,
    RowTransformedJacobian,
    all_finite,
    check_no_batch_coupling,
    check_per_sample_losses,
    coupled_jacobian,
    functorch_jacobian,
)
from sven.jacobian.masks import MASK_MODES, MaskedJacobian, draw_columns, output_units
from sven.nn.batchnorm import BatchNormPolicy
from sven.nn.engine_choice import (
    AUTO_CANDIDATES,
    EngineChoice,
    choose_engine,
    rowwise_cost,
    run_and_check,
    tolerance_for,
)
from sven.nn.residual_rows import ResidualFn, ResidualRows, residual_width, signed_rows
from sven.nn.residuals import residuals_and_row_map
from sven.pde.jacobian import taylor_engine_refusal, taylor_jacobian, taylor_layers, taylor_predictions

ENGINES = ("auto", *AUTO_CANDIDATES)


@dataclass
class JacobianState:
    """What one ``loss_and_grad`` leaves for the optimizer.

    ``operator`` is M = d r / dθ (G, n); ``residuals`` r (G,) float64;
    ``losses`` the per-sample losses (B,); ``columns`` the flat parameter indices
    (n,) M covers, or None for all P.
    """

    operator: JacobianOperator
    residuals: Tensor
    losses: Tensor
    columns: Tensor | None
    batch: tuple


def _move(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it on ``device`` (a tensor directly, a container by its tree)."""
    if isinstance(value, Tensor):
        return value.to(device)
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, value)


class SvenWrapper:
    """Wraps ``model`` and a per-sample ``loss_fn(pred, y, *extra) -> (B,)`` (or ``residual_fn``) for Sven.

    Args:
        model: any ``nn.Module``; it stays an ordinary module and Sven updates its parameters in place.
        loss_fn: returns one loss per sample, shape (B,) (e.g. ``reduction='none'``).
        device: where the model and batches live (None: where the model already is).
        kappa: with ``loss_fn`` (default 2) the rows are l^(kappa/2): 2 inverts the losses
            themselves, 1 the Gauss–Newton residuals √l; with ``residual_fn`` (default 1) the
            rows are sign(r)·|r|^kappa, r itself at 1. Must be > 0.
        residual_fn: instead of ``loss_fn``: ``residual_fn(pred, y, *extra)`` returns signed
            residuals (B,) or (B, m); each r_ij is a row of M (a (B, m) residual is differentiated
            on the batch repeated m times, ``sven.nn.residual_rows``) and the per-sample loss
            reported is Σ_j r_ij². Not combinable with ``microbatch_size > 1``.
        param_fraction: f in (0, 1]; each step differentiates a fresh random subset of
            about f·P parameters (see ``mask_mode``) and moves only those. The subsets are drawn
            from the wrapper's own ``generator`` (seeded from torch's global RNG at construction,
            so ``torch.manual_seed`` before building the wrapper reproduces them), whose state
            ``Sven.state_dict()`` carries. With f = 1 no random number is drawn.
        microbatch_size: m ≥ 1; losses are averaged over consecutive groups of m samples
            before the power, so M has ⌈B/m⌉ rows; the last group is smaller when m ∤ B.
        engine: "taylor" (a ``sven.pde.CollocationResidual`` only: its forward Laplacian and the reverse pass
            written out, M kept factored as the Gram engine keeps it), "gram" (hooks, never forms the
            B × P Jacobian), "functorch" (vmap of
            per-sample gradients, materialises it), "rowwise" (one forward and one backward per
            row: exact for any forward, materialises M) or "auto": the first of these that gives
            the exact Jacobian, checked on the first batch (``sven.nn.engine_choice``); see
            ``engine_plan()``.
        fallback_chunk_numel: for the Gram engine, the most per-sample gradient entries
            (samples × parameter entries) held at once for parameters without a Gram rule.
        mask_mode: what param_fraction < 1 draws (``sven.jacobian.masks``): "elementwise"
            (⌊f·P⌋ flat entries), "rows" (max(1, round(f·d_out)) whole output units of each
            Linear / Conv / Embedding with their bias entries, the other parameters elementwise)
            or "tensor" (whole parameter tensors holding ≈ f·P entries, at least one).
        bn_mode: what BatchNorm layers in train mode do in the wrapper's passes (layers in eval mode
            always use their running statistics):
            "batch" normalises with the batch's statistics, as SGD training does; the running statistics
            advance once per step, as one train-mode forward of the batch at the pre-step parameters
            would, and never in the extra passes (adaptive damping, variable_k). Each loss then depends
            on the whole batch, so whatever ``engine``, M (B × P) is materialised: one forward and B
            backward passes of the batch (``sven.jacobian.coupled_jacobian``; SGD takes one).
            "frozen" normalises with the running statistics in every pass and writes none of them; the
            Gram engine keeps BatchNorm on its fast path. Each layer's train/eval flag is left as it was.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor] | None = None,
        device: torch.device | str | None = None,
        kappa: float | None = None,
        param_fraction: float = 1.0,
        microbatch_size: int = 1,
        engine: str = "auto",
        fallback_chunk_numel: int = 1 << 22,
        mask_mode: str = "elementwise",
        bn_mode: str = "batch",
        residual_fn: ResidualFn | None = None,
    ) -> None:
        if (loss_fn is None) == (residual_fn is None):
            raise ValueError("SvenWrapper needs exactly one of loss_fn (per-sample losses (B,)) and residual_fn "
                             f"(signed residuals (B,) or (B, m)); got {'both' if loss_fn else 'neither'}")
        if residual_fn is not None and microbatch_size != 1:
            raise ValueError(f"microbatch_size={microbatch_size} averages per-sample losses; residual_fn makes each "
                             "residual a row of its own: use microbatch_size=1 with residual_fn")
        kappa = (2.0 if residual_fn is None else 1.0) if kappa is None else kappa
        if not kappa > 0:
            raise ValueError(f"kappa must be > 0; got {kappa}")
        if not 0 < param_fraction <= 1:
            raise ValueError(f"param_fraction must be in (0, 1]; got {param_fraction}")
        if not (isinstance(microbatch_size, int) and microbatch_size >= 1):
            raise ValueError(f"microbatch_size must be an integer >= 1; got {microbatch_size!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}; got {engine!r}")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}; got {mask_mode!r}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.batchnorm = BatchNormPolicy(self.model, bn_mode)
        self.loss_fn = loss_fn
        self.residual_fn = residual_fn
        self._residual_rows: ResidualRows | None = None
        self._forward_needs_grad = False
        self._engine_checked = False
        self.kappa = float(kappa)
        self.param_fraction = float(param_fraction)
        self.microbatch_size = microbatch_size
        self.engine = engine
        self.engine_choice = None if engine == "auto" else EngineChoice(engine, {})
        self.mask_mode = mask_mode
        self.params = ParamSpace.of_module(self.model)
        self._units = output_units(self.model, self.params) if mask_mode == "rows" else []
        self._gram_engine = (GramEngine(self.model, self.params, fallback_chunk_numel)
                             if engine in ("auto", "gram") else None)
        self._taylor_refusal = taylor_engine_refusal(self.model, self.params)
        if engine == "taylor" and self._taylor_refusal is not None:
            raise ValueError(f"engine='taylor' cannot differentiate this model: {self._taylor_refusal}; "
                             "use engine='auto'")
        self.state: JacobianState | None = None
        self.generator = self._seeded_generator() if self.param_fraction < 1 else None

    def _seeded_generator(self) -> torch.Generator:
        """A generator for the parameter subsets, seeded from torch's global RNG (only when f < 1)."""
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def draw_columns(self) -> Tensor | None:
        """Sorted random flat indices (n,) of this step's ``mask_mode`` draw for param_fraction f < 1, else None."""
        if self.param_fraction == 1:
            return None
        return draw_columns(self.mask_mode, self.params, self._units, self.param_fraction, self.generator)

    def loss_and_grad(self, batch: Sequence[Any]) -> tuple[Tensor, Tensor]:
        """Forward the batch ``(x, y, *extra)`` and compute the Jacobian of its residuals.

        Returns (per-sample losses (B,), predictions), both detached. The Jacobian
        operator and residuals are kept in ``self.state`` for ``Sven.step()``.
        """
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(
                f"batch must be a tuple (x, y, *extra); got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        batch = tuple(_move(item, self.device) for item in batch)
        targets = batch[1]
        if not isinstance(targets, Tensor) or targets.dim() == 0 or targets.shape[0] == 0:
            raise ValueError(
                "batch (x, y, *extra) needs a target tensor y with at least one sample along dim 0; "
                f"got y of shape {tuple(getattr(targets, 'shape', ()))}"
            )
        self.state = None
        columns = self.draw_columns()
        rows = self._rows_of(batch)
        if rows is not None and rows.width > 1:
            self._refuse_repeated_batch_statistics(rows.width)
        engine_loss, engine_batch = (self.loss_fn, batch) if rows is None else (rows.rows, rows.engine_batch(batch))
        with self.batchnorm.jacobian_pass() as statistics_before:
            values, preds, operator = self._jacobian(engine_loss, engine_batch, columns)
        if not all_finite(values):
            statistics_before.restore()  # Sven skips this step: it must leave the running statistics alone too
        if rows is None:
            losses = values
            residuals, row_map = residuals_and_row_map(values, self.microbatch_size, self.kappa)
        else:
            losses, preds = rows.per_sample_losses(values), preds[: targets.shape[0]]
            residuals, row_map = signed_rows(values, self.kappa)
        if row_map is not None:
            operator = RowTransformedJacobian(operator, row_map)
        self.state = JacobianState(operator, residuals, losses, columns, batch)
        return losses, preds

    def _rows_of(self, batch: tuple) -> ResidualRows | None:
        """For residual_fn: its rows, with m learnt from one forward on the first batch (with autograd
        enabled, as a forward that differentiates inside needs; nothing is kept)."""
        if self.residual_fn is None or self._residual_rows is not None:
            return self._residual_rows
        inputs, targets, *extra = batch
        with torch.enable_grad(), self.batchnorm.loss_pass():
            width = residual_width(self.residual_fn(self.model(inputs), targets, *extra), targets.shape[0])
        self._residual_rows = ResidualRows(self.residual_fn, width)
        return self._residual_rows

    def _refuse_repeated_batch_statistics(self, width: int) -> None:
        """A (B, m) residual runs the batch repeated m times: BatchNorm layers normalising with batch statistics
        would update their running variance with m·B samples; refused, naming the layers and the ways out."""
        layers = self.batchnorm.batch_statistics_layers()
        if layers:
            raise ValueError(
                f"residual_fn returned {width} residuals per sample; a (B, m) residual is differentiated on the batch "
                f"repeated m times, so the BatchNorm layer(s) {', '.join(layers)} (bn_mode='batch', train mode) "
                "would update their running variance with m·B samples. Use bn_mode='frozen', put those layers in "
                "eval mode, or return residuals of shape (B,)"
            )

    def _jacobian(self, loss_fn: Callable[..., Tensor], batch: tuple, columns: Tensor | None
                  ) -> tuple[Tensor, Tensor, JacobianOperator]:
        """(per-sample values (rows,), predictions, M) from the engine this model needs.

        With engine="auto" the first batch settles the engine (``sven.nn.engine_choice``).
        """
        if self.batchnorm.batch_statistics_layers():
            return coupled_jacobian(self.model, loss_fn, batch, self.params, columns)
        run = partial(self._run_engine, loss_fn=loss_fn, batch=batch, columns=columns)
        if self.engine_choice is None:
            candidates = {name: partial(run, name) for name in AUTO_CANDIDATES
                          if name != "taylor" or self._taylor_refusal is None}
            self.engine_choice, result = choose_engine(candidates, self.model, loss_fn, batch, self.params, columns)
            if self.engine_choice is not None and self.engine_choice.engine == "rowwise":
                warn_cost(rowwise_cost(self.engine_choice, result[2].shape))
            return result
        engine = self.engine_choice.engine
        if self._engine_checked or engine == "rowwise":
            return run(engine)
        result, difference = run_and_check(partial(run, engine), self.model, loss_fn, batch, self.params, columns)
        if difference > tolerance_for(self.params):
            raise RuntimeError(
                f"engine={self.engine!r} gives a Jacobian whose Mᵀc differs from autograd's by {difference:.2g} "
                "(relative): the forward uses parameters in a way this engine cannot see (e.g. "
                "torch.autograd.grad(create_graph=True) inside forward). Use engine='auto' or 'rowwise'."
            )
        self._engine_checked = math.isfinite(difference)
        return result

    def _run_engine(self, name: str, loss_fn: Callable[..., Tensor], batch: tuple, columns: Tensor | None
                    ) -> tuple[Tensor, Tensor, JacobianOperator]:
        if name in ("taylor", "gram"):
            if name == "taylor":
                values, preds, operator = taylor_jacobian(self.model, loss_fn, batch, self.params)
            else:
                values, preds, operator = self._gram_engine.compute(loss_fn, batch)
            return values, preds, operator if columns is None else MaskedJacobian(operator, columns)
        if name == "functorch":
            check_no_batch_coupling(self.model)
            return functorch_jacobian(self.model, loss_fn, batch, self.params, columns)
        return coupled_jacobian(self.model, loss_fn, batch, self.params, columns)

    def batch_losses(self, batch: tuple) -> Tensor:
        """Per-sample losses (B,) of the model as it is now on a batch ``(x, y, *extra)``: forward only.

        Without autograd, unless the model's forward needs it (it differentiates inside, as a PDE
        residual written with ``torch.autograd.grad(create_graph=True)`` does): then with it, detached.
        """
        grad_mode = torch.enable_grad() if self._forward_needs_grad else torch.no_grad()
        try:
            with grad_mode:
                return self._batch_losses(batch).detach()
        except RuntimeError:
            if self._forward_needs_grad:
                raise
        with torch.enable_grad():
            losses = self._batch_losses(batch).detach()
        self._forward_needs_grad = True
        return losses

    def _batch_losses(self, batch: tuple) -> Tensor:
        inputs, targets, *extra = batch
        with self.batchnorm.loss_pass():
            on_taylor = self.engine_choice is not None and self.engine_choice.engine == "taylor"
            preds = taylor_predictions(self.model, inputs) if on_taylor else self.model(inputs)
        if self.residual_fn is not None:
            return self._rows_of(batch).batch_losses(preds, targets, *extra)
        return check_per_sample_losses(self.loss_fn(preds, targets, *extra), targets.shape[0])

    def engine_plan(self) -> dict[str, Any]:
        """Where the Jacobian's columns come from, for the model's train/eval flags as they are now.

        "engine": the engine in use — "taylor", "gram", "functorch", "rowwise", or "auto" before the first
        batch has settled it (``sven.nn.engine_choice``); "passed_over": the faster engines "auto" skipped, and
        why. "fast_layers": layers on the Taylor or Gram engine's fast path; "fallback_parameters": parameters whose
        per-sample gradients vmap materialises; "batch_statistics_layers": BatchNorm layers normalising
        with batch statistics (bn_mode="batch", train mode). While there is one, or on the "rowwise"
        engine, every parameter is in "coupled_parameters": M (B × P) is materialised from one forward
        and B backward passes.
        """
        coupled = self.batchnorm.batch_statistics_layers()
        engine = "auto" if self.engine_choice is None else self.engine_choice.engine
        if coupled or engine == "rowwise":
            plan = {"fast_layers": [], "fallback_parameters": [], "coupled_parameters": list(self.params.names)}
        elif engine == "taylor":
            plan = {"fast_layers": taylor_layers(self.model), "fallback_parameters": [], "coupled_parameters": []}
        elif engine == "functorch":
            plan = {"fast_layers": [], "fallback_parameters": list(self.params.names), "coupled_parameters": []}
        else:
            plan = {**self._gram_engine.plan(), "coupled_parameters": []}
        passed_over = {} if self.engine_choice is None else self.engine_choice.passed_over
        return {"engine": engine, "passed_over": passed_over, **plan, "batch_statistics_layers": coupled}
