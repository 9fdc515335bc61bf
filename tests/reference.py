"""The dense float64 reference every solver and engine is tested against.

Explicit Jacobian of the residuals by ``torch.func.jacrev`` over the batched
forward, ``torch.linalg.svd``, truncation to at most k values with
σ > max(rtol, max(G, n)·ε)·σ_max, and step = V_k Σ_k⁻¹ U_kᵀ r.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

EPS64 = float(torch.finfo(torch.float64).eps)


def reference_residuals_and_jacobian(
    model: nn.Module, loss_fn, batch: tuple, kappa: float = 2.0, microbatch_size: int = 1,
    columns: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(r (G,), M (G, n)) in float64 for the model's trainable parameters (or the given flat columns)."""
    model64 = copy.deepcopy(model).to(torch.float64)
    names = [n for n, p in model64.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model64.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for n, p in model64.named_parameters() if p.requires_grad])
    cols = torch.arange(flat.numel()) if columns is None else columns
    x, y, *extra = (t.to(torch.float64) if t.is_floating_point() else t for t in batch)

    def residuals(sub: Tensor) -> Tensor:
        full = flat.index_put((cols,), sub)
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            size = shape.numel()
            params[name] = full[start:start + size].view(shape)
            start += size
        losses = loss_fn(functional_call(model64, params, (x,)), y, *extra)
        groups = [losses[i:i + microbatch_size].mean() for i in range(0, losses.shape[0], microbatch_size)]
        return torch.stack(groups) ** (kappa / 2)

    sub = flat[cols]
    return residuals(sub).detach(), jacrev(residuals)(sub).detach()


def reference_direction(jacobian: Tensor, residuals: Tensor, k: int, rtol: float, damping: float = 0.0) -> Tensor:
    """M⁺ r with the truncated SVD, float64; with ``damping`` λ > 0 each kept σ gives σ/(σ² + λ)."""
    u, sigma, vh = torch.linalg.svd(jacobian, full_matrices=False)
    cut = max(rtol, max(jacobian.shape) * EPS64) * sigma[0]
    keep = int(((sigma > cut) & (sigma > 0)).sum().clamp(max=k))
    kept = sigma[:keep]
    return vh[:keep].T @ ((u[:, :keep].T @ residuals) * kept / (kept**2 + damping))


def relative_error(actual: Tensor, expected: Tensor) -> float:
    actual, expected = actual.to(torch.float64), expected.to(torch.float64)
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-300))
