"""Speed of one hvae training step against peers measured in the same run.

One training step is one call of the core's fused step (`_core.Model.train_step`: forward +
backward + Adam, the numbers of `HVAE.loss_and_grad` + `hvae._core.adam_update`), as `fit` takes
it; with k > 1 threads the core's team of k threads splits each layer's work. The noise eps
and the batches are drawn before the timed region, for every implementation alike (a pool of 4
batches is cycled). Peers:

- torch: the same network and loss in PyTorch on the CPU (benchmarks/torch_peer.py), the same
  parameter values and eps, `torch.optim.Adam`; threads set with `torch.set_num_threads`. For
  the *-topdown models (DESIGN.md section 6: deterministic bottom-up pass, precision-weighted
  merge, closed-form KL between two diagonal Gaussians) the twin runs the same top-down chain.
- numpy: the float64 NumPy reference `tests/reference.py` plus a NumPy Adam step.

Before timing, a guard checks on every model and dtype that the peers compute what hvae computes
(loss, gradient and one Adam step); the run aborts if not. BLAS threads of hvae (the OpenBLAS it
links) and of NumPy are set with threadpoolctl. The GEMM peak is that of the OpenBLAS hvae links,
called through ctypes. Each figure is the median over repeats of the mean time of a block of
steps, after a warm-up; the blocks of hvae and its peers alternate. Also timed: one MNIST-sized
epoch of hvae2 at batch 100 in float32. Run it on an otherwise idle machine: the load average is
recorded, and a warning printed when other processes compete for the CPUs.

    .venv/bin/python benchmarks/speed.py            # the full run, writes benchmarks/results/speed.md
    .venv/bin/python benchmarks/speed.py --quick    # a smoke run of a few seconds
"""
import argparse
import ctypes
import datetime
import gc
import itertools
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import threadpoolctl

import hvae
from hvae import _core

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import reference  # noqa: E402  (tests/reference.py, the NumPy twin)

try:
    import torch
except ImportError:
    torch = None
else:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from torch_peer import TorchHVAE  # noqa: E402

HVAE2 = dict(x_dim=784, latent_dims=[100, 50], hidden_dims=[[200, 200], [100, 100]],
             activation="tanh")
HVAE5 = dict(x_dim=784, latent_dims=[64, 32, 16, 8, 4],
             hidden_dims=[[512, 512], [256, 256], [128, 128], [64, 64], [32, 32]],
             activation="tanh")
# top-down (Ladder VAE, DESIGN.md section 6) with its default, a learned variance of
# p(z_i | z_{i+1}): decoders 2..T output [m, s], twice as wide; encoder i >= 2 reads d_{i-1}
TOP_DOWN = dict(inference="top_down", prior_variance="learned")
MODELS = {
    "vae": dict(x_dim=784, latent_dims=[20], hidden_dims=[[400]], activation="relu"),
    "hvae2": HVAE2,
    "hvae2-topdown": dict(HVAE2, **TOP_DOWN),
    "hvae5": HVAE5,
    "hvae5-topdown": dict(HVAE5, **TOP_DOWN),
}
DTYPES = ("float32", "float64")
PEERS = ("torch", "numpy")
LR = 1e-3
POOL = 4  # batches cycled through by every timed loop
EPOCH = dict(model="hvae2", batch=100, dtype="float32")
# the project's targets (float32, best thread count of each side)
TARGET_RATIO = {32: 3.0, 128: 2.0, 1024: 1.3}
TARGET_PEAK = 0.75  # of the GEMM peak at batch 1024
TARGET_EPOCH = 1.5  # seconds
# guard tolerances: (loss relative, gradient max-abs relative to max |grad|, params after Adam)
GUARD_TOL = {"float32": (1e-4, 1e-3, 1e-6), "float64": (1e-10, 1e-8, 1e-12)}


# ----------------------------------------------------------------------------------------------
# arguments

