"""hvae: hierarchical variational autoencoders with a C core."""
from . import datasets, plotting
from .checkpoint import load
from .model import HVAE

__all__ = ["HVAE", "load"]
__version__ = "0.1.0"
