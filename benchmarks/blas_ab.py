"""Which OpenBLAS hvae links: the scipy-openblas32 wheel's against Debian's libopenblas, measured
in one process on the GEMM shapes of the speed benchmark's layers and on its training steps.

Both builds of hvae._core (the in-place one and one against the other BLAS, built here into a
temporary copy of the sources, as .ci/blas_system.sh does) are loaded side by side; each
measurement alternates short blocks of the two for several rounds and reports the median of
the paired ratios, so that a machine whose speed drifts from minute to minute moves both alike.
Float32, one thread (the core's team runs OpenBLAS at one thread). Writes
benchmarks/results/blas_ab.md.

    python benchmarks/blas_ab.py            # a few minutes on an idle machine
    python benchmarks/blas_ab.py --quick    # a smoke run in seconds
"""
import argparse
import ctypes
import datetime
import importlib.util
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import speed  # noqa: E402  (the speed benchmark's models)

import hvae  # noqa: E402
from hvae import _core  # noqa: E402

BATCHES = (32, 128, 1024)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds per measurement")
    p.add_argument("--block", type=float, default=0.05, help="seconds per block")
    p.add_argument("--models", nargs="+", default=["vae", "hvae2", "hvae5"],
                   choices=list(speed.MODELS))
    p.add_argument("--output", default=os.path.join(HERE, "results", "blas_ab.md"))
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, short blocks")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.block, args.models = 2, 0.005, ["vae"]
    return args


def which_blas(path):
    """'wheel' or 'debian': the OpenBLAS a built hvae._core links (ldd)."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    return "wheel" if "libscipy_openblas" in out else "debian"


def linked_path(path):
    out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    return re.search(r"lib(?:scipy_)?openblas\S* => (\S+)", out).group(1)


def build_other(tmp, other):
    """hvae._core built against the other BLAS in a copy of the sources; returns its path."""
    src = os.path.join(tmp, "src")
    os.makedirs(os.path.join(src, "hvae"))
    for name in ("csrc", "setup.py", "pyproject.toml", "README.md"):
        (shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy)(
            os.path.join(ROOT, name), os.path.join(src, name))
    env = dict(os.environ)
    env.pop("HVAE_BLAS_CFLAGS", None)
    env.pop("HVAE_BLAS_LIBS", None)
    env["HVAE_BLAS_PKG"] = "scipy-openblas32" if other == "wheel" else "openblas"
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--build-temp",
                    os.path.join(tmp, "build")], cwd=src, env=env, check=True,
                   capture_output=True)
    return next(os.path.join(src, "hvae", f) for f in os.listdir(os.path.join(src, "hvae"))
                if f.startswith("_core") and f.endswith(".so"))


def load_core(path):
    """The extension module at path, loaded beside the one hvae imported."""
    spec = importlib.util.spec_from_file_location("hvae._core", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Blas:
    """cblas_sgemm and openblas_set_num_threads of a linked OpenBLAS, prefix or not."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.prefix = "scipy_" if hasattr(self.lib, "scipy_openblas_get_config") else ""

    def __getattr__(self, name):
        return getattr(self.lib, self.prefix + name)


def paired(fa, fb, rounds, block):
    """Median over rounds of (seconds per call of fa) / (of fb), alternating blocks; and the
    median seconds per call of each."""
    def per_call(f):
        n, t0 = 0, time.perf_counter()
        while True:
            f()
            n += 1
            t = time.perf_counter() - t0
            if t >= block:
                return t / n
    fa(), fb()
    ta, tb = [], []
    for r in range(rounds):
        first, second = (fa, fb) if r % 2 == 0 else (fb, fa)
        x, y = per_call(first), per_call(second)
        a, b = (x, y) if r % 2 == 0 else (y, x)
        ta.append(a)
        tb.append(b)
    ratios = [a / b for a, b in zip(ta, tb)]
    return statistics.median(ratios), statistics.median(ta), statistics.median(tb)