def parse_args(argv=None):
    """The command line; --quick overrides the sizes, and torch drops out when absent."""
    p = argparse.ArgumentParser(
        description="Time one hvae training step (forward + backward + Adam) against PyTorch "
                    "and the NumPy reference, report GFLOP/s against the OpenBLAS GEMM peak, "
                    "time one MNIST-sized epoch, and check the project's speed targets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                   help="models to time: vae = 784-400-20 ReLU; hvae2 = IWAE two-level "
                        "(100, 50), tanh; hvae5 = five levels 64-32-16-8-4, tanh; "
                        "*-topdown = the same sizes with top-down (Ladder VAE) inference and "
                        "a learned prior variance")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES),
                   help="floating-point types of hvae and torch (the NumPy reference is always "
                        "float64)")
    p.add_argument("--batches", nargs="+", type=int, default=[32, 128, 1024],
                   help="batch sizes")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                   help="BLAS threads for hvae and NumPy (threadpoolctl), intra-op threads "
                        "for torch (torch.set_num_threads)")
    p.add_argument("--passes", type=int, default=3,
                   help="passes over all cases (steps and epochs), one after the other; each "
                        "figure is the median over the passes, and the spread is reported (the "
                        "speed of a 2-vCPU VM changes from one minute to the next)")
    p.add_argument("--repeats", type=int, default=7,
                   help="timed repeats per case and pass; their median is the pass's figure")
    p.add_argument("--min-time", type=float, default=0.05,
                   help="seconds one timed repeat lasts at least (steps per repeat are "
                        "calibrated from the warm-up)")
    p.add_argument("--warmup", type=float, default=0.2,
                   help="seconds of untimed warm-up steps before each case (at least 2 steps)")
    p.add_argument("--settle", type=float, default=0.1,
                   help="seconds idle before each timed block with more than 1 thread (the "
                        "previous implementation's worker threads stop spinning)")
    p.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS),
                   help="peers to time (none: hvae alone); torch is skipped with a note when "
                        "it is not importable")
    p.add_argument("--torch-adam", choices=("default", "foreach", "fused"), default="default",
                   help="implementation of torch.optim.Adam: default (what "
                        "torch.optim.Adam(params, lr) picks on the CPU), foreach=True or "
                        "fused=True")
    p.add_argument("--numpy-batches", nargs="*", type=int, default=[32, 128],
                   help="batch sizes at which the (slow) NumPy reference is timed")
    p.add_argument("--numpy-repeats", type=int, default=3,
                   help="timed repeats of the NumPy reference (median)")
    p.add_argument("--gemm-size", type=int, default=2048,
                   help="n of the square n x n x n GEMM that measures the BLAS peak")
    p.add_argument("--epoch-examples", type=int, default=50000,
                   help="examples in the timed epoch (0 skips the epoch); the first rows of "
                        "the binarized MNIST train split, or random binary data without it")
    p.add_argument("--epoch-repeats", type=int, default=3,
                   help="timed epochs per implementation and thread count (median)")
    p.add_argument("--data", type=Path,
                   default=Path(os.environ.get("HVAE_DATA", ROOT.parent / "shared" / "data"))
                   / "binarized_mnist.npz",
                   help="binarized MNIST .npz (key 'train'); random binary data when absent")
    p.add_argument("--memory-batches", nargs="*", type=int, default=[100, 1024],
                   help="batch sizes at which the peak resident memory of a training run is "
                        "measured, each model in a fresh process (none: skipped)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)  # MODEL:BATCH, the child's side
    p.add_argument("--seed", type=int, default=0, help="seed of parameters, data and noise")
    p.add_argument("--quick", action="store_true",
                   help="smoke run of a few seconds: float32, batch 32, 1 thread, 3 short "
                        "repeats, a 2000-example epoch, a 512 GEMM; writes no file unless "
                        "--output is given")
    p.add_argument("--output", type=Path, default=None,
                   help="markdown file for the results; None means benchmarks/results/speed.md, or "
                        "no file with --quick")
    args = p.parse_args(argv)
    if args.quick:
        args.dtypes, args.batches, args.threads = ["float32"], [32], [1]
        args.repeats, args.min_time, args.warmup = 3, 0.01, 0.02
        args.numpy_batches, args.numpy_repeats = [32], 1
        args.gemm_size, args.epoch_examples, args.epoch_repeats = 512, 2000, 1
        args.passes, args.memory_batches = 1, [32]
    elif args.output is None:
        args.output = ROOT / "benchmarks" / "results" / "speed.md"
    if torch is None and "torch" in args.peers:
        print("note: torch is not importable; the PyTorch peer is skipped "
              "(install: .venv/bin/pip install torch==2.13.0)")
        args.peers = [q for q in args.peers if q != "torch"]
    return args


# ----------------------------------------------------------------------------------------------
# machine, libraries, GEMM peak

def run(cmd):
    """stdout of a command, stripped, or '' when it fails."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def linked_openblas():
    """Path of the OpenBLAS that hvae._core links (ldd: Debian's libopenblas or the
    scipy-openblas32 wheel's libscipy_openblas), else the wheel's (loaded by hvae's import)."""
    for line in run(["ldd", _core.__file__]).splitlines():
        found = re.search(r"(lib(?:scipy_)?openblas\S*) => (\S+)", line)
        if found and found.group(2) != "not":
            return found.group(2)
    import scipy_openblas32
    return str(Path(scipy_openblas32.get_lib_dir()) / scipy_openblas32.get_library(fullname=True))


class OpenBLAS:
    """The OpenBLAS hvae._core links, through ctypes, under the plain names (cblas_sgemm,
    openblas_get_config, ...) whether or not its symbols carry the wheel's prefix "scipy_"."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.prefix = "scipy_" if hasattr(self.lib, "scipy_openblas_get_config") else ""

    def __getattr__(self, name):
        return getattr(self.lib, self.prefix + name)


def machine_info(blas):
    """What the results depend on: machine, date, commit, library versions, load."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    blas.openblas_get_config.restype = ctypes.c_char_p
    blas.openblas_get_corename.restype = ctypes.c_char_p
    numpy_blas = [i for i in threadpoolctl.threadpool_info()
                  if i["user_api"] == "blas" and "numpy" in i["filepath"]]
    commit = run(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    if run(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += " (working tree modified)"
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{os.cpu_count()} CPUs (nproc {run(['nproc']) or '?'}), {cpu}",
        "git commit": commit,
        "python": platform.python_version(),
        "hvae": hvae.__version__,
        "hvae's BLAS": f"{blas.openblas_get_config().decode()} (core "
                       f"{blas.openblas_get_corename().decode()}), {linked_openblas()}",
        "numpy": np.__version__ + (f" (BLAS: {numpy_blas[0]['internal_api']} "
                                   f"{numpy_blas[0]['version']})" if numpy_blas else ""),
        "torch": torch.__version__ if torch is not None else "not installed",
        "threadpoolctl": threadpoolctl.__version__,
        "load average at start (1, 5, 15 min)": load_average(),
    }


def load_average():
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_seconds():
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and its
    children): their difference over a run is what other processes took."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(v) for k, v in enumerate(fields) if k not in (3, 4))  # all but idle, iowait
    own = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy / os.sysconf("SC_CLK_TCK"), sum(r.ru_utime + r.ru_stime for r in own)


def others_share(start, end, seconds):
    """The fraction of the machine's CPU time that other processes took between two
    cpu_seconds() readings `seconds` apart."""
    others = (end[0] - start[0]) - (end[1] - start[1])
    return max(others, 0.0) / (seconds * os.cpu_count())


def busy_warning(share):
    """A warning when other processes took more than 5% of the CPU time during the run, else
    None. (The load average counts this benchmark's own threads and what ran just before.)"""
    if share <= 0.05:
        return None
    return (f"WARNING: the machine was busy: other processes took {share:.0%} of the CPU time "
            "during the run: absolute times, GFLOP/s and % of peak are pessimistic, and the "
            "ratios, though measured in alternating blocks, are disturbed too. Re-run on an idle "
            "machine.")


def gemm_peak(blas, dtype, threads, n):
    """GFLOP/s of an n x n x n GEMM of the linked OpenBLAS at `threads` threads (median of 5)."""
    real = ctypes.c_float if dtype == "float32" else ctypes.c_double
    gemm = blas.cblas_sgemm if dtype == "float32" else blas.cblas_dgemm
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(dtype) for _ in range(2))
    c = np.zeros((n, n), dtype)
    ptr = [ctypes.c_void_p(arr.ctypes.data) for arr in (a, b, c)]
    row_major, no_trans = 101, 111
    call = (row_major, no_trans, no_trans, n, n, n, real(1.0), ptr[0], n, ptr[1], n, real(0.0),
            ptr[2], n)
    blas.openblas_set_num_threads(threads)
    gemm(*call)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        gemm(*call)
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------------------------
# models, data, FLOPs

def make_model(name, dtype, seed):
    """A fresh hvae model of MODELS[name]: the same parameter values for a given seed."""
    return hvae.HVAE(**MODELS[name], likelihood="bernoulli", kl="analytic", dtype=dtype, seed=seed)


def step_flops(m, batch):
    """GEMM FLOPs of one dense forward + backward (what PyTorch computes): 2*B*in*out per linear
    forward, twice that in the backward (weight and input gradients), minus the input gradient
    of the first layer."""
    total = 0
    for name, w in m.named_params().items():
        if name.endswith(".weight"):
            out, inp = w.shape
            total += 6 * batch * inp * out - (2 * batch * inp * out if name == "enc1.0.weight"
                                              else 0)
    return total


def done_flops(m, pool):
    """The FLOPs hvae's step does, averaged over the pool: step_flops, except that a batch of
    at least _core.SPARSE_MIN_BATCH rows with at most a quarter of x nonzero takes the first
    layer's forward and weight gradient at 2*nnz*out each (csrc/layers.c) instead of 2*B*in*out."""
    out, inp = m.named_params()["enc1.0.weight"].shape
    total = 0
    for x, _ in pool:
        B, nnz = x.shape[0], int(np.count_nonzero(x))
        total += step_flops(m, B)
        if B >= _core.SPARSE_MIN_BATCH and nnz <= B * inp // 4:
            total -= 4 * B * inp * out - 4 * nnz * out
    return total / len(pool)


def load_data(path, seed):
    """(binary float64 rows, description): MNIST's train split, or random binary data."""
    if path.is_file():
        with np.load(path) as archive:
            return archive["train"].astype(np.float64), f"binarized MNIST train split ({path})"
    rng = np.random.default_rng(seed)
    return ((rng.random((50000, 784)) < 0.13).astype(np.float64),
            f"random binary data, {path} absent")


def batch_pool(data, m, batch, seed):
    """POOL pairs (x (B, D), eps list) in the model's dtype, drawn before any timing."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(POOL):
        idx = rng.choice(len(data), batch, replace=len(data) < batch)
        eps = [rng.standard_normal((batch, d)).astype(m.dtype) for d in m.latent_dims]
        pool.append((np.ascontiguousarray(data[idx], dtype=m.dtype), eps))
    return pool


# ----------------------------------------------------------------------------------------------
# one training step of each implementation

def hvae_stepper(m, pool, threads=1):
    """step(): one hvae training step on the next batch of the pool, on the core's team of
    `threads` threads."""
    g = np.empty_like(m.params)
    m1, m2 = np.zeros_like(g), np.zeros_like(g)
    batches, count = itertools.cycle(pool), itertools.count(1)

    def step():
        x, eps = next(batches)
        m._core.train_step(m.params, m1, m2, g, x, eps, next(count), lr=LR, threads=threads)
    return step


def torch_adam(net, variant):
    """torch.optim.Adam over net's parameters: the default, foreach or fused implementation."""
    kw = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[variant]
    return torch.optim.Adam(net.parameters(), lr=LR, **kw)


def torch_stepper(m, pool, adam):
    """step(): one PyTorch training step of m's twin on the next batch of the pool."""
    net = TorchHVAE(m)
    opt = torch_adam(net, adam)
    batches = itertools.cycle([(torch.from_numpy(x), [torch.from_numpy(e) for e in eps])
                               for x, eps in pool])

    def step():
        x, eps = next(batches)
        opt.zero_grad(set_to_none=True)
        net(x, eps).backward()
        opt.step()
    return step


def numpy_adam(p, m1, m2, g, t):
    """One bias-corrected Adam step in place, as hvae's and torch's."""
    m1 *= 0.9
    m1 += 0.1 * g
    m2 *= 0.999
    m2 += 0.001 * g * g
    p -= LR * (m1 / (1 - 0.9 ** t)) / (np.sqrt(m2 / (1 - 0.999 ** t)) + 1e-8)


def reference_loss_and_grad(m, params, x, eps):
    """tests/reference.py's (loss, grad) for m's architecture at params (float64)."""
    return reference.loss_and_grad(
        params, x, x, eps, x_dim=m.x_dim, latent_dims=m.latent_dims, hidden_dims=m.hidden_dims,
        likelihood=m.likelihood, activation=m.activation, kl=m.kl, deterministic=False, beta=1.0,
        prior_variance=m.prior_variance, inference=m.inference)


def numpy_stepper(m, pool):
    """step(): one training step of the NumPy reference on the next batch of the pool."""
    p = m.params.astype(np.float64)
    m1, m2 = np.zeros_like(p), np.zeros_like(p)
    batches = itertools.cycle([(x.astype(np.float64), [e.astype(np.float64) for e in eps])
                               for x, eps in pool])
    count = itertools.count(1)

    def step():
        x, eps = next(batches)
        _, g = reference_loss_and_grad(m, p, x, eps)
        numpy_adam(p, m1, m2, g, next(count))
    return step


def time_interleaved(steps, repeats, min_time, warmup, settle):
    """Median seconds per step of each implementation in `steps` (name -> step()).

    Each is warmed up for `warmup` seconds (at least 2 steps), which calibrates its block to last
    >= min_time; then blocks of the implementations alternate, repeats[name] blocks each, so a
    change in the machine's background load hits all alike. Before each block the machine idles
    `settle` seconds: the previous implementation's BLAS / OpenMP threads stop spinning.
    """
    per_block = {}
    for name, step in steps.items():
        n, t0 = 0, time.perf_counter()
        while n < 2 or time.perf_counter() - t0 < warmup:
            step()
            n += 1
        per_block[name] = max(1, int(np.ceil(min_time / ((time.perf_counter() - t0) / n))))
    times = {name: [] for name in steps}
    gc.disable()
    try:
        for r in range(max(repeats.values())):
            for name, step in steps.items():
                if r >= repeats[name]:
                    continue
                time.sleep(settle)
                t0 = time.perf_counter()
                for _ in range(per_block[name]):
                    step()
                times[name].append((time.perf_counter() - t0) / per_block[name])
    finally:
        gc.enable()
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------------------------
# the correctness guard

def guard(name, dtype, data, peers, adam, seed):
    """Abort unless torch gives hvae's loss and gradient in `dtype` for the same parameters and
    eps and takes hvae's Adam step, and the NumPy reference gives hvae's float64 loss and
    gradient."""
    m = make_model(name, dtype, seed)
    x, eps = batch_pool(data, m, 32, seed)[0]
    loss, grad = m.loss_and_grad(x, eps)
    tol_loss, tol_grad, tol_step = GUARD_TOL[dtype]

    def check(what, got, want, tol):
        err = float(np.max(np.abs(np.asarray(got, np.float64) - want)) /
                    max(float(np.max(np.abs(want))), 1e-300))
        if not err <= tol:
            raise SystemExit(f"guard failed: {name} {dtype}: {what} differs from hvae's by "
                             f"{err:.3g} (relative; tolerance {tol:g}). Not timing unequal work.")

    if "torch" in peers:
        net = TorchHVAE(m)
        loss_t = net(torch.from_numpy(x), [torch.from_numpy(e) for e in eps])
        loss_t.backward()
        check("torch's loss", loss_t.item(), np.float64(loss), tol_loss)
        check("torch's gradient", net.flat(grads=True), grad.astype(np.float64), tol_grad)
        opt = torch_adam(net, adam)
        shapes = [p.shape for p in m.named_params().values()]
        pieces = np.split(grad, np.cumsum([int(np.prod(s)) for s in shapes])[:-1])
        for p, g, s in zip(net.hvae_named().values(), pieces, shapes):
            p.grad = torch.from_numpy(g.reshape(s).copy())
        opt.step()
        m1, m2 = np.zeros_like(grad), np.zeros_like(grad)
        _core.adam_update(m.params, m1, m2, grad, 1, lr=LR)
        check("torch's Adam step", net.flat(), m.params.astype(np.float64), tol_step)
    if "numpy" in peers:
        m = make_model(name, "float64", seed)
        x, eps = x.astype(np.float64), [e.astype(np.float64) for e in eps]
        loss, grad = m.loss_and_grad(x, eps)
        loss_r, grad_r = reference_loss_and_grad(m, m.params, x, eps)
        tol_loss, tol_grad, _ = GUARD_TOL["float64"]
        check("the NumPy reference's loss", loss_r, np.float64(loss), tol_loss)
        check("the NumPy reference's gradient", grad_r, grad, tol_grad)


# ----------------------------------------------------------------------------------------------
# one MNIST-sized epoch: gather shuffled batches, draw eps, step (all inside the timed region)

def hvae_epoch(m, X, batch, rng):
    """One shuffled epoch of hvae training steps, as torch_epoch does it."""
    g = np.empty_like(m.params)
    m1, m2 = np.zeros_like(g), np.zeros_like(g)
    order = rng.permutation(len(X))
    for t, k in enumerate(range(0, len(X) - batch + 1, batch), start=1):
        m._core.train_step(m.params, m1, m2, g, X[order[k:k + batch]], m.draw_eps(batch), t,
                           lr=LR)


def hvae_fit_epoch(m, X, batch, n_jobs=None):
    """One more epoch of the public training loop (fit's epochs count the run's, so each call
    is partial_fit's one epoch)."""
    m.partial_fit(X, batch_size=batch, lr=LR, n_jobs=n_jobs)


def torch_epoch(net, opt, X, batch):
    """One shuffled epoch of PyTorch training steps."""
    order = torch.randperm(len(X))
    for k in range(0, len(X) - batch + 1, batch):
        eps = [torch.randn(batch, d, dtype=X.dtype) for d in net.latent_dims]
        opt.zero_grad(set_to_none=True)
        net(X[order[k:k + batch]], eps).backward()
        opt.step()


def time_epochs(run_epoch, X, repeats):
    """Median seconds of run_epoch(X) over `repeats`, after a warm-up on 10% of X."""
    run_epoch(X[:max(len(X) // 10, 1)])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_epoch(X)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_epochs(args, data):
    """[(implementation, threads, seconds)] for one epoch of EPOCH's model."""
    X = np.ascontiguousarray(data[:args.epoch_examples], dtype=EPOCH["dtype"])
    B, out = EPOCH["batch"], []
    for th in args.threads:
        with threadpoolctl.threadpool_limits(th, user_api="blas"):
            m = make_model(EPOCH["model"], EPOCH["dtype"], args.seed)
            rng = np.random.default_rng(args.seed)
            out.append(("hvae: train_step loop", th,
                        time_epochs(lambda X: hvae_epoch(m, X, B, rng), X, args.epoch_repeats)))
            m = make_model(EPOCH["model"], EPOCH["dtype"], args.seed)
            out.append(("hvae: HVAE.partial_fit", th,
                        time_epochs(lambda X: hvae_fit_epoch(m, X, B), X, args.epoch_repeats)))
        if th > 1:  # the core's team of th threads
            m = make_model(EPOCH["model"], EPOCH["dtype"], args.seed)
            out.append((f"hvae: HVAE.partial_fit(n_jobs={th})", th,
                        time_epochs(lambda X: hvae_fit_epoch(m, X, B, n_jobs=th), X,
                                    args.epoch_repeats)))
        if "torch" in args.peers:
            torch.set_num_threads(th)
            net = TorchHVAE(make_model(EPOCH["model"], EPOCH["dtype"], args.seed))
            opt = torch_adam(net, args.torch_adam)
            out.append(("torch: the same loop", th,
                        time_epochs(lambda X: torch_epoch(net, opt, X, B), torch.from_numpy(X),
                                    args.epoch_repeats)))
        for name, threads, sec in out[-4:]:
            if threads == th:
                print(f"  epoch  {name:<40} {th} thr  {sec:7.3f} s", flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# the step benchmark

def measure_steps(args, data, peaks, first):
    """One row per (model, dtype, batch, threads): seconds per step of hvae and its peers, in
    one pass over the cases. Only the first pass runs the guard and times the (slow) NumPy
    reference.

    The fraction of peak in the progress lines is against `peaks` (measured before the steps).
    """
    rows, numpy_done = [], {}
    print("  " + "  ".join(STEP_HEADERS), flush=True)
    for name in args.models:
        for dtype in args.dtypes:
            if first:
                guard(name, dtype, data, args.peers, args.torch_adam, args.seed)
            for B in args.batches:
                pool = batch_pool(data, make_model(name, dtype, args.seed), B, args.seed)
                for th in args.threads:
                    m = make_model(name, dtype, args.seed)
                    # hvae with th > 1 threads: the core's team of th threads (the core sets
                    # its OpenBLAS to one thread meanwhile)
                    steps = {"hvae": hvae_stepper(m, pool, threads=th)}
                    repeats = {"hvae": args.repeats}
                    if "torch" in args.peers:
                        torch.set_num_threads(th)
                        steps["torch"] = torch_stepper(make_model(name, dtype, args.seed), pool,
                                                       args.torch_adam)
                        repeats["torch"] = args.repeats
                    # the reference computes in float64 whatever the dtype: timed once per case
                    if (first and "numpy" in args.peers and B in args.numpy_batches
                            and (name, B, th) not in numpy_done):
                        steps["numpy"] = numpy_stepper(make_model(name, "float64", args.seed),
                                                       pool)
                        repeats["numpy"] = args.numpy_repeats
                    with threadpoolctl.threadpool_limits(th, user_api="blas"):
                        sec = time_interleaved(steps, repeats, args.min_time, args.warmup,
                                               args.settle if th > 1 else 0.0)
                    if "numpy" in sec:
                        numpy_done[(name, B, th)] = sec["numpy"]
                    row = dict(model=name, dtype=dtype, batch=B, threads=th, hvae=sec["hvae"],
                               torch=sec.get("torch"), numpy=numpy_done.get((name, B, th)),
                               flops=step_flops(m, B), done=done_flops(m, pool))
                    row["gflops"] = row["flops"] / row["hvae"] / 1e9
                    row["peak"] = row["gflops"] / peaks[(dtype, th)]
                    rows.append(row)
                    print("  " + "  ".join(c.rjust(len(h)) for c, h in
                                          zip(step_cells(row), STEP_HEADERS)), flush=True)
    return rows


def combine_steps(passes):
    """The rows of several passes as one: each time the median over the passes that measured
    it, with its (min, max) under key + "_range"."""
    rows = []
    for same in zip(*passes):
        r = dict(same[0])
        for key in ("hvae", "torch", "numpy"):
            vals = [p[key] for p in same if p.get(key) is not None]
            r[key] = statistics.median(vals) if vals else None
            r[key + "_range"] = (min(vals), max(vals)) if len(vals) > 1 else None
        r["gflops"] = r["flops"] / r["hvae"] / 1e9
        rows.append(r)
    return rows


def combine_epochs(passes):
    """[(implementation, threads, median seconds, (min, max) or None)] over the passes."""
    out = []
    for same in zip(*passes):
        secs = [sec for _, _, sec in same]
        out.append((same[0][0], same[0][1], statistics.median(secs),
                    (min(secs), max(secs)) if len(secs) > 1 else None))
    return out


# ----------------------------------------------------------------------------------------------
# memory

MEMORY_STEPS = 20  # training steps of the measured run
MIB = 2.0 ** 20


def status_kib(field):
    """A size from /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def memory_child(spec):
    """In a fresh process: resident memory before and at the peak of fit(n_jobs=2) on
    MEMORY_STEPS batches of random binary data; prints one JSON line."""
    name, batch = spec.split(":")
    batch = int(batch)
    X = (np.random.default_rng(0).random((batch * MEMORY_STEPS, 784)) < 0.13).astype(np.float32)
    m = make_model(name, "float32", 0)
    acts = sum(w.shape[0] for k, w in m.named_params().items() if k.endswith(".bias"))
    acts += sum(m.latent_dims)
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    m.fit(X, epochs=1, batch_size=batch, lr=LR, progress=False, n_jobs=2)
    print(json.dumps(dict(before=before, peak=status_kib("VmHWM"), n_params=m.n_params,
                          acts_per_example=acts)))


def measure_memory(args):
    """Rows (model, batch, parameters, moments, activations, before, peak, increase, ratio) for
    each model and memory batch, each in a fresh interpreter; float32."""
    rows = []
    for name in args.models:
        for B in args.memory_batches:
            out = subprocess.run([sys.executable, __file__, "--memory-child", f"{name}:{B}"],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            moments = 3 * 4 * r["n_params"]  # gradient + Adam's two moments, float32
            acts = 2 * 4 * B * r["acts_per_example"]  # activations + their gradients
            rise = r["peak"] - r["before"]
            rows.append([name, B, r["n_params"], f"{moments / MIB:.1f}", f"{acts / MIB:.1f}",
                         f"{r['before'] / MIB:.0f}", f"{r['peak'] / MIB:.0f}",
                         f"{rise / MIB:.1f}", f"{rise / (moments + acts):.2f}"])
            print("  memory  " + "  ".join(map(str, rows[-1])), flush=True)
    return rows


MEMORY_HEADERS = ["model", "batch", "parameters", "gradient + Adam moments (MiB)",
                  "activations + gradients (MiB)", "RSS before fit (MiB)", "peak RSS (MiB)",
                  "rise during fit (MiB)", "rise / (moments + activations)"]


# ----------------------------------------------------------------------------------------------
# tables

STEP_HEADERS = ["model", "dtype", "batch", "threads", "hvae ms/step", "hvae spread",
                "hvae GFLOP/s", "% GEMM peak", "FLOPs done", "torch ms/step", "torch spread",
                "hvae speed / torch", "numpy ms/step", "hvae speed / numpy"]


def ms(sec):
    """Milliseconds to 3 significant digits, never in exponent notation."""
    if sec is None:
        return "-"
    return f"{sec * 1e3:.0f}" if sec >= 0.1 else f"{sec * 1e3:.3g}"


def spread(lo_hi):
    """'min-max' in milliseconds over the passes, or '-'."""
    return "-" if lo_hi is None else f"{ms(lo_hi[0])}-{ms(lo_hi[1])}"


def ratio(peer, own):
    """hvae's step rate over the peer's."""
    return "-" if peer is None else f"{peer / own:.2f}x"


def step_cells(r):
    """A row of the step table as strings, in STEP_HEADERS order."""
    return [r["model"], r["dtype"], str(r["batch"]), str(r["threads"]), ms(r["hvae"]),
            spread(r.get("hvae_range")), f"{r['gflops']:.1f}", f"{100 * r['peak']:.0f}%",
            f"{100 * r['done'] / r['flops']:.0f}%", ms(r.get("torch")), spread(r.get("torch_range")), ratio(r.get("torch"), r["hvae"]),
            ms(r.get("numpy")), ratio(r.get("numpy"), r["hvae"])]


def text_table(headers, rows):
    """Right-aligned columns for the terminal."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line("-" * w for w in widths), *map(line, rows)])


def md_table(headers, rows):
    """A markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def best(rows, key):
    """(seconds, threads) of the fastest thread count among rows, or None."""
    timed = [(r[key], r["threads"]) for r in rows if r.get(key) is not None]
    return min(timed) if timed else None


def summary(args, rows, epochs, peaks):
    """[(target, measured, verdict)] for the project's targets."""
    out = []
    verdict = lambda ok: "MET" if ok else "NOT MET"  # noqa: E731
    for name in args.models:
        for B, want in TARGET_RATIO.items():
            case = [r for r in rows if (r["model"], r["dtype"], r["batch"]) ==
                    (name, "float32", B)]
            if not case:
                continue
            (own, th_own), peer = best(case, "hvae"), best(case, "torch")
            if peer is None:
                out.append((f"{name} B={B}: >= {want}x torch", "torch not measured", "n/a"))
            else:
                out.append((f"{name} B={B}: >= {want}x torch",
                            f"hvae {ms(own)} ms ({th_own} thr), torch {ms(peer[0])} ms "
                            f"({peer[1]} thr): {peer[0] / own:.2f}x",
                            verdict(peer[0] / own >= want)))
            if B == 1024:
                r = next(r for r in case if r["threads"] == th_own)
                peak = max(peaks[("float32", th_own)])
                frac, done = r["gflops"] / peak, r["done"] / r["flops"]
                out.append((f"{name} B=1024: >= {TARGET_PEAK:.0%} of GEMM peak",
                            f"{r['gflops']:.1f} of {peak:.1f} GFLOP/s ({th_own} thr): "
                            f"{frac:.0%} (dense-equivalent; the {done:.0%} of those FLOPs "
                            f"done run at {frac * done:.0%} of peak)",
                            verdict(frac >= TARGET_PEAK)))
    hv = [(sec, th, name) for name, th, sec, _ in epochs if name.startswith("hvae")]
    if hv and args.epoch_examples == 50000:
        fit = min((s, th) for s, th, name in hv if "fit" in name)
        loop = min((s, th) for s, th, name in hv if "loop" in name)
        out.append((f"MNIST epoch, {EPOCH['model']} B={EPOCH['batch']}: < {TARGET_EPOCH} s",
                    f"HVAE.partial_fit {fit[0]:.2f} s ({fit[1]} thr), bare loop "
                    f"{loop[0]:.2f} s ({loop[1]} thr)", verdict(fit[0] < TARGET_EPOCH)))
    return out


def report(args, info, peaks, rows, epochs, memory, data_note, warning):
    """(text for stdout, markdown); warning: busy_warning's, or None."""
    steps = [step_cells(r) for r in rows]
    peak_rows = [[dt, th, f"{a:.1f}", f"{b:.1f}", f"{max(a, b):.1f}"]
                 for (dt, th), (a, b) in sorted(peaks.items())]
    epoch_rows = [[name, th, f"{sec:.3f}", "-" if lo_hi is None else
                   f"{lo_hi[0]:.3f}-{lo_hi[1]:.3f}"] for name, th, sec, lo_hi in epochs]
    goals = [list(g) for g in summary(args, rows, epochs, peaks)]
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/speed.py",
                                                 *sys.argv[1:]])
    method = (
        "One step = one `train_step` call (forward + backward + Adam, lr 1e-3, the numbers of "
        "`loss_and_grad` + `adam_update`); torch: "
        "`zero_grad` + forward + `backward` + `torch.optim.Adam.step` "
        f"({args.torch_adam}); numpy: `tests/reference.py` (always float64) + a NumPy Adam. "
        f"x and eps pre-drawn outside the timed region (a pool of {POOL} batches cycled). "
        f"{args.passes} passes over all cases, one after the other; in each, the median over "
        f"{args.repeats} repeats of the mean step time of a block of >= {args.min_time} s, "
        f"after {args.warmup} s of warm-up; the blocks of hvae and its peers alternate (a "
        "drift in background load hits all alike), "
        f"{args.settle} s idle before each block with 2+ threads; GC off while timing. A "
        "figure is the median over the passes; spread: the lowest and highest pass. numpy: "
        f"first pass only, median of {args.numpy_repeats} repeats. Threads: "
        "hvae with k > 1 threads: the core's team of k threads splits each layer's GEMMs, "
        "activations and the Adam update (`threads=k`; `n_jobs=k` in fit), the core's "
        "OpenBLAS at one thread meanwhile; numpy: threadpoolctl on its BLAS; torch: "
        "`torch.set_num_threads`. GFLOP/s "
        "counts the GEMMs of a dense forward + backward, what torch computes: `6*B*in*out` per "
        "layer minus `2*B*in*out` for the input gradient of the first layer; the step time a "
        "dense computation at that rate would take, so dense-equivalent where hvae does fewer. "
        "FLOPs done: hvae's share of those, below 100% where a batch of 64+ rows with at most "
        "a quarter of x nonzero (binarized MNIST: 13%) takes the first layer's forward and "
        "weight gradient through its sparse kernels (`2*nnz*out` each instead of `2*B*in*out`); "
        "the rate of the FLOPs done is % GEMM peak times FLOPs done. "
        "% GEMM peak: against the linked OpenBLAS's "
        f"{args.gemm_size}^3 GEMM at the same dtype and threads (the better of two "
        "measurements, at the start and at the end of the run). Speed ratios > 1 mean hvae is "
        "faster. Before timing, torch's loss, gradient and Adam step (and the reference's loss "
        "and gradient in float64) were checked equal to hvae's. Models: vae 784-400-20 ReLU; "
        "hvae2 the IWAE two-level (100, 50), tanh; hvae5 five levels 64-32-16-8-4, tanh; all "
        "Bernoulli, kl=\"analytic\"; vae, hvae2, hvae5 infer bottom-up with unit prior "
        "variance; hvae2-topdown and hvae5-topdown are the same sizes with top-down (Ladder "
        "VAE) inference and a learned prior variance (decoders 2..T output [m, s]), torch "
        "running the same top-down chain.")
    if epochs:
        method += (f" Epoch: {args.epoch_examples} examples of {data_note}, {EPOCH['model']}, "
                   f"batch {EPOCH['batch']}, {EPOCH['dtype']}; shuffling, batch gathering and "
                   "drawing eps are inside the timed epoch; median of "
                   f"{args.epoch_repeats} epochs after a warm-up on 10% of the data, in each "
                   "pass.")
    if memory:
        method += (" Memory: resident set size just before `fit` and its peak during `fit` "
                   "(VmHWM, reset before the fit), random binary data already in memory; the "
                   "rise is what training adds: the gradient and Adam's moments (3 x params), "
                   "the core's workspace (activations and their gradients; from 64 rows also the "
                   "sparse first layer's index of x's nonzeros, room for `B*D/4` by rows and by "
                   "columns with their values, that layer's W^T and its output gradient by "
                   "chunks of features), the batch copies, "
                   "the team's scratch and Python's own.")
    sections = [("GEMM peak of hvae's OpenBLAS (GFLOP/s)",
                 ["dtype", "threads", "before the steps", "after the epochs", "peak used"],
                 peak_rows),
                ("One training step", STEP_HEADERS, steps),
                ("One epoch (seconds)", ["implementation", "threads", "seconds", "spread"],
                 epoch_rows),
                ("Memory of a training run (float32, fit with n_jobs=2, "
                 f"{MEMORY_STEPS} steps, each model in a fresh process)", MEMORY_HEADERS,
                 memory),
                ("Targets (float32, best thread count of each side)",
                 ["target", "measured", "verdict"], goals)]
    text = [f"{k}: {v}" for k, v in info.items()] + ([warning] if warning else [])
    md = ["# hvae speed: one training step against PyTorch and NumPy", "",
          f"Command: `{command}`", "", *[f"- {k}: {v}" for k, v in info.items()], "",
          *([f"**{warning}**", ""] if warning else []), method]
    for title, headers, body in sections:
        if body:
            text += ["", title, text_table(headers, body)]
            md += ["", f"## {title}", "", md_table(headers, body)]
    return "\n".join(text), "\n".join(md) + "\n"


def main(argv=None):
    """Measure everything, print the tables, write the markdown."""
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child)
        return
    blas = OpenBLAS(linked_openblas())
    info = machine_info(blas)
    data, data_note = load_data(args.data, args.seed)
    print(f"hvae speed benchmark: {info['machine']}; data: {data_note}", flush=True)
    t_start, cpu_start = time.perf_counter(), cpu_seconds()
    cases = [(dt, th) for dt in args.dtypes for th in args.threads]
    start = {c: gemm_peak(blas, *c, args.gemm_size) for c in cases}
    step_passes, epoch_passes = [], []
    for k in range(args.passes):
        print(f"pass {k + 1} of {args.passes}", flush=True)
        step_passes.append(measure_steps(args, data, start, first=k == 0))
        if args.epoch_examples > 0:
            epoch_passes.append(measure_epochs(args, data))
    rows = combine_steps(step_passes)
    epochs = combine_epochs(epoch_passes) if epoch_passes else []
    memory = measure_memory(args)
    end = {c: gemm_peak(blas, *c, args.gemm_size) for c in cases}
    peaks = {c: (start[c], end[c]) for c in cases}
    for r in rows:  # against the best of the two measurements of the peak
        r["peak"] = r["gflops"] / max(peaks[(r["dtype"], r["threads"])])
    info["load average at end (1, 5, 15 min)"] = load_average()
    share = others_share(cpu_start, cpu_seconds(), time.perf_counter() - t_start)
    info["CPU time taken by other processes during the run"] = f"{share:.1%}"
    text, md = report(args, info, peaks, rows, epochs, memory, data_note, busy_warning(share))
    print("\n" + text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(md)
        print(f"\nwritten: {args.output}")


if __name__ == "__main__":
    main()
