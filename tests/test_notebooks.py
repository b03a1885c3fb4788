"""Execute every notebook in notebooks/ in fast mode (HVAE_NOTEBOOK_FAST=1) and fail on any error.

Each notebook runs in a fresh kernel started from this Python (kernel "python3", which jupyter_client
launches with sys.executable, so the notebooks see the same environment as the tests), with the
notebooks directory as its working directory. The notebook is executed in memory: the committed
files and their saved outputs are never touched. Skips when nbformat, nbclient or ipykernel is not
installed (pip install -e ".[notebooks]").
"""
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds per cell; fast mode needs a few, the margin is for a busy machine


def _missing_tools():
    """The reason to skip, or None when everything needed to execute notebooks is importable."""
    missing = []
    for module in ("nbformat", "nbclient", "ipykernel", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        return (f"executing notebooks needs {', '.join(missing)}: "
                f"pip install -e \".[notebooks]\"")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        return "no 'python3' Jupyter kernel found (is ipykernel installed in this environment?)"
    return None


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_in_fast_mode(path, monkeypatch):
    reason = _missing_tools()
    if reason:
        pytest.skip(reason)
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("HVAE_NOTEBOOK_FAST", "1")  # the kernel inherits this process's environment
    nb = nbformat.read(path, as_version=4)  # in memory: the file on disk is not written back
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    errors = [o for cell in nb.cells if cell.cell_type == "code"
              for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: error outputs {[(e['ename'], e['evalue']) for e in errors]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_stands_alone(path):
    """A notebook uses the installed hvae only: it does not reach into tests/ (nor patch
    sys.path to do so), and its saved outputs show no path of the machine that ran it."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "sys.path" not in code and "import reference" not in code and "tests" not in code
    root = str(NOTEBOOK_DIR.parent.parent)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text = out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
            assert root not in text, (path.name, text[:200])
