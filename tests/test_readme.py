"""The README's ten-line example, run as written on a small copy of binarized MNIST (HVAE_DATA
points at it: the only change), trains below the pixel-marginal plateau and prints comparable
numbers."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import hvae
from hvae import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_example():
    """The Python block under the README's "Ten lines" heading."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## Ten lines\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def pixel_marginal_plateau(X):
    """-log p(x) per example of the model that gives every pixel its mean: the loss a VAE sits
    at while it ignores z."""
    p = np.clip(X.mean(axis=0), 1e-6, 1 - 1e-6)
    return float(-np.mean(X @ np.log(p) + (1 - X) @ np.log(1 - p)))


def test_the_ten_lines_train(tmp_path):
    if not (datasets.data_dir() / "binarized_mnist.npz").exists():
        pytest.skip(f"binarized_mnist.npz not found in {datasets.data_dir()} (set HVAE_DATA)")
    code = readme_example()
    assert len(code.strip().splitlines()) == 10
    small = tmp_path / "data"
    small.mkdir()
    parts = {s: datasets.subset(datasets.load_binarized_mnist(s), n, seed=1)
             for s, n in (("train", 10000), ("valid", 500), ("test", 200))}
    np.savez(small / "binarized_mnist.npz", **{s: x.astype(np.uint8) for s, x in parts.items()})
    env = {**os.environ, "HVAE_DATA": str(small), "OPENBLAS_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    elbo, ll = (float(v) for v in run.stdout.split())
    plateau = pixel_marginal_plateau(parts["train"])
    assert 190 < plateau < 220, plateau
    m = hvae.load(tmp_path / "model.npz")
    assert len(m.history_) == 30 and m.history_[-1]["beta"] == 1.0
    assert m.history_[-1]["loss"] < plateau - 50, (m.history_[-1]["loss"], plateau)
    assert -elbo < plateau - 50 and ll > elbo, (elbo, ll)  # the same images: ll >= ELBO
    assert os.path.getsize(tmp_path / "samples.png") > 1000
