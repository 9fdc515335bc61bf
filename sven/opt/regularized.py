"""Weight decay as the exact minimiser of the step's regularised objective, in rows × rows form.

Each step with a coupled decay λ_j (per column, from the param groups' ``weight_decay``) or
a Fisher decay λ_F solves

    minimise over d:  ‖r + M d‖² + μ‖d‖² + Σ_j λ_j (θ_j + d_j)² + λ_F ‖M(θ + d)‖²

whose normal equations are [(1 + λ_F) MᵀM + D] d = −Mᵀ(r + λ_F Mθ) − Λθ with D = μI + Λ.
Columns with D_j > 0 are "penalised" (P), the others (μ = 0 and λ_j = 0) "free" (Z). With
α = 1 + λ_F, θ̃ = (Λ/D)θ on P (0 on Z), w = r/α + M(λ_F θ/α − θ̃) and the rows × rows
matrices K_Z = α M_Z M_Zᵀ, K_P = α M_P D_P⁻¹ M_Pᵀ, H = I + K_P = L Lᵀ:

    c_Z = L⁻ᵀ (L⁻¹ K_Z L⁻ᵀ)⁺ L⁻¹ √α w,   q = H⁻¹ (√α w − K_Z c_Z),
    d = −√α (M_Zᵀ c_Z ⊕ D_P⁻¹ M_Pᵀ q) − θ̃,

the minimum-norm minimiser (unique when Z is empty). It needs the Gram matrices of the
column classes (one per distinct λ_j), one product M v and one weighted backward Mᵀ[c_Z, q];
never a P × P matrix. k and rtol do not truncate it: the pseudoinverse (L⁻¹ K_Z L⁻ᵀ)⁺ only
drops eigenvalues below the Gram route's numerical floor.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from sven.jacobian.operator import JacobianOperator
from sven.opt.spectrum import Spectrum, eig_floor, gram_eigh


class RegularizedSolve(Spectrum):
    """The exact regularised step for one Jacobian; ``direction(op, r, μ)`` returns −d (cols,).

    Args:
        op: M (rows, cols).
        theta: the parameters θ at M's columns (cols,).
        decay: λ_j per column (cols,), float64.
        fisher_decay: λ_F ≥ 0.
        relative: λ_j are multiples of σ_max² (the largest eigenvalue of M Mᵀ).
    """

    def __init__(self, op: JacobianOperator, theta: Tensor, decay: Tensor, fisher_decay: float,
                 relative: bool) -> None:
        self.gram = op.gram()
        self.theta = theta.to(torch.float64)
        self.fisher_decay = fisher_decay
        self.rtol_used = eig_floor(self.gram.shape[0])
        self.unit = float(self.sigma_all[0]) ** 2 if relative and self.sigma_all.numel() else 1.0
        self.decay = decay.to(torch.float64) * self.unit
        values = torch.unique(self.decay)
        self.class_grams = {float(value): self.gram if values.numel() == 1 else op.masked_gram(self.decay == value)
                            for value in values}

    @cached_property
    def sigma_all(self) -> Tensor:
        """Every singular value of M (√ of the eigenvalues of M Mᵀ), descending."""
        return torch.linalg.eigvalsh(self.gram).clamp(min=0).sqrt().flip(0)

    @property
    def sigma(self) -> Tensor:
        return self.sigma_all

    @property
    def rank_kept(self) -> int:
        return self.gram.shape[0]

    def leading(self, rank: int) -> Spectrum:
        raise ValueError("the regularised step is the exact minimiser over the full spectrum; it has no leading part")

    def direction(self, op: JacobianOperator, residuals: Tensor, damping: float = 0.0) -> Tensor:
        """−d (cols,) in op's dtype for residuals r (rows,) and μ = ``damping`` (absolute units)."""
        mu = damping
        alpha = 1.0 + self.fisher_decay
        penalty = mu + self.decay
        penalised = penalty > 0
        inverse_penalty = torch.where(penalised, 1.0 / penalty.where(penalised, torch.ones_like(penalty)), 0.0)
        theta_shift = self.decay * inverse_penalty * self.theta
        shift = (self.fisher_decay / alpha) * self.theta - theta_shift
        w = residuals.to(torch.float64) / alpha
        if bool(shift.ne(0).any()):
            w = w + op.matmul(shift).to(torch.float64)
        rows = self.gram.shape[0]
        identity = torch.eye(rows, dtype=torch.float64, device=self.gram.device)
        free_gram = torch.zeros_like(self.gram)
        penalised_gram = torch.zeros_like(self.gram)
        for value, gram in self.class_grams.items():
            if mu + value > 0:
                penalised_gram += gram / (mu + value)
            else:
                free_gram += gram
        whitening = Whitening(identity + alpha * penalised_gram)
        target = alpha**0.5 * w
        free_coeffs = self._free_coefficients(whitening, alpha * free_gram, target)
        q = whitening.solve(target - alpha * free_gram @ free_coeffs)
        back = op.rmatmul(torch.stack([free_coeffs, q], dim=1)).to(torch.float64)
        free = ~penalised
        step = alpha**0.5 * (free * back[:, 0] + inverse_penalty * back[:, 1]) + theta_shift
        return step.to(op.dtype)

    @staticmethod
    def _free_coefficients(whitening: Whitening, free_gram: Tensor, target: Tensor) -> Tensor:
        """c_Z = F⁻ᵀ (F⁻¹ K_Z F⁻ᵀ)⁺ F⁻¹ target (rows,) with H = F Fᵀ, zero when no column is free."""
        if not bool(free_gram.ne(0).any()):
            return torch.zeros_like(target)
        whitened = whitening.inverse_factor(whitening.inverse_factor(free_gram).T)
        spectrum = gram_eigh((whitened + whitened.T) / 2, whitened.shape[0], 0.0)
        projected = spectrum.u.project(whitening.inverse_factor(target))
        return whitening.inverse_factor_transposed(spectrum.u.combine(projected / spectrum.sigma**2))


