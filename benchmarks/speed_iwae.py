"""Speed of hvae's importance-weighted objective (DESIGN.md section 7, issue 15 item 5) against
PyTorch twins measured in the same run.

Three measurements, every peer in the same run, float32:

1. One IWAE training step (objective="iwae", gradient="standard", k samples per example, batch
   100) of `vae` (one level) and `hvae2` (the two-level model of benchmarks/speed.py): hvae's
   fused step `_core.Model.train_step` (what `fit` calls) against two PyTorch twins, written
   the two ways a user would:
   - "x repeated": x.repeat_interleave(k) (np.repeat), the whole network on B*k rows;
   - "encoder shared": q(z_1 | x)'s MLP once per example, its output expanded to the k samples,
     the rest on B*k rows (what hvae does).
   Both: loss = -mean_b logsumexp_j log w_bj + log k, `backward`, `torch.optim.Adam`. Each twin
   is checked equal to hvae in loss and gradient in float64 (and float32, and its Adam step)
   before any timing; the run aborts if not. Threads 1 and 2 each side.
2. Evaluation: `HVAE.log_likelihood(x, k=1000)` on test examples against the same estimator in
   PyTorch under torch.inference_mode with the encoder shared, batched as hvae batches
   (batch_size rows of (example, sample) per call), noise drawn inside the timed region by both;
   the twin's log weights checked equal to the core's for the same noise first.
3. The full 10 000-image binarized-MNIST test split at k = 5000 for the committed checkpoint
   benchmarks/results/hvae2-mc.npz with n_jobs=2 (wall time, samples/s; a subset extrapolated,
   and labelled so, with --quick or --full-examples or past --deadline).

Where the time goes, timed from Python (csrc/ is not touched): the step's forward, backward and
Adam parts of hvae and of the encoder-shared twin against the SGEMM peak of the core's OpenBLAS;
the evaluation loop's noise drawing, core forward and the rest at 1 and 2 threads; and one
evaluation chunk of the core taken apart into the GEMMs of its layers (cblas_sgemm at the same
shapes) and its elementwise math (`_core._vecmath` on as many elements).

Timing, load recording and the tables come from benchmarks/speed.py, the twin's network from
benchmarks/torch_peer.py (TorchIWAE below adds the IWAE log weights to it).

    .venv/bin/python benchmarks/speed_iwae.py          # the full run -> results/speed_iwae.md
    .venv/bin/python benchmarks/speed_iwae.py --quick  # seconds; the full split extrapolated
"""
import argparse
import ctypes
import itertools
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import threadpoolctl

import hvae

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import speed  # noqa: E402  (benchmarks/speed.py: timing, load, tables)
from speed import LR, POOL, ROOT, make_model, md_table, ms, text_table  # noqa: E402

torch = speed.torch
if torch is not None:
    import torch.nn.functional as F  # noqa: E402
    from torch_peer import TorchHVAE  # noqa: E402
else:  # the script still runs hvae's side and says so
    TorchHVAE = object

CHECKPOINT = ROOT / "benchmarks" / "results" / "hvae2-mc.npz"
STEP_MODELS = ("vae", "hvae2")
TWINS = ("repeat", "shared")
TWIN_NAMES = {"repeat": "torch, x repeated", "shared": "torch, encoder shared"}
TARGET_STEP = 2.0      # hvae step rate / the faster twin's, best thread count each side
TARGET_EVAL = 2.0      # log_likelihood at k = 1000, one thread each
TARGET_FULL = 240.0    # seconds for the test split at k = 5000, n_jobs = 2
LOG2PI = math.log(2.0 * math.pi)
# guard tolerances: (loss / log weight relative, gradient max-abs relative to max |grad|, Adam)
GUARD_TOL = speed.GUARD_TOL


