"""The model side of Sven: SvenWrapper and the residual transforms."""

from sven.nn.wrapper import SvenWrapper

__all__ = ["SvenWrapper"]