class Whitening:
    """A factor F with H = F Fᵀ for H = I + K, K positive semi-definite (rows, rows) float64.

    Cholesky; when rounding defeats it (‖K‖ far above 1: the backward error n·ε·‖H‖ exceeds H's
    smallest eigenvalue, which is ≥ 1 exactly), the symmetric square root from ``eigh`` with the
    eigenvalues clamped at 1, their exact lower bound.
    """

    def __init__(self, matrix: Tensor) -> None:
        factor, info = torch.linalg.cholesky_ex(matrix)
        self.lower: Tensor | None = factor if int(info) == 0 else None
        if self.lower is None:
            values, self.vectors = torch.linalg.eigh(matrix)
            self.root = values.clamp(min=1.0).sqrt()

    def inverse_factor(self, values: Tensor) -> Tensor:
        """F⁻¹ b for b (rows,) or (rows, m)."""
        columns = values if values.dim() == 2 else values.unsqueeze(1)
        if self.lower is not None:
            solved = torch.linalg.solve_triangular(self.lower, columns, upper=False)
        else:
            solved = self.vectors @ ((self.vectors.T @ columns) / self.root[:, None])
        return solved if values.dim() == 2 else solved.squeeze(1)

    def inverse_factor_transposed(self, values: Tensor) -> Tensor:
        """F⁻ᵀ b for b (rows,) or (rows, m) (F⁻¹ b itself for the symmetric root)."""
        if self.lower is None:
            return self.inverse_factor(values)
        columns = values if values.dim() == 2 else values.unsqueeze(1)
        solved = torch.linalg.solve_triangular(self.lower.T, columns, upper=True)
        return solved if values.dim() == 2 else solved.squeeze(1)

    def solve(self, values: Tensor) -> Tensor:
        """H⁻¹ b."""
        return self.inverse_factor_transposed(self.inverse_factor(values))