# ----------------------------------------------------------------------------------------------
# arguments

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time hvae's IWAE training step and importance-sampled evaluation against "
                    "PyTorch twins, and the full MNIST test split at k = 5000.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", choices=STEP_MODELS, default=list(STEP_MODELS),
                   help="models of the training step: vae = 784-400-20 ReLU, hvae2 = the "
                        "two-level (100, 50) tanh model of speed.py; bottom-up, unit prior "
                        "variance")
    p.add_argument("--ks", nargs="+", type=int, default=None,
                   help="samples per example (default 5 50; --quick: 5)")
    p.add_argument("--batch", type=int, default=100, help="examples per training step")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                   help="threads of hvae's core team (threads=) and of torch "
                        "(torch.set_num_threads)")
    p.add_argument("--passes", type=int, default=2,
                   help="passes over the step cases; a figure is the median over passes")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per case and pass")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per timed block")
    p.add_argument("--warmup", type=float, default=0.3, help="seconds of warm-up per case")
    p.add_argument("--settle", type=float, default=0.1,
                   help="seconds idle before each block with 2+ threads")
    p.add_argument("--step-lr", type=float, default=0.0,
                   help="Adam's learning rate in the timed steps: 0 does the same arithmetic "
                        "and keeps the parameters at their initialisation, so every block times "
                        "the same work (training moves the importance weights into float32's "
                        "subnormal range, which slows hvae's core: see --drift-steps)")
    p.add_argument("--drift-steps", type=int, default=20,
                   help="training steps (lr 1e-3) on the pool before the subnormal section "
                        "times hvae (with and without flush-to-zero) and the twin (0: skipped)")
    p.add_argument("--gemm-size", type=int, default=2048,
                   help="n of the n^3 SGEMM of the core's OpenBLAS that measures the peak")
    p.add_argument("--torch-adam", choices=("default", "foreach", "fused"), default="default",
                   help="torch.optim.Adam's implementation")
    p.add_argument("--eval-k", type=int, default=1000, help="k of the evaluation comparison")
    p.add_argument("--eval-examples", type=int, default=40,
                   help="test examples of the evaluation comparison")
    p.add_argument("--eval-repeats", type=int, default=3,
                   help="timed calls per implementation and thread count (median)")
    p.add_argument("--eval-rows", type=int, default=4096,
                   help="(example, sample) rows per call: hvae's batch_size (its default) and "
                        "the torch twin's chunk")
    p.add_argument("--full-k", type=int, default=5000, help="k of the test-split evaluation")
    p.add_argument("--full-examples", type=int, default=None,
                   help="test examples evaluated at --full-k (default: all 10 000; fewer: the "
                        "time is extrapolated to the full split, and labelled so)")
    p.add_argument("--full-jobs", type=int, default=2, help="n_jobs of the test-split run")
    p.add_argument("--full-chunk", type=int, default=500,
                   help="examples per log_likelihood call of the test-split run (progress and "
                        "--deadline between calls; at k > batch_size the evaluation goes one "
                        "example at a time either way)")
    p.add_argument("--deadline", default=None,
                   help="HH:MM local time: the test-split run stops starting new chunks after "
                        "it, and what is done is extrapolated (labelled so)")
    p.add_argument("--phase-examples", type=int, default=10,
                   help="test examples (at --full-k) on which the phases are timed")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=("steps", "breakdown", "drift", "eval", "full", "phases"),
                   help="sections to leave out")
    p.add_argument("--data", type=Path,
                   default=Path(os.environ.get("HVAE_DATA", ROOT.parent / "shared" / "data"))
                   / "binarized_mnist.npz", help="binarized MNIST .npz (train, test)")
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT,
                   help="the model of the evaluation sections")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="seconds: one pass, 1 thread, short blocks, 2 examples at k = 1000, 10 "
                        "examples at k = 5000 extrapolated to the split; writes no file unless "
                        "--output is given")
    p.add_argument("--output", type=Path, default=None,
                   help="markdown file; default benchmarks/results/speed_iwae.md (none with "
                        "--quick)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.ks is None:
        args.ks = [5] if args.quick else [5, 50]
    if args.quick:
        args.threads, args.passes, args.repeats = [1], 1, 2
        args.gemm_size, args.drift_steps = 512, 3
        args.min_time, args.warmup, args.settle = 0.01, 0.01, 0.0
        args.eval_examples, args.eval_repeats = 2, 1
        if args.full_examples is None:
            args.full_examples = 4
        args.phase_examples = 1
    elif args.output is None:
        args.output = ROOT / "benchmarks" / "results" / "speed_iwae.md"
    return args


# ----------------------------------------------------------------------------------------------
# the PyTorch twin of the IWAE bound

def log_normal(z, mu=None, lv=None):
    """log N(z; mu, diag e^lv) summed over the last axis (mu None: 0; lv None: unit variance)."""
    r = z if mu is None else z - mu
    if lv is None:
        return -0.5 * torch.sum(r * r + LOG2PI, dim=-1)
    return -0.5 * torch.sum(LOG2PI + lv + r * r * torch.exp(-lv), dim=-1)


class TorchIWAE(TorchHVAE):
    """torch_peer.TorchHVAE's network (bottom-up inference) with the IWAE bound, from the math
    (DESIGN.md section 7): log w = log p(x | z_1) + sum_i log p(z_i | z_{i+1}) + log p(z_T)
    - sum_i log q(z_i | z_{i-1}), every density exact at the samples, z_i = mu_i + e^(lv_i/2)
    eps_i; loss = -mean_b [logsumexp_j log w_bj - log k], whose autograd gradient is the
    standard IWAE gradient (softmax weights over each example's k log weights)."""

    def __init__(self, m):
        if m.inference != "bottom_up":
            raise ValueError("TorchIWAE: bottom-up inference only")
        super().__init__(as_model(m, kl="analytic"))  # kl is unused by log w; the twin wants it

    def log_weights(self, x, eps, k, share):
        """(B, k) log weights of x (B, D) with eps (T tensors (B*k, d_i), row b*k + j).
        share=False: x repeated k times, every layer on B*k rows; share=True: q(z_1 | x)'s MLP
        once per example, its output repeated to the k samples."""
        B = x.shape[0]
        if share:
            out = self._run(self.enc[0], x).repeat_interleave(k, dim=0)
        else:
            x = x.repeat_interleave(k, dim=0)
            out = self._run(self.enc[0], x)
        zs, log_q = [], 0.0
        for i, d in enumerate(self.latent_dims):
            if i:
                out = self._run(self.enc[i], zs[-1])
            mu, lv = out[:, :d], out[:, d:]
            z = mu + torch.exp(0.5 * lv) * eps[i]
            log_q = log_q + log_normal(z, mu, lv)
            zs.append(z)
        log_p = log_normal(zs[-1])
        for i in range(len(zs) - 1):
            log_p = log_p + log_normal(zs[i], *self._prior(i, zs[i + 1]))
        logits = self._run(self.dec[0], zs[0])
        if share:  # the target broadcast over the k samples, not copied
            rec = F.binary_cross_entropy_with_logits(
                logits.view(B, k, -1), x.unsqueeze(1).expand(-1, k, -1), reduction="none")
            rec = rec.sum(-1).view(-1)
        else:
            rec = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        return (log_p - log_q - rec).view(B, k)

    def iwae_loss(self, x, eps, k, share):
        """-mean_b log (1/k) sum_j w_bj."""
        lw = self.log_weights(x, eps, k, share)
        return -(torch.logsumexp(lw, dim=1) - math.log(k)).mean()


def torch_log_likelihood(net, X, k, rows):
    """The same estimator as HVAE.log_likelihood in the twin: encoder shared, no autograd,
    chunks of about `rows` (example, sample) rows, the noise drawn per chunk, log-sum-exp in
    float64. (B, ) float64 tensor."""
    per = max(1, rows // k)
    out = torch.empty(len(X), dtype=torch.float64)
    with torch.inference_mode():
        for s in range(0, len(X), per):
            xb = X[s:s + per]
            eps = [torch.randn(len(xb) * k, d, dtype=X.dtype) for d in net.latent_dims]
            lw = net.log_weights(xb, eps, k, share=True).double()
            out[s:s + per] = torch.logsumexp(lw, dim=1) - math.log(k)
    return out


# ----------------------------------------------------------------------------------------------
# models and data

def as_model(m, dtype=None, kl=None):
    """m itself, or a copy of its architecture and parameter values in another dtype / kl."""
    dtype, kl = dtype or m.dtype, kl or m.kl
    if dtype == m.dtype and kl == m.kl:
        return m
    c = hvae.HVAE(m.x_dim, m.latent_dims, m.hidden_dims, likelihood=m.likelihood,
                  activation=m.activation, kl=kl, dtype=dtype, seed=0,
                  prior_variance=m.prior_variance, inference=m.inference)
    c.params[:] = m.params
    return c


def iwae_pool(data, m, batch, k, seed):
    """POOL pairs (x (B, D), eps: T arrays (B*k, d_i)) in m's dtype, drawn before timing."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(POOL):
        idx = rng.choice(len(data), batch, replace=len(data) < batch)
        eps = [rng.standard_normal((batch * k, d)).astype(m.dtype) for d in m.latent_dims]
        pool.append((np.ascontiguousarray(data[idx], dtype=m.dtype), eps))
    return pool


def load_split(path, split, seed, n=10000):
    """(float32 rows, description) of a binarized-MNIST split, or random binary data."""
    if path.is_file():
        with np.load(path) as archive:
            return archive[split].astype(np.float32), f"binarized MNIST {split} split ({path})"
    rng = np.random.default_rng(seed)
    return ((rng.random((n, 784)) < 0.13).astype(np.float32),
            f"random binary data ({path} absent)")


def to_torch(x, eps):
    return torch.from_numpy(x), [torch.from_numpy(e) for e in eps]


# ----------------------------------------------------------------------------------------------
# the correctness guards

def check(what, got, want, tol):
    """Abort unless max |got - want| <= tol * max |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-300))
    if not err <= tol:
        raise SystemExit(f"guard failed: {what} differs from hvae's by {err:.3g} (relative; "
                         f"tolerance {tol:g}). Not timing unequal work.")
    return err


