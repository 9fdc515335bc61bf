"""PolyakSGD: gradient descent with the Polyak step size, the paper's baseline."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


class PolyakSGD(torch.optim.Optimizer):
    """θ ← θ − η g with η = min((loss − f_star) / (‖g‖² + eps), max_lr).

    ``step(closure)`` needs a closure that zeroes the gradients, computes the
    (scalar, mean) loss, calls ``backward()`` and returns the loss.
    """

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict], f_star: float = 0.0, max_lr: float = 1.0, eps: float = 1e-8
    ) -> None:
        if not max_lr >= 0:
            raise ValueError(f"max_lr must be >= 0; got {max_lr}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0; got {eps}")
        super().__init__(params, dict(f_star=f_star, max_lr=max_lr, eps=eps))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise TypeError("PolyakSGD.step needs a closure that computes the loss and calls backward()")
        with torch.enable_grad():
            loss = closure()
        for group in self.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            squared_norm = sum(float(g.double().pow(2).sum()) for g in grads)
            gap = float(loss) - group["f_star"]
            step_size = min(max(gap, 0.0) / (squared_norm + group["eps"]), group["max_lr"])
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-step_size)
        return loss
