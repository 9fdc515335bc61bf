"""SvenWrapper: a model plus a per-sample loss, producing the Jacobian operator Sven inverts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sven.jacobian import (
    GramEngine,
    JacobianOperator,
    ParamSpace,
    RowTransformedJacobian,
    check_no_batch_coupling,
    check_per_sample_losses,
    functorch_jacobian,
)
from sven.jacobian.masks import MASK_MODES, MaskedJacobian, draw_columns, output_units
from sven.nn.residuals import residuals_and_row_map

ENGINES = ("auto", "gram", "functorch")


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
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, value)


class SvenWrapper:
    """Wraps ``model`` and a per-sample ``loss_fn(pred, y, *extra) -> (B,)`` for Sven.

    Args:
        model: any ``nn.Module``; it stays an ordinary module and Sven updates its parameters in place.
        loss_fn: returns one loss per sample, shape (B,) (e.g. ``reduction='none'``).
        device: where the model and batches live (None: where the model already is).
        kappa: residuals are r = l^(kappa/2): 2 inverts the losses themselves, 1 the
            Gauss–Newton residuals √l. Must be > 0.
        param_fraction: f in (0, 1]; each step differentiates a fresh random subset of
            about f·P parameters (see ``mask_mode``) and moves only those. The subsets are drawn
            from the wrapper's own ``generator`` (seeded from torch's global RNG at construction,
            so ``torch.manual_seed`` before building the wrapper reproduces them), whose state
            ``Sven.state_dict()`` carries. With f = 1 no random number is drawn.
        microbatch_size: m ≥ 1; losses are averaged over consecutive groups of m samples
            before the power, so M has ⌈B/m⌉ rows; the last group is smaller when m ∤ B.
        engine: "gram" (hooks, never forms the B × P Jacobian), "functorch" (vmap of
            per-sample gradients, materialises it) or "auto" ("gram").
        fallback_chunk_numel: for the Gram engine, the most per-sample gradient entries
            (samples × parameter entries) held at once for parameters without a Gram rule.
        mask_mode: what param_fraction < 1 draws (``sven.jacobian.masks``): "elementwise"
            (⌊f·P⌋ flat entries), "rows" (max(1, round(f·d_out)) whole output units of each
            Linear / Conv / Embedding with their bias entries, the other parameters elementwise)
            or "tensor" (whole parameter tensors holding ≈ f·P entries, at least one).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        device: torch.device | str | None = None,
        kappa: float = 2.0,
        param_fraction: float = 1.0,
        microbatch_size: int = 1,
        engine: str = "auto",
        fallback_chunk_numel: int = 1 << 22,
        mask_mode: str = "elementwise",
    ) -> None:
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
        self.loss_fn = loss_fn
        self.kappa = float(kappa)
        self.param_fraction = float(param_fraction)
        self.microbatch_size = microbatch_size
        self.engine = "gram" if engine == "auto" else engine
        self.mask_mode = mask_mode
        self.params = ParamSpace.of_module(self.model)
        self._units = output_units(self.model, self.params) if mask_mode == "rows" else []
        self._gram_engine = GramEngine(self.model, self.params, fallback_chunk_numel) if self.engine == "gram" else None
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
        if self._gram_engine is not None:
            losses, preds, operator = self._gram_engine.compute(self.loss_fn, batch)
            if columns is not None:
                operator = MaskedJacobian(operator, columns)
        else:
            check_no_batch_coupling(self.model)
            losses, preds, operator = functorch_jacobian(self.model, self.loss_fn, batch, self.params, columns)
        residuals, row_map = residuals_and_row_map(losses, self.microbatch_size, self.kappa)
        if row_map is not None:
            operator = RowTransformedJacobian(operator, row_map)
        self.state = JacobianState(operator, residuals, losses, columns, batch)
        return losses, preds

    @torch.no_grad()
    def batch_losses(self, batch: tuple) -> Tensor:
        """Per-sample losses (B,) of the model as it is now on a batch ``(x, y, *extra)``: forward only."""
        inputs, targets, *extra = batch
        return check_per_sample_losses(self.loss_fn(self.model(inputs), targets, *extra), targets.shape[0])

    def engine_plan(self) -> dict[str, list[str]]:
        """For the Gram engine: the layers on the fast path and the parameters on the fallback."""
        if self._gram_engine is None:
            return {"fast_layers": [], "fallback_parameters": list(self.params.names)}
        return self._gram_engine.plan()