def guard_steps(name, k, data, adam, seed, batch=8):
    """Both twins' IWAE loss and gradient equal to hvae's (float64 and float32), the timed
    train_step computing loss_and_grad's numbers, and torch's Adam step taking hvae's."""
    worst = {}
    for dtype in ("float64", "float32"):
        tol_loss, tol_grad, tol_step = GUARD_TOL[dtype]
        m = make_model(name, dtype, seed)
        x, eps = iwae_pool(data, m, batch, k, seed)[0]
        loss, grad = m.loss_and_grad(x, eps, objective="iwae", k=k, gradient="standard")
        p, g = m.params.copy(), np.empty_like(m.params)
        m1, m2 = np.zeros_like(g), np.zeros_like(g)
        loss_s, _, ok = m._core.train_step(p, m1, m2, g, x, eps, 1, lr=LR, threads=1,
                                           objective="iwae", k=k, gradient="standard")
        assert ok
        check(f"{name} {dtype} k={k}: train_step's loss", loss_s, loss, tol_loss)
        check(f"{name} {dtype} k={k}: train_step's gradient", g, grad, tol_grad)
        for share in (False, True):
            net = TorchIWAE(m)
            lt = net.iwae_loss(*to_torch(x, eps), k, share)
            lt.backward()
            what = f"{name} {dtype} k={k}: {TWIN_NAMES[TWINS[share]]}'s"
            e1 = check(what + " loss", lt.item(), loss, tol_loss)
            e2 = check(what + " gradient", net.flat(grads=True), grad, tol_grad)
            worst[dtype] = max(worst.get(dtype, 0.0), e1, e2)
            if share:  # Adam: torch's step from hvae's gradient lands where train_step did
                shapes = [q.shape for q in m.named_params().values()]
                pieces = np.split(grad, np.cumsum([int(np.prod(s)) for s in shapes])[:-1])
                for q, gq, s in zip(net.hvae_named().values(), pieces, shapes):
                    q.grad = torch.from_numpy(gq.reshape(s).copy())
                speed.torch_adam(net, adam).step()
                check(what + " Adam step", net.flat(), p, tol_step)
    return worst


def guard_eval(model, X, k, seed):
    """The twin's log weights (encoder shared, inference mode) equal to the core's IWAE path's
    for the same noise, float64 and float32."""
    worst = {}
    for dtype in ("float64", "float32"):
        m = as_model(model, dtype)
        rng = np.random.default_rng(seed)
        eps = [rng.standard_normal((len(X) * k, d)).astype(dtype) for d in m.latent_dims]
        x = X.astype(dtype)
        _, _, lw = m._core.forward(m.params, x, None, eps, log_weight=True, objective="iwae",
                                   k=k, threads=1)
        net = TorchIWAE(m)
        with torch.inference_mode():
            lw_t = net.log_weights(*to_torch(x, eps), k, share=True).reshape(-1).numpy()
        worst[dtype] = check(f"evaluation {dtype} k={k}: the twin's log weights", lw_t, lw,
                             GUARD_TOL[dtype][0])
    return worst


# ----------------------------------------------------------------------------------------------
# the training step

def hvae_stepper(m, pool, k, threads, lr=LR):
    """step(): one fused IWAE training step of hvae on the next batch of the pool."""
    g = np.empty_like(m.params)
    m1, m2 = np.zeros_like(g), np.zeros_like(g)
    batches, count = itertools.cycle(pool), itertools.count(1)

    def step():
        x, eps = next(batches)
        m._core.train_step(m.params, m1, m2, g, x, eps, next(count), lr=lr, threads=threads,
                           objective="iwae", k=k, gradient="standard")
    return step


def torch_stepper(m, pool, k, share, adam, lr=LR):
    """step(): one PyTorch IWAE training step of a twin on the next batch of the pool."""
    net = TorchIWAE(m)
    opt = speed.torch_adam(net, adam)
    for group in opt.param_groups:
        group["lr"] = lr
    batches = itertools.cycle([to_torch(x, eps) for x, eps in pool])

    def step():
        x, eps = next(batches)
        opt.zero_grad(set_to_none=True)
        net.iwae_loss(x, eps, k, share).backward()
        opt.step()
    step.net = net
    return step


def measure_steps(args, data, peaks):
    """One row per (model, k, threads), the median over passes of each implementation."""
    peers = list(TWINS) if torch is not None else []

    def case_info(name, k, th):
        return dict(model=name, k=k, threads=th, batch=args.batch, peak=peaks[th],
                    flops=iwae_flops(make_model(name, "float32", args.seed), args.batch, k)[1])

    cases = [(n, k, th) for n in args.models for k in args.ks for th in args.threads]
    passes = []
    for p in range(args.passes):
        print(f"  steps: pass {p + 1} of {args.passes}", flush=True)
        out = {}
        for name, k, th in cases:
            pool = iwae_pool(data, make_model(name, "float32", args.seed), args.batch, k,
                             args.seed)
            steps = {"hvae": hvae_stepper(make_model(name, "float32", args.seed), pool, k, th,
                                          args.step_lr)}
            for twin in peers:
                steps[twin] = torch_stepper(make_model(name, "float32", args.seed), pool, k,
                                            twin == "shared", args.torch_adam, args.step_lr)
            if torch is not None:
                torch.set_num_threads(th)
            with threadpoolctl.threadpool_limits(th, user_api="blas"):
                sec = speed.time_interleaved(steps, {s: args.repeats for s in steps},
                                             args.min_time, args.warmup,
                                             args.settle if th > 1 else 0.0)
            out[(name, k, th)] = sec
            print("    " + "  ".join(step_cells(dict(case_info(name, k, th), **sec))),
                  flush=True)
        passes.append(out)
    rows = []
    for case in cases:
        r = case_info(*case)
        for impl in ["hvae", *peers]:
            vals = [p[case][impl] for p in passes]
            r[impl] = statistics.median(vals)
            r[impl + "_range"] = (min(vals), max(vals)) if len(vals) > 1 else None
        rows.append(r)
    return rows


def iwae_flops(m, batch, k):
    """(forward, forward + backward) GEMM FLOPs of one IWAE step computed densely with q(z_1|x)'s
    MLP shared: 2*rows*in*out per layer forward (rows = batch for encoder 1's layers, batch*k
    for the rest), twice that backward (weight and input gradients), no input gradient for the
    first layer. What the encoder-shared twin computes; hvae does fewer where its sparse first
    layer applies (batch >= 64, x at most a quarter nonzero)."""
    fwd = first = 0
    for name, w in m.named_params().items():
        if name.endswith(".weight"):
            rows = batch if name.startswith("enc1.") else batch * k
            f = 2 * rows * w.shape[0] * w.shape[1]
            fwd += f
            first += f if name == "enc1.0.weight" else 0
    return fwd, 3 * fwd - first


def faster_twin(r):
    """(seconds, twin) of the faster torch twin of a row, or None."""
    timed = [(r[t], t) for t in TWINS if r.get(t) is not None]
    return min(timed) if timed else None


STEP_HEADERS = ["model", "k", "batch", "threads", "hvae ms/step", "hvae spread",
                "hvae samples/s", "hvae GFLOP/s (% GEMM peak)", "torch x repeated ms",
                "torch encoder shared ms", "hvae / x repeated", "hvae / encoder shared",
                "hvae / faster twin", "ceiling: faster twin / FLOPs at GEMM peak"]