def gemm_call(blas, m, n, k, trans_a, trans_b):
    """A row-major C (m x n) = op(A) op(B) of the given transposes, as the core calls it."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c = np.zeros((m, n), np.float32)
    ptr = [ctypes.c_void_p(x.ctypes.data) for x in (a, b, c)]
    args = (101, 112 if trans_a else 111, 112 if trans_b else 111, m, n, k, ctypes.c_float(1.0),
            ptr[0], m if trans_a else k, ptr[1], k if trans_b else n, ctypes.c_float(0.0),
            ptr[2], n)

    def call():
        blas.cblas_sgemm(*args)
    call.keep = (a, b, c)
    return call


def layer_shapes(name):
    """(in, out) of every dense layer of a speed-benchmark model, once each."""
    m = speed.make_model(name, "float32", 0)
    return sorted({s[::-1] for s in (p.shape for p in m.named_params().values()) if len(s) == 2})


def step_call(core_mod, name, batch):
    m = speed.make_model(name, "float32", 0)
    core = core_mod.Model(m.x_dim, m.latent_dims, m.hidden_dims, m.likelihood, m.activation,
                          m.kl, m.deterministic, m.dtype, m.prior_variance, m.inference)
    rng = np.random.default_rng(0)
    x = (rng.random((batch, m.x_dim)) < 0.13).astype(np.float32)  # MNIST's share of ones
    eps = m.draw_eps(batch)
    params = m.params.copy()
    mom, vel, grad = (np.zeros_like(params) for _ in range(3))
    state = {"step": 0}

    def call():
        state["step"] += 1
        core.train_step(params, mom, vel, grad, x, eps, state["step"], lr=1e-6)
    return call


def main(argv=None):
    args = parse_args(argv)
    here = which_blas(_core.__file__)
    other = "debian" if here == "wheel" else "wheel"
    tmp = tempfile.mkdtemp(prefix="hvae-blas-ab.")
    try:
        other_path = build_other(tmp, other)
        mods = {here: _core, other: load_core(other_path)}
        paths = {here: linked_path(_core.__file__), other: linked_path(other_path)}
        blas = {k: Blas(p) for k, p in paths.items()}
        for b in blas.values():
            b.openblas_set_num_threads(1)
        rows = []
        for name in args.models:
            for batch in BATCHES:
                for fan_in, fan_out in layer_shapes(name):
                    # y = x W^T; dW = dy^T x; dx = dy W (the first layer's go through sparse.c
                    # instead, for sparse inputs)
                    for what, shape in (("forward", (batch, fan_out, fan_in, False, True)),
                                        ("weight gradient", (fan_out, fan_in, batch, True, False)),
                                        ("input gradient", (batch, fan_in, fan_out, False, False))):
                        mm, nn, kk = shape[:3]
                        r, tw, td = paired(gemm_call(blas["wheel"], *shape),
                                           gemm_call(blas["debian"], *shape),
                                           args.rounds, args.block)
                        rows.append(("GEMM", f"{name} {what} {mm} x {nn} x {kk}", tw, td, r))
                r, tw, td = paired(step_call(mods["wheel"], name, batch),
                                   step_call(mods["debian"], name, batch), args.rounds,
                                   args.block)
                rows.append(("training step", f"{name} batch {batch}", tw, td, r))
                print(f"{name} batch {batch}: step wheel / debian = {r:.3f}", flush=True)
        write(args, rows, paths)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.output}")
    return 0


def write(args, rows, paths):
    cfg = {}
    for k, p in paths.items():
        b = Blas(p)
        b.openblas_get_config.restype = ctypes.c_char_p
        cfg[k] = b.openblas_get_config().decode()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=HERE).stdout.strip() or "unknown"
    steps = [r[4] for r in rows if r[0] == "training step"]
    gemms = [r[4] for r in rows if r[0] == "GEMM"]
    lines = [
        "# OpenBLAS: the scipy-openblas32 wheel against Debian's libopenblas",
        "",
        f"Written by `benchmarks/blas_ab.py` on {datetime.date.today().isoformat()}, commit "
        f"{commit}, {os.cpu_count()} cores; float32, one thread; {args.rounds} alternating "
        f"rounds of {args.block * 1e3:.0f} ms blocks per row, median of the paired ratios.",
        "",
        f"- wheel: {cfg['wheel']} ({paths['wheel']})",
        f"- Debian: {cfg['debian']} ({paths['debian']})",
        "",
        f"Training steps: wheel / Debian time ratio median {statistics.median(steps):.3f} "
        f"(range {min(steps):.3f} - {max(steps):.3f}); GEMMs: median "
        f"{statistics.median(gemms):.3f} (range {min(gemms):.3f} - {max(gemms):.3f}). "
        "Below 1: the wheel is faster.",
        "",
        "| what | shape (m x n x k) or batch | wheel (us) | Debian (us) | wheel / Debian |",
        "|---|---|---|---|---|",
    ]
    for kind, what, tw, td, r in rows:
        lines.append(f"| {kind} | {what} | {tw * 1e6:.1f} | {td * 1e6:.1f} | {r:.3f} |")
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
