"""sven: the Sven optimizer (Singular Value dEsceNt, arXiv 2604.01279) for PyTorch."""

from sven.nn import SvenWrapper
from sven.opt import PolyakSGD, Sven

__version__ = "0.1.0"
__all__ = ["PolyakSGD", "Sven", "SvenWrapper", "__version__"]