def step_cells(r):
    f = faster_twin(r)
    gf = r["flops"] / r["hvae"] / 1e9
    at_peak = r["flops"] / (r["peak"] * 1e9)  # seconds of the dense FLOPs at the GEMM peak
    return [r["model"], str(r["k"]), str(r["batch"]), str(r["threads"]), ms(r["hvae"]),
            speed.spread(r.get("hvae_range")), f"{r['batch'] * r['k'] / r['hvae']:,.0f}",
            f"{gf:.1f} ({gf / r['peak']:.0%})",
            ms(r.get("repeat")) + ("" if r.get("repeat_range") is None else
                                   f" ({speed.spread(r['repeat_range'])})"),
            ms(r.get("shared")) + ("" if r.get("shared_range") is None else
                                   f" ({speed.spread(r['shared_range'])})"),
            speed.ratio(r.get("repeat"), r["hvae"]), speed.ratio(r.get("shared"), r["hvae"]),
            "-" if f is None else f"{f[0] / r['hvae']:.2f}x",
            "-" if f is None else f"{f[0] / at_peak:.2f}x"]


def step_targets(rows):
    """[(target, measured, verdict)]: best thread count each side, then one thread each."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        for k in dict.fromkeys(r["k"] for r in rows):
            case = [r for r in rows if (r["model"], r["k"]) == (name, k)]
            if not case or faster_twin(case[0]) is None:
                continue
            own = min((r["hvae"], r["threads"]) for r in case)
            peer = min((*faster_twin(r), r["threads"]) for r in case)
            out.append((f"{name} k={k} B={case[0]['batch']}: >= {TARGET_STEP:g}x the faster "
                        "twin, best thread count each side",
                        f"hvae {ms(own[0])} ms ({own[1]} thr), {TWIN_NAMES[peer[1]]} "
                        f"{ms(peer[0])} ms ({peer[2]} thr): {peer[0] / own[0]:.2f}x",
                        verdict(peer[0] / own[0] >= TARGET_STEP)))
            one = [r for r in case if r["threads"] == 1]
            if one:
                r = one[0]
                f = faster_twin(r)
                out.append((f"{name} k={k} B={r['batch']}: >= {TARGET_STEP:g}x the faster "
                            "twin, one thread each",
                            f"hvae {ms(r['hvae'])} ms, {TWIN_NAMES[f[1]]} {ms(f[0])} ms: "
                            f"{f[0] / r['hvae']:.2f}x", verdict(f[0] / r["hvae"] >= TARGET_STEP)))
    return out


def verdict(ok):
    return "MET" if ok else "NOT MET"


def measure_breakdown(args, data, peaks):
    """Where a training step's time goes, one thread each: hvae's forward alone (the loss,
    `_core.Model.forward`), forward + backward (with grad=), the fused step; the encoder-shared
    twin's forward under no_grad, forward + backward, the step with Adam."""
    rows = []
    for name in args.models:
        for k in args.ks:
            m = make_model(name, "float32", args.seed)
            pool = iwae_pool(data, m, args.batch, k, args.seed)
            g = np.empty_like(m.params)
            cyc = itertools.cycle(pool)
            est = dict(objective="iwae", k=k, gradient="standard", threads=1)

            def h_fwd():
                x, eps = next(cyc)
                m._core.forward(m.params, x, None, eps, **est)

            def h_bwd():
                x, eps = next(cyc)
                m._core.forward(m.params, x, None, eps, grad=g, **est)

            steps = {"hvae fwd": h_fwd, "hvae fwd+bwd": h_bwd,
                     "hvae step": hvae_stepper(make_model(name, "float32", args.seed), pool, k,
                                               1, args.step_lr)}
            if torch is not None:
                net = TorchIWAE(m)
                tpool = itertools.cycle([to_torch(x, eps) for x, eps in pool])

                def t_fwd():
                    with torch.no_grad():
                        net.iwae_loss(*next(tpool), k, True)

                def t_bwd():
                    net.zero_grad(set_to_none=True)
                    net.iwae_loss(*next(tpool), k, True).backward()

                steps.update({"torch fwd": t_fwd, "torch fwd+bwd": t_bwd,
                              "torch step": torch_stepper(make_model(name, "float32", args.seed),
                                                          pool, k, True, args.torch_adam,
                                                          args.step_lr)})
                torch.set_num_threads(1)
            with threadpoolctl.threadpool_limits(1, user_api="blas"):
                sec = speed.time_interleaved(steps, {s: args.repeats for s in steps},
                                             args.min_time, args.warmup, 0.0)
            fwd, both = iwae_flops(m, args.batch, k)
            for impl in ("hvae", "torch"):
                if f"{impl} fwd" not in sec:
                    continue
                f, b, st = (sec[f"{impl} {p}"] for p in ("fwd", "fwd+bwd", "step"))
                rows.append([name, k, impl if impl == "hvae" else "torch, encoder shared",
                             f"{ms(f)} ({fwd / f / 1e9 / peaks[1]:.0%})",
                             f"{ms(b - f)} ({(both - fwd) / (b - f) / 1e9 / peaks[1]:.0%})",
                             ms(st - b), ms(st),
                             f"{both / b / 1e9:.1f} ({both / b / 1e9 / peaks[1]:.0%})"])
                print("    breakdown  " + "  ".join(map(str, rows[-1])), flush=True)
    return rows


