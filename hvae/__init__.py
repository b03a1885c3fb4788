"""hvae: hierarchical variational autoencoders with a C core."""
try:
    from . import _core  # noqa: F401
except ImportError as e:  # the wheel's OpenBLAS off the extension's search path (e.g. an
    if "libscipy_openblas" not in str(e):  # editable install's throwaway build environment):
        raise
    import scipy_openblas32  # noqa: F401  (its import loads the library process-wide)
    from . import _core  # noqa: F401
from . import datasets, plotting
from .model import HVAE, load

__all__ = ["HVAE", "load"]
__version__ = "0.1.0"
