"""hvae: hierarchical variational autoencoders with a C core."""
from . import datasets, plotting
from .model import HVAE, load

__all__ = ["HVAE", "load"]
__version__ = "0.1.0"
