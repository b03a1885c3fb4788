"""hvae: hierarchical variational autoencoders with a C core."""
from .model import HVAE

__all__ = ["HVAE"]
__version__ = "0.1.0"
