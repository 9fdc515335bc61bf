"""Optimizers: Sven and the PolyakSGD baseline; truncated pseudoinverse solvers in ``pinv``."""

from sven.opt.polyak import PolyakSGD
from sven.opt.sven import Sven

__all__ = ["PolyakSGD", "Sven"]
