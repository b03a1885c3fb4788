"""Sphinx configuration: numpydoc for the API reference, myst-nb for the Markdown pages and for the
notebooks, which are rendered from their saved outputs and never executed here."""
import pathlib
import shutil

import hvae

# the tutorials live in notebooks/ at the repository's root; Sphinx reads copies of them
# (docs/notebooks/, ignored by git; a symbolic link would break their links to one another)
_here = pathlib.Path(__file__).parent
(_here / "notebooks").mkdir(exist_ok=True)
for _nb in sorted((_here.parent / "notebooks").glob("*.ipynb")):
    shutil.copy2(_nb, _here / "notebooks" / _nb.name)

project = "hvae"
release = version = hvae.__version__
copyright = "the hvae authors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_nb",
]

# the notebooks as committed (`make notebooks` re-executes them), outputs included
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
# a notebook's headings are its own outline (one skips from # to ###); not a build error
suppress_warnings = ["myst.header"]

# methods are documented by autodoc's :members:, not by numpydoc's member tables
numpydoc_show_class_members = False
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True}

exclude_patterns = ["_build", "notebooks/.ipynb_checkpoints"]
html_theme = "furo"
html_title = f"hvae {release}"