def subnormal_share(m, pool, k):
    """Fraction of the pool's normalised importance weights (softmax over each example's k
    log weights, computed in float64) below float32's smallest normal number."""
    tiny, small, total = np.finfo(np.float32).tiny, 0, 0
    for x, eps in pool:
        _, _, lw = m._core.forward(m.params, x, None, eps, log_weight=True, objective="iwae",
                                   k=k, threads=1)
        lw = lw.astype(np.float64).reshape(-1, k)
        w = np.exp(lw - lw.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        small, total = small + int(np.sum(w < tiny)), total + w.size
    return small / total


def measure_drift(args, data):
    """After drift_steps training steps (lr 1e-3) on the pool, from the same initialisation for
    hvae and the encoder-shared twin: one thread each, the step time (at lr 0) of hvae, of hvae
    with the calling thread's flush-to-zero / denormals-are-zero on (torch.set_flush_denormal,
    which sets the thread's MXCSR; with threads=1 the core runs on that thread), and of the twin.
    Subnormal importance weights scale rows of the backward's buffers into the subnormal range,
    and x86 arithmetic on subnormals is slow."""
    rows = []
    for name in args.models:
        for k in args.ks:
            pool = iwae_pool(data, make_model(name, "float32", args.seed), args.batch, k,
                             args.seed)
            m = make_model(name, "float32", args.seed)
            before = subnormal_share(m, pool, k)
            with threadpoolctl.threadpool_limits(1, user_api="blas"):
                train = hvae_stepper(m, pool, k, 1)
                for _ in range(args.drift_steps):
                    train()
                after = subnormal_share(m, pool, k)
                plain = hvae_stepper(m, pool, k, 1, 0.0)

                def flushed(step):
                    def run():
                        torch.set_flush_denormal(True)
                        try:
                            step()
                        finally:
                            torch.set_flush_denormal(False)
                    return run

                steps = {"hvae": plain, "hvae, FTZ/DAZ": flushed(plain)}
                if torch is not None:
                    torch.set_num_threads(1)
                    twin = make_model(name, "float32", args.seed)
                    net_step = torch_stepper(twin, pool, k, True, args.torch_adam)
                    for _ in range(args.drift_steps):
                        net_step()
                    # the twin's trained parameters back into an hvae model, then timed at lr 0
                    twin.params[:] = net_step.net.flat()
                    after = f"{after:.0%} (torch-trained: {subnormal_share(twin, pool, k):.0%})"
                    steps["torch"] = torch_stepper(twin, pool, k, True, args.torch_adam, 0.0)
                    steps["torch, FTZ/DAZ"] = flushed(steps["torch"])
                sec = speed.time_interleaved(steps, {s: args.repeats for s in steps},
                                             args.min_time, args.warmup, 0.0)
            rows.append([name, k, args.drift_steps, f"{before:.0%}",
                         after if isinstance(after, str) else f"{after:.0%}",
                         ms(sec["hvae"]), ms(sec["hvae, FTZ/DAZ"]),
                         f"{sec['hvae'] / sec['hvae, FTZ/DAZ']:.2f}x",
                         ms(sec.get("torch")), ms(sec.get("torch, FTZ/DAZ")),
                         speed.ratio(sec.get("torch"), sec["hvae"]),
                         speed.ratio(sec.get("torch, FTZ/DAZ"), sec["hvae, FTZ/DAZ"])])
            print("    subnormal  " + "  ".join(map(str, rows[-1])), flush=True)
    return rows


DRIFT_HEADERS = ["model", "k", "training steps", "weights < float32 tiny at init",
                 "after training", "hvae ms/step", "hvae FTZ/DAZ ms/step", "slowdown",
                 "torch encoder shared ms/step", "torch FTZ/DAZ ms/step", "hvae / torch",
                 "hvae / torch, both FTZ/DAZ"]


BREAKDOWN_HEADERS = ["model", "k", "implementation", "forward ms (% GEMM peak)",
                     "backward ms (% GEMM peak)", "Adam + rest ms", "step ms",
                     "forward + backward GFLOP/s (% GEMM peak)"]


# ----------------------------------------------------------------------------------------------
# evaluation at k = 1000

def measure_eval(args, model, X):
    """Rows (implementation, threads, seconds, samples/s, mean estimate) for log_likelihood at
    eval_k on X, hvae and the twin alternating."""
    k, rows, out = args.eval_k, args.eval_rows, []
    net = TorchIWAE(model) if torch is not None else None
    Xt = torch.from_numpy(X) if torch is not None else None
    for th in args.threads:
        est = {}

        def hv():
            est["hvae"] = model.log_likelihood(X, k=k, batch_size=rows, n_jobs=th)

        def tt():
            est["torch"] = torch_log_likelihood(net, Xt, k, rows).numpy()

        steps = {"hvae": hv}
        if net is not None:
            steps["torch"] = tt
            torch.set_num_threads(th)
        with threadpoolctl.threadpool_limits(th, user_api="blas"):
            sec = speed.time_interleaved(steps, {s: args.eval_repeats for s in steps}, 0.0,
                                         0.0, args.settle if th > 1 else 0.0)
        for impl in steps:
            out.append(dict(impl=impl, threads=th, sec=sec[impl],
                            rate=len(X) * k / sec[impl], mean=float(np.mean(est[impl]))))
            print(f"    eval  {impl:<6} {th} thr  {sec[impl]:.3f} s  "
                  f"{out[-1]['rate']:,.0f} samples/s  mean {out[-1]['mean']:.3f}", flush=True)
    return out


EVAL_NAMES = {"hvae": "hvae: HVAE.log_likelihood", "torch": "torch, encoder shared, "
              "inference_mode"}


def eval_cells(rows):
    cells = []
    for r in rows:
        own = next(q for q in rows if q["impl"] == "hvae" and q["threads"] == r["threads"])
        cells.append([EVAL_NAMES[r["impl"]], r["threads"], f"{r['sec']:.3f}",
                      f"{r['rate']:,.0f}", f"{r['mean']:.3f}",
                      "-" if r["impl"] == "hvae" else f"{r['sec'] / own['sec']:.2f}x"])
    return cells


def eval_targets(args, rows):
    one = {r["impl"]: r for r in rows if r["threads"] == 1}
    if "hvae" not in one or "torch" not in one:
        return []
    x = one["torch"]["sec"] / one["hvae"]["sec"]
    return [(f"log_likelihood k={args.eval_k}: >= {TARGET_EVAL:g}x torch (encoder shared), one "
             "thread each", f"hvae {one['hvae']['sec']:.3f} s, torch {one['torch']['sec']:.3f} "
             f"s on {args.eval_examples} examples: {x:.2f}x", verdict(x >= TARGET_EVAL))]


# ----------------------------------------------------------------------------------------------
# the full test split at k = 5000, and where its time goes

def measure_full(args, model, X):
    """Wall time of log_likelihood over X (or its first full_examples rows) at full_k with
    n_jobs=full_jobs, in chunks of full_chunk examples, stopping at the deadline."""
    n = len(X) if args.full_examples is None else min(args.full_examples, len(X))
    deadline = None
    if args.deadline:
        hh, mm = map(int, args.deadline.split(":"))
        now = time.localtime()
        deadline = time.mktime(now[:3] + (hh, mm, 0) + now[6:])
    done, est, t0, chunk_rates = 0, [], time.perf_counter(), []
    with threadpoolctl.threadpool_limits(args.full_jobs, user_api="blas"):
        while done < n:
            if deadline is not None and time.time() >= deadline:
                print(f"    full split: deadline {args.deadline} reached after {done} examples",
                      flush=True)
                break
            c = min(args.full_chunk, n - done)
            tc = time.perf_counter()
            est.append(model.log_likelihood(X[done:done + c], k=args.full_k,
                                            n_jobs=args.full_jobs))
            chunk_rates.append(c * args.full_k / (time.perf_counter() - tc))
            done += c
            sec = time.perf_counter() - t0
            print(f"    full split: {done} / {len(X)} examples, {sec:.1f} s, "
                  f"{done * args.full_k / sec:,.0f} samples/s", flush=True)
    sec = time.perf_counter() - t0
    ll = np.concatenate(est) if est else np.empty(0)
    return dict(examples=done, of=len(X), sec=sec, rate=done * args.full_k / sec,
                split_sec=sec * len(X) / max(done, 1), mean=float(ll.mean()) if done else None,
                measured=done == len(X), chunk_rates=chunk_rates)


def time_phases(args, model, X, threads):
    """evaluation.iwae_bound's loop for X at full_k, rows = the default batch_size, with each
    part timed: the core's noise (`_core.Model.noise`, on the team; inside forward in
    iwae_bound), the core's forward given that noise (threads), the rest (log-sum-exp, Python).
    Returns seconds by phase and the samples done."""
    from hvae.evaluation import iwae_bound  # noqa: F401  (the loop replicated below)
    k, rows, seed = args.full_k, 4096, args.seed
    t = dict(eps=0.0, core=0.0, rest=0.0)
    t_all = time.perf_counter()
    for i in range(len(X)):
        xb, acc_max, acc_sum, done = X[i:i + 1], -np.inf, 0.0, 0
        while done < k:
            c = min(rows, k - done)
            t0 = time.perf_counter()
            eps = model._core.noise(c, seed, i * k + done, threads=threads)
            t1 = time.perf_counter()
            _, _, lw = model._core.forward(model.params, xb, None, eps, log_weight=True,
                                           objective="iwae", k=c, threads=threads)
            t2 = time.perf_counter()
            lw = lw.astype(np.float64)
            m = max(acc_max, float(lw.max()))
            acc_sum = acc_sum * np.exp(acc_max - m) + np.exp(lw - m).sum()
            acc_max, done = m, done + c
            t["eps"] += t1 - t0
            t["core"] += t2 - t1
            t["rest"] += time.perf_counter() - t2
    t["total"] = time.perf_counter() - t_all
    t["rest"] = t["total"] - t["eps"] - t["core"]
    return t, len(X) * k


def per_sample_flops(m):
    """GEMM FLOPs of one sample's forward when q(z_1 | x)'s MLP is shared (2*in*out for every
    layer but encoder 1's), and those of encoder 1 (once per example)."""
    own = shared = 0
    for name, w in m.named_params().items():
        if name.endswith(".weight"):
            f = 2 * w.shape[0] * w.shape[1]
            if name.startswith("enc1."):
                shared += f
            else:
                own += f
    return own, shared


def measure_phases(args, model, X, blas, peaks):
    """Rows of the phase table at 1 and full_jobs threads (peaks: SGEMM GFLOP/s by threads,
    completed here where missing)."""
    own, _ = per_sample_flops(model)
    rows = []
    for th in sorted({1, args.full_jobs}):
        with threadpoolctl.threadpool_limits(th, user_api="blas"):
            t, samples = time_phases(args, model, X, th)
        if th not in peaks:
            peaks[th] = speed.gemm_peak(blas, "float32", th, args.gemm_size)
        gf = own * samples / t["core"] / 1e9
        rows.append([th, f"{samples / t['total']:,.0f}", f"{t['eps']:.3f} "
                     f"({t['eps'] / t['total']:.0%})", f"{t['core']:.3f} "
                     f"({t['core'] / t['total']:.0%})", f"{t['rest']:.3f} "
                     f"({t['rest'] / t['total']:.0%})", f"{samples / t['core']:,.0f}",
                     f"{gf:.1f} of {peaks[th]:.1f} ({gf / peaks[th]:.0%})",
                     f"{samples / t['eps']:,.0f}",
                     f"{t['total'] * 10000 / len(X) / 60:.1f} min"])
        print("    phases  " + "  ".join(map(str, rows[-1])), flush=True)
    return rows


def eval_accounting(args, model, x, blas, repeats=7):
    """Rows splitting the core's IWAE forward of one chunk (one example, 4096 samples, one
    thread) into the GEMMs of its layers (every layer but encoder 1's, at 4096 rows, timed
    alone through the core's OpenBLAS, cblas_sgemm), the core's own elementwise math on the
    same numbers of elements (`_core._vecmath` on cache-sized pieces: tanh of every hidden unit,
    softplus of the 784 Bernoulli logits), and the rest (bias adds, the Gaussian densities, the
    log weights, copies)."""
    rows = 4096
    rng = np.random.default_rng(args.seed)
    eps = [rng.standard_normal((rows, d)).astype(np.float32) for d in model.latent_dims]
    blas.openblas_set_num_threads(1)
    gemms, n_tanh = [], 0
    for name, w in model.named_params().items():
        if name.endswith(".weight") and not name.startswith("enc1."):
            out, inp = w.shape
            a = rng.standard_normal((rows, inp)).astype(np.float32)
            c = np.empty((rows, out), np.float32)
            wc = np.ascontiguousarray(w)
            gemms.append((a, wc, c))
    for name, w in model.named_params().items():  # hidden layers: not the output layers
        level, layer = name.split(".")[:2]
        if name.endswith(".weight") and not name.startswith("enc1."):
            n_layers = sum(1 for q in model.named_params() if q.startswith(level + ".")
                           and q.endswith(".weight"))
            if int(layer) < n_layers - 1:
                n_tanh += w.shape[0]
    # the elementwise math on cache-resident pieces (as the core meets them, layer by layer
    # on blocks of rows), 32768 elements a call, as many elements in all as the chunk has
    piece = 1 << 15
    tanh_in = rng.standard_normal(piece).astype(np.float32)
    soft_in = rng.standard_normal(piece).astype(np.float32) * 4
    n_tanh_calls = rows * n_tanh // piece
    n_soft_calls = rows * model.x_dim // piece

    def elementwise(op, a, calls):
        for _ in range(calls):
            hvae._core._vecmath(op, a)

    def run_gemms():
        for a, w, c in gemms:  # C (R, out) = A (R, in) W^T, row-major
            blas.cblas_sgemm(101, 111, 112, rows, w.shape[0], w.shape[1], ctypes.c_float(1.0),
                             ctypes.c_void_p(a.ctypes.data), w.shape[1],
                             ctypes.c_void_p(w.ctypes.data), w.shape[1], ctypes.c_float(0.0),
                             ctypes.c_void_p(c.ctypes.data), w.shape[0])

    parts = {
        "core forward (IWAE, log weights), 1 thread": lambda: model._core.forward(
            model.params, x, None, eps, log_weight=True, objective="iwae", k=rows, threads=1),
        "its GEMMs alone (cblas_sgemm, same shapes)": run_gemms,
        f"tanh of {n_tanh} hidden units per sample (core's vecmath)":
            lambda: elementwise("tanh", tanh_in, n_tanh_calls),
        f"softplus of {model.x_dim} logits per sample (core's vecmath)":
            lambda: elementwise("softplus", soft_in, n_soft_calls),
        "the core's noise (_core.Model.noise), 1 thread": lambda: model._core.noise(
            rows, args.seed, 0),
        "drawing eps with NumPy (HVAE.draw_eps), for comparison": lambda: model.draw_eps(rows),
    }
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        sec = speed.time_interleaved(parts, {p: repeats for p in parts}, 0.02, 0.05, 0.0)
    core = sec["core forward (IWAE, log weights), 1 thread"]
    accounted = sum(v for p, v in sec.items() if p.startswith(("its", "tanh", "softplus")))
    out = [[p, ms(v), f"{v / core:.0%}", f"{rows / v:,.0f}"] for p, v in sec.items()]
    out.append(["core forward minus GEMMs, tanh and softplus (bias adds, densities, log "
                "weights, copies)", ms(core - accounted), f"{(core - accounted) / core:.0%}",
                "-"])
    for r in out:
        print("    accounting  " + "  ".join(r), flush=True)
    return out


def batch_size_sweep(args, model, X, sizes=(4096, 5000, 10000)):
    """Rows (batch_size, examples per core call, samples/s) of log_likelihood on X at full_k
    with n_jobs=full_jobs: what the public knob changes (4096 is the default)."""
    out = []
    with threadpoolctl.threadpool_limits(args.full_jobs, user_api="blas"):
        for rows in sizes:
            model.log_likelihood(X[:1], k=args.full_k, batch_size=rows, n_jobs=args.full_jobs)
            t0 = time.perf_counter()
            model.log_likelihood(X, k=args.full_k, batch_size=rows, n_jobs=args.full_jobs)
            sec = time.perf_counter() - t0
            calls = (f"1 example in chunks of {rows} + {args.full_k % rows}"
                     if rows < args.full_k and args.full_k % rows else
                     f"{max(1, rows // args.full_k)} example(s) per call")
            out.append([rows, calls, f"{len(X) * args.full_k / sec:,.0f}",
                        f"{sec * 10000 / len(X) / 60:.1f} min"])
            print("    batch_size  " + "  ".join(map(str, out[-1])), flush=True)
    return out


ACCOUNT_HEADERS = ["part (one chunk: 1 example x 4096 samples)", "ms", "of the core forward",
                   "samples/s it alone allows"]


PHASE_HEADERS = ["threads", "samples/s", "core noise s (share)", "core forward s (share)",
                 "rest s (share)", "core alone samples/s", "core GFLOP/s of GEMM peak",
                 "noise alone samples/s", "the split at this rate"]


# ----------------------------------------------------------------------------------------------
# report

def full_target(args, full):
    what = (f"test split ({full['of']} images) at k={args.full_k}, n_jobs={args.full_jobs}: "
            f"< {TARGET_FULL / 60:g} min")
    if full["measured"]:
        got = f"{full['sec']:.1f} s ({full['sec'] / 60:.2f} min), {full['rate']:,.0f} samples/s"
    else:
        got = (f"EXTRAPOLATED from {full['examples']} examples ({full['sec']:.1f} s): "
               f"{full['split_sec']:.0f} s ({full['split_sec'] / 60:.2f} min) for the split at "
               f"{full['rate']:,.0f} samples/s")
    return [(what, got, verdict(full["split_sec"] < TARGET_FULL) +
             ("" if full["measured"] else " (extrapolated)"))]


def shown(path):
    """path relative to the repository when inside it."""
    path = path.resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def render(args, info, sections, warning):
    """(text, markdown) of what has been measured so far."""
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/speed_iwae.py",
                                                 *args.argv])
    method = (
        "float32 throughout (the guards also in float64). **Training step**: one call of the "
        "core's fused `train_step(..., objective=\"iwae\", k=k, gradient=\"standard\", "
        f"threads=n)` (forward + backward + Adam at lr {args.step_lr:g}"
        + ("; the same arithmetic as at any lr, the parameters staying at their initialisation "
           "so that every block times the same work: training drifts the importance weights "
           "into float32's subnormal range, see the subnormal section" if args.step_lr == 0
           else "")
        + "), what `fit(objective=\"iwae\", k=k)` calls; torch: `zero_grad` + the twin's loss "
        "+ `backward` + `torch.optim.Adam.step` (the same lr) "
        f"({args.torch_adam}), `torch.set_num_threads(n)`. The twins "
        "(`TorchIWAE` in speed_iwae.py, on torch_peer.py's `TorchHVAE` network) compute "
        "log w = log p(x|z_1) + sum_i log p(z_i|z_{i+1}) + log p(z_T) - sum_i log q(z_i|.) with "
        "exact Gaussian densities at the samples and loss = -mean_b (logsumexp_j log w_bj - "
        "log k); *x repeated*: `x.repeat_interleave(k, 0)` then the whole network on B*k rows; "
        "*encoder shared*: q(z_1|x)'s MLP on the B examples, its output `repeat_interleave`d to "
        "the B*k samples, the target broadcast (not copied) in the likelihood. Before timing, "
        "each twin's loss and gradient were checked equal to hvae's `loss_and_grad` in float64 "
        "(and float32; torch's Adam step from hvae's gradient equal to train_step's; "
        "train_step's loss and gradient equal to loss_and_grad's), on batches of 8 at every "
        "timed k. x and eps drawn before the timed region "
        f"(a pool of {POOL} batches cycled), the same for every implementation. Timing: "
        "speed.py's `time_interleaved` (warm-up, then blocks of hvae and the twins "
        f"alternating, {args.repeats} blocks of >= {args.min_time} s each, GC off), "
        f"{args.passes} passes over all cases; a figure is the median over passes, spread the "
        "lowest and highest pass. Ratios > 1: hvae faster. **Evaluation**: "
        f"`HVAE.log_likelihood(x, k={args.eval_k}, batch_size={args.eval_rows}, n_jobs=n)` on "
        f"the first {args.eval_examples} test images against `torch_log_likelihood` (the twin "
        "with the encoder shared under `torch.inference_mode()`, chunks of "
        f"{args.eval_rows} (example, sample) rows, `torch.randn` noise per chunk, log-sum-exp "
        "in float64); both draw their noise inside the timed call; the twin's log weights were "
        "checked equal to the core's IWAE-path log weights for the same noise (float64 and "
        f"float32) first; median of {args.eval_repeats} alternating calls after 2 warm-up "
        "calls each. The model: the committed checkpoint "
        f"`{shown(args.checkpoint)}`"
        " (two levels (100, 50), tanh, learned variance of p(z_1|z_2), bottom-up). **Test "
        f"split**: `log_likelihood(X, k={args.full_k}, n_jobs={args.full_jobs})` with the "
        f"default batch_size (4096), called on chunks of {args.full_chunk} examples for "
        f"progress (at k = {args.full_k} > batch_size the evaluation goes one example at a "
        "time in any case); samples/s = examples * k / wall seconds. **Phases**: the loop of "
        "`hvae.evaluation.iwae_bound` replicated in Python with its parts timed: the core's "
        "noise (`_core.Model.noise`, on the team of n threads; `iwae_bound` has the core draw it "
        "inside its forward call), the core's IWAE forward given it "
        "(`_core.Model.forward(..., log_weight=True, objective=\"iwae\")`, on the team of n "
        "threads), the rest; core GFLOP/s counts 2*in*out per sample for every layer but "
        "encoder 1's (shared), against the core's OpenBLAS SGEMM peak at n threads.")
    text = [f"{k}: {v}" for k, v in info.items()] + ([warning] if warning else [])
    md = ["# hvae speed: the importance-weighted objective (IWAE) against PyTorch", "",
          f"Command: `{command}`", "", *[f"- {k}: {v}" for k, v in info.items()], "",
          *([f"**{warning}**", ""] if warning else []), method]
    for title, headers, body, note in sections:
        if body:
            text += ["", title, text_table(headers, body)] + ([note] if note else [])
            md += ["", f"## {title}", "", md_table(headers, body)] + (["", note] if note else [])
    return "\n".join(text), "\n".join(md) + "\n"


