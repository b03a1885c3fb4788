"""``python -m hvae ...``: the ``hvae`` command line (see :mod:`hvae.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