def main(argv=None):
    args = parse_args(argv)
    blas = speed.OpenBLAS(speed.linked_openblas())
    info = speed.machine_info(blas)
    others = speed.run(["pgrep", "-af", "benchmarks/mnist.py"])
    info["other benchmarks running at start (pgrep -af benchmarks/mnist.py)"] = \
        others.replace("\n", "; ") or "none"
    if torch is None:
        print("note: torch is not importable; the PyTorch twins are skipped "
              "(install: .venv/bin/pip install torch==2.13.0)")
    train, note_train = load_split(args.data, "train", args.seed, n=50000)
    test, note_test = load_split(args.data, "test", args.seed)
    info["data"] = f"steps: {note_train}; evaluation: {note_test}"
    print(f"hvae IWAE speed benchmark: {info['machine']}; {info['data']}", flush=True)
    sections, targets, shares = [], [], {}
    t_run, cpu_run = time.perf_counter(), speed.cpu_seconds()

    def section(key, fn):
        t0, c0 = time.perf_counter(), speed.cpu_seconds()
        result = fn()
        shares[key] = speed.others_share(c0, speed.cpu_seconds(), time.perf_counter() - t0)
        print(f"  ({key}: {time.perf_counter() - t0:.1f} s; other processes took "
              f"{shares[key]:.1%} of the CPU time)", flush=True)
        return result

    def publish(final=False):
        share = speed.others_share(cpu_run, speed.cpu_seconds(), time.perf_counter() - t_run)
        inf = dict(info)
        inf["load average now (1, 5, 15 min)" if not final else
            "load average at end (1, 5, 15 min)"] = speed.load_average()
        inf["CPU time taken by other processes during the run"] = f"{share:.1%}" + (
            " (" + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()) + ")" if shares else "")
        if not final:
            inf["state"] = "INCOMPLETE: written after each section; the run was still going"
        body = sections + [("Targets", ["target", "measured", "verdict"], targets, None)]
        text, md = render(args, inf, body, speed.busy_warning(share))
        if args.output is not None:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(md)
        return text

    model = hvae.load(args.checkpoint)
    peaks = {th: speed.gemm_peak(blas, "float32", th, args.gemm_size)
             for th in sorted(set(args.threads) | {1})}
    info["SGEMM peak of the core's OpenBLAS (GFLOP/s, by threads)"] = ", ".join(
        f"{th}: {v:.1f}" for th, v in peaks.items())
    if "steps" not in args.skip:
        if torch is not None:
            print("  guard: the twins' IWAE loss and gradient against hvae's", flush=True)
            for name in args.models:
                for k in args.ks:
                    w = guard_steps(name, k, train, args.torch_adam, args.seed)
                    print(f"    {name} k={k}: worst relative difference " +
                          ", ".join(f"{d} {e:.2g}" for d, e in w.items()), flush=True)
        rows = section("steps", lambda: measure_steps(args, train, peaks))
        sections.append((f"One IWAE training step (float32, batch {args.batch})", STEP_HEADERS,
                         [step_cells(r) for r in rows], "Spread in parentheses: lowest and "
                         "highest pass. samples/s = batch * k / step time. GFLOP/s: the GEMM "
                         "FLOPs of the step computed densely with encoder 1 shared (what the "
                         "encoder-shared twin computes) over hvae's time, against the core's "
                         "OpenBLAS SGEMM peak at the same threads. Ceiling: the faster twin's "
                         "time over the time those FLOPs take at the GEMM peak, the ratio hvae "
                         "would reach computing them at 100% of peak and nothing else."))
        targets.extend(step_targets(rows))
        publish()
    if "breakdown" not in args.skip:
        rows = section("breakdown", lambda: measure_breakdown(args, train, peaks))
        sections.append((f"Where a training step's time goes (float32, batch {args.batch}, "
                         "one thread each)", BREAKDOWN_HEADERS, rows,
                         "Forward: the loss alone (hvae: `_core.Model.forward` without grad; "
                         "torch: under no_grad); backward: forward + backward minus forward; "
                         "Adam + rest: the step minus forward + backward. % GEMM peak: the "
                         "phase's dense FLOPs (encoder 1 shared) at the 1-thread SGEMM peak."))
        publish()
    if "drift" not in args.skip and args.drift_steps > 0 and torch is not None:
        rows = section("drift", lambda: measure_drift(args, train))
        sections.append(("Subnormal importance weights: a training step after training "
                         "(float32, batch 100, one thread each)", DRIFT_HEADERS, rows,
                         f"Both models trained {args.drift_steps} steps (Adam, lr 1e-3) from "
                         "the same initialisation on the pool's batches, then timed at lr 0. "
                         "'weights < float32 tiny': the share of the normalised importance "
                         "weights (softmax over each example's k log weights) below "
                         "1.18e-38. FTZ/DAZ: the same hvae step with the calling thread's "
                         "flush-to-zero and denormals-are-zero bits set "
                         "(`torch.set_flush_denormal(True)`, hvae on one thread so the core "
                         "computes on that thread); the gap is the cost of subnormal "
                         "arithmetic inside the core; torch FTZ/DAZ likewise for the twin "
                         "(one intra-op thread, the calling thread)."))
        publish()
    if "eval" not in args.skip:
        Xe = test[:args.eval_examples]
        if torch is not None:
            w = guard_eval(model, test[:4], 7, args.seed)
            print("  guard: evaluation log weights, worst relative difference " +
                  ", ".join(f"{d} {e:.2g}" for d, e in w.items()), flush=True)
        rows = section("eval", lambda: measure_eval(args, model, Xe))
        sections.append((f"Evaluation: log_likelihood at k = {args.eval_k} on "
                         f"{len(Xe)} test images (float32)",
                         ["implementation", "threads", "seconds", "samples/s",
                          "mean estimate (nats)", "torch time / hvae time"],
                         eval_cells(rows), "The two means differ by the noise of the two "
                         "estimators (independent draws)."))
        targets.extend(eval_targets(args, rows))
        publish()
    if "phases" not in args.skip:
        rows = section("phases", lambda: measure_phases(args, model,
                                                        test[:args.phase_examples], blas,
                                                        peaks))
        phase_at = len(sections)
        own, shared = per_sample_flops(model)
        sections.append((f"Where the evaluation's time goes ({args.phase_examples} test "
                         f"images at k = {args.full_k}, batch_size 4096)", PHASE_HEADERS,
                         rows, f"GEMM FLOPs per sample {own:,} (encoder 1, {shared:,} "
                         "FLOPs, once per example and chunk). 'noise alone' and 'core alone': "
                         "the samples/s each phase would allow by itself."))
        rows = section("batch_size", lambda: batch_size_sweep(args, model,
                                                             test[:args.phase_examples]))
        sections.append((f"log_likelihood's batch_size ({args.phase_examples} test images at "
                         f"k = {args.full_k}, n_jobs = {args.full_jobs})",
                         ["batch_size", "core calls", "samples/s", "the split at this rate"],
                         rows, None))
        rows = section("accounting", lambda: eval_accounting(args, model, test[:1], blas))
        sections.append(("The core's evaluation forward taken apart (one thread)",
                         ACCOUNT_HEADERS, rows, None))
        publish()
    if "full" not in args.skip:
        at = phase_at if "phases" not in args.skip else len(sections)
        full = section("full", lambda: measure_full(args, model, test))
        label = "measured" if full["measured"] else \
            f"EXTRAPOLATION from {full['examples']} of {full['of']} examples"
        sections.insert(at, (f"The test split at k = {args.full_k}, n_jobs = {args.full_jobs} "
                         f"({args.checkpoint.name})",
                         ["examples evaluated", "wall time (s)", "samples/s",
                          "time for the 10 000-image split", "mean log-likelihood (nats)",
                          "status"],
                         [[full["examples"], f"{full['sec']:.1f}", f"{full['rate']:,.0f}",
                           f"{full['split_sec']:.0f} s ({full['split_sec'] / 60:.2f} min)",
                           "-" if full["mean"] is None else f"{full['mean']:.3f}", label]],
                         f"samples/s of each call of {args.full_chunk} examples, in order: " +
                         ", ".join(f"{r / 1e3:.0f}k" for r in full["chunk_rates"]) +
                         f". Other processes took {shares['full']:.1%} of the CPU time during "
                         "this section."))
        targets.extend(full_target(args, full))
        publish()
    print("\n" + publish(final=True))
    if args.output is not None:
        print(f"\nwritten: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
