"""Reproduce the published test log-likelihoods on statically binarized MNIST (IWAE paper models).

Trains each selected model with Adam (batch 100), KL warm-up, a decaying learning rate and early
stopping on the validation split within a budget of CPU time (so a busy machine slows a run down
but does not shorten its training), then estimates the test
log-likelihood by importance sampling (k = 5000 by default) over the whole test split, and writes
a markdown table beside the published numbers plus a small checkpoint per model.

    python benchmarks/mnist.py --vae1 --budget-minutes 55
    python benchmarks/mnist.py --hvae2-mc --hvae2-analytic --budget-minutes 85
    python benchmarks/mnist.py --hvae2-topdown-iwae --threads 1 --budget-minutes 95 \
        --wall-limit-minutes 130                       # one core; stops at 130 min whatever
    python benchmarks/mnist.py --hvae2-iwae --average 0.9   # validate, keep averaged parameters
    python benchmarks/mnist.py --vae1 --quick          # an end-to-end smoke run in seconds
"""
import argparse
import datetime
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
import warnings

import numpy as np

import hvae
from hvae import datasets

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# name -> (constructor arguments, published test log-likelihood, where it was published).
# The two-level models learn the variance of p(z_1 | z_2), as in the IWAE paper; hvae2-unit keeps
# the seed's unit variance (its top level collapses: README).
HVAE2 = dict(latent_dims=[100, 50], hidden_dims=[[200, 200], [100, 100]])
HVAE2_SOURCE = "VampPrior paper, two levels, standard prior"
MODELS = {
    "vae1": (dict(latent_dims=[50], hidden_dims=[[200, 200]], kl="analytic"),
             -88.71, "IWAE paper appendix (VAE, k=1); VampPrior paper: -88.56"),
    "hvae2-mc": (dict(HVAE2, kl="mc", prior_variance="learned"), -86.05, HVAE2_SOURCE),
    "hvae2-analytic": (dict(HVAE2, kl="analytic", prior_variance="learned"), -86.05,
                       HVAE2_SOURCE),
    "hvae2-unit": (dict(HVAE2, kl="mc"), -86.05, HVAE2_SOURCE),
    # top-down (Ladder VAE) inference; its closed-form KL is unbiased, so kl="analytic"
    "hvae2-topdown": (dict(HVAE2, kl="analytic", inference="top_down"), -86.05, HVAE2_SOURCE),
    "vae1-iwae5": (dict(latent_dims=[50], hidden_dims=[[200, 200]], kl="analytic"), -87.63,
                   "IWAE paper appendix (IWAE, k=5)"),
    "vae1-iwae50": (dict(latent_dims=[50], hidden_dims=[[200, 200]], kl="analytic"), -87.10,
                    "IWAE paper appendix (IWAE, k=50)"),
    "hvae2-topdown-iwae": (dict(HVAE2, kl="analytic", inference="top_down"), -86.05,
                           HVAE2_SOURCE),
    # the IWAE paper's two-level architecture and inference: bottom-up, learned variance of
    # p(z1|z2) (compared, as the other two-level rows, with the VampPrior paper's standard prior)
    "hvae2-iwae": (dict(HVAE2, kl="analytic", prior_variance="learned"), -86.05, HVAE2_SOURCE),
    "hvae5-topdown": (dict(latent_dims=[64, 32, 16, 8, 4],
                           hidden_dims=[[512, 512], [256, 256], [128, 128], [64, 64], [32, 32]],
                           kl="analytic", inference="top_down"), -83.19,
                      "VampPrior paper, two-level HVAE with a VampPrior, gated MLPs: the best "
                      "published MLP result"),
}
# how the models other than the ELBO's train: fit's objective arguments
TRAINING = {"vae1-iwae5": dict(objective="iwae", k=5), "vae1-iwae50": dict(objective="iwae", k=50),
            "hvae2-topdown-iwae": dict(objective="iwae", k=5),
            "hvae2-iwae": dict(objective="iwae", k=5)}
TARGETS = {"vae1": -89.5, "hvae2-mc": -87.5, "hvae2-analytic": -87.5, "hvae2-unit": -87.5,
           "hvae2-topdown": -84.8, "hvae5-topdown": -84.0, "vae1-iwae5": -87.4,
           "vae1-iwae50": -87.1, "hvae2-topdown-iwae": -84.8, "hvae2-iwae": -84.0}
RAW_EVERY = 10  # with --average: epochs between validations of the parameters themselves


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vae1", action="store_true",
                   help="one stochastic level, 784-200-200-50, tanh, Bernoulli")
    p.add_argument("--hvae2-mc", action="store_true",
                   help="two levels x->[200,200]->z1(100)->[100,100]->z2(50), learned variance "
                        "of p(z1|z2), unbiased kl='mc'")
    p.add_argument("--hvae2-analytic", action="store_true",
                   help="the same two-level model trained with the seed's kl='analytic'")
    p.add_argument("--hvae2-unit", action="store_true",
                   help="hvae2-mc with the seed's unit variance of p(z1|z2)")
    p.add_argument("--hvae2-topdown", action="store_true",
                   help="the two-level architecture with top-down (Ladder VAE) inference, "
                        "learned variance of p(z1|z2), closed-form KL")
    p.add_argument("--vae1-iwae5", action="store_true",
                   help="vae1's architecture trained with the IWAE objective, k = 5")
    p.add_argument("--vae1-iwae50", action="store_true",
                   help="vae1's architecture trained with the IWAE objective, k = 50")
    p.add_argument("--hvae2-topdown-iwae", action="store_true",
                   help="hvae2-topdown trained with the IWAE objective, k = 5")
    p.add_argument("--hvae2-iwae", action="store_true",
                   help="the two-level model with bottom-up inference (as in the IWAE paper) "
                        "trained with the IWAE objective, k = 5")
    p.add_argument("--hvae5-topdown", action="store_true",
                   help="five top-down levels as in the Ladder VAE paper: latents 64-32-16-8-4, "
                        "hidden [512,512] .. [32,32]")
    p.add_argument("--budget-minutes", type=float, default=55.0,
                   help="training budget per model in CPU minutes of this process (evaluation "
                        "not included); the learning rate decays over it")
    p.add_argument("--wall-limit-minutes", type=float, default=None,
                   help="stop training after this much wall-clock time even if the CPU budget "
                        "is not spent (a run that must end by a deadline)")
    p.add_argument("--max-epochs", type=int, default=10000, help="epochs at most")
    p.add_argument("--lr", type=float, default=1e-3, help="initial Adam step size")
    p.add_argument("--lr-final", type=float, default=1e-4,
                   help="step size reached at the end of the budget (exponential decay in CPU "
                        "time)")
    p.add_argument("--warmup-epochs", type=float, default=20, help="KL warm-up epochs")
    p.add_argument("--warmup-delay", type=float, default=None,
                   help="epochs at KL weight 0 before the warm-up (default: 5 for the two-level "
                        "models, which keeps their top level from collapsing; 0 for vae1)")
    p.add_argument("--free-bits", type=float, default=None,
                   help="free bits in nats per level (Kingma et al. 2016): each level's KL term "
                        "of the training loss is at least this, for the models trained on the ELBO "
                        "(default: none)")
    p.add_argument("--average", type=float, default=None, metavar="DECAY",
                   help="validate (and keep) an exponential average of the parameters at the end "
                        "of each epoch, DECAY its weight per epoch (e.g. 0.9); the parameters "
                        f"themselves are validated every {RAW_EVERY} epochs beside it")
    p.add_argument("--patience", type=int, default=50,
                   help="stop after this many epochs without a better validation ELBO")
    p.add_argument("--eval-every", type=int, default=1, help="validate every N epochs")
    p.add_argument("--val-k", type=int, default=None,
                   help="importance samples of the validation bound that early stopping watches "
                        "(default: the training objective's k; 1, the ELBO, for ELBO models)")
    p.add_argument("-k", type=int, default=5000, help="importance samples for the test estimate")
    p.add_argument("--eval-examples", type=int, default=None,
                   help="test examples to evaluate (default: the whole test split)")
    p.add_argument("--max-examples", type=int, default=None,
                   help="use only this many training examples (smoke runs)")
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS threads (default: OpenBLAS's own choice)")
    p.add_argument("--seed", type=int, default=0, help="model seed")
    p.add_argument("--data-dir", default=None, help="directory of binarized_mnist.npz")
    p.add_argument("--output", default=os.path.join(RESULTS, "mnist.md"),
                   help="markdown table to write (rows of earlier runs of other models are kept)")
    p.add_argument("--checkpoint-dir", default=RESULTS, help="where the trained models go")
    p.add_argument("--level-stats", action="store_true",
                   help="train nothing: fill in the KL and active units per level of the table's "
                        "rows from their checkpoints (rows written before those columns)")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings for a smoke test: 1000 examples, 2 epochs, k=20, 100 "
                        "test examples")
    args = p.parse_args(argv)
    args.models = [name for name in MODELS if getattr(args, name.replace("-", "_"))]
    if not args.models and not args.level_stats:
        p.error("choose at least one of " + ", ".join(f"--{name}" for name in MODELS))
    if args.average is not None and not 0 <= args.average < 1:
        p.error(f"--average: expected a decay in [0, 1), got {args.average:g}")
    if args.quick:
        args.max_examples, args.max_epochs, args.k = 1000, 2, 20
        args.eval_examples, args.warmup_epochs, args.warmup_delay = 100, 1, 0.5
    return args


def warmup_delay(name, args):
    """The KL warm-up delay of a model: the flag, or its default."""
    if args.warmup_delay is not None:
        return args.warmup_delay
    return 5.0 if len(MODELS[name][0]["latent_dims"]) > 1 else 0.0


def free_bits(name, args):
    """The free bits of a model: the flag's, for the models trained on the ELBO (the IWAE bound
    has no per-level KL term to floor)."""
    return None if name in TRAINING else args.free_bits


def train(name, X, X_val, args, log):
    """Train one model within the budget; returns (model, epochs run, best epoch, CPU seconds).

    The best parameters so far are saved to the model's checkpoint every few minutes, so a run
    that is cut short still leaves its best model behind.
    """
    kwargs, _, _ = MODELS[name]
    objective = TRAINING.get(name, {})
    val_k = args.val_k or objective.get("k", 1)
    delay = warmup_delay(name, args)
    m = hvae.HVAE(784, seed=args.seed, init="glorot", **kwargs)  # the IWAE paper's init
    budget = 60 * args.budget_minutes
    wall_limit = np.inf if args.wall_limit_minutes is None else 60 * args.wall_limit_minutes
    c0, t0 = time.process_time(), time.perf_counter()
    best_val, best_params, best_epoch, epoch, saved = np.inf, m.params.copy(), 0, 0, t0
    average = None  # with --average: the exponential average of the end-of-epoch parameters
    while epoch < args.max_epochs:
        used = time.process_time() - c0
        if used > budget:
            break
        if time.perf_counter() - t0 > wall_limit:
            log(f"{name}: wall-clock limit reached after {used / 60:.1f} CPU minutes, stopping")
            break
        lr = args.lr * (args.lr_final / args.lr) ** min(1.0, used / budget)
        with warnings.catch_warnings():  # one epoch per call, lr set anew by the clock: fit's
            warnings.filterwarnings("ignore", "fit: ", UserWarning)  # notes on that are noise
            m.fit(X, epochs=epoch + 1, batch_size=100, lr=lr, lr_decay=1.0,
                  kl_warmup_epochs=args.warmup_epochs, kl_warmup_delay=delay,
                  free_bits=free_bits(name, args), progress=False, **objective)
        epoch += 1
        rec = m.history_[-1]
        if epoch <= delay:  # an autoencoder so far: its ELBO says nothing yet
            continue
        if args.average is not None:
            if average is None:
                average = m.params.copy()
            average *= args.average
            average += (1 - args.average) * m.params
        if epoch % args.eval_every == 0 or epoch == args.max_epochs:
            scored = [("val_loss", m.params)] if average is None else [("val_loss", average)]
            if average is not None and epoch % RAW_EVERY == 0:
                scored.append(("val_loss_raw", m.params))
            for key, params in scored:
                rec[key] = validation_bound(m, params, X_val, val_k)
                if rec[key] < best_val:
                    best_val, best_params, best_epoch = rec[key], params.copy(), epoch
            raw = f" (raw {rec['val_loss_raw']:.2f})" if "val_loss_raw" in rec else ""
            log(f"{name} epoch {epoch:4d}  {time.process_time() - c0:7.0f}s CPU  "
                f"{time.perf_counter() - t0:7.0f}s  lr {lr:.2e}  "
                f"train {rec['loss']:.2f}  kl {'/'.join(f'{k:.1f}' for k in rec['kl'])}  "
                f"valid{'' if val_k == 1 else f' (k={val_k})'}"
                f"{'' if average is None else ' averaged'} {rec['val_loss']:.2f}{raw}  "
                f"best {best_val:.2f} @ {best_epoch}")
            if epoch - best_epoch >= args.patience:
                log(f"{name}: no better validation bound for {args.patience} epochs, stopping")
                break
        if time.perf_counter() - saved > 600:
            save_best(m, best_params, checkpoint_path(name, args))
            saved = time.perf_counter()
    seconds = time.process_time() - c0
    m.params[:] = best_params
    return m, epoch, best_epoch, seconds


def validation_bound(m, params, X_val, k):
    """The negative mean k-sample bound over X_val of the model with the given parameters (the
    model's own are restored)."""
    current = m.params.copy()
    m.params[:] = params
    try:
        return float(-np.mean(m.elbo(X_val, k=k)))
    finally:
        m.params[:] = current


def checkpoint_path(name, args):
    """Where a model's checkpoint goes."""
    return os.path.join(args.checkpoint_dir, f"{name}.npz")


def save_best(m, best_params, path):
    """A small checkpoint (parameters, architecture, history; no optimiser state) of the best
    parameters so far, written atomically; the model itself is left as it is."""
    current, optimizer = m.params.copy(), m.optimizer_
    m.params[:], m.optimizer_ = best_params, None
    try:
        m.save(path)
    finally:
        m.params[:], m.optimizer_ = current, optimizer


def level_stats(m, X):
    """Per level (bottom first): the mean KL term in nats over X (the model's kl estimator, at
    fixed noise), and the number of active units (Burda et al. 2015: the variance over X of the
    posterior mean above 1e-2)."""
    rng = np.random.default_rng(0)  # fixed noise: the same numbers from the same parameters
    eps = [rng.standard_normal((len(X), d)).astype(m.dtype) for d in m.latent_dims]
    kl = [float(np.mean(t)) for t in m.elbo_terms(X, eps)["kl"]]
    active = [int((mu.astype(np.float64).var(axis=0) > 1e-2).sum()) for mu, _ in m.encode(X)]
    return kl, active


def fill_level_stats(args):
    """The KL and active units per level of every stored row that lacks them, from its
    checkpoint, over the test examples its log-likelihood was estimated on."""
    with open(args.output + ".json") as f:
        data = json.load(f)
    X_test = datasets.load_binarized_mnist("test", args.data_dir)
    rows = []
    for name, row in data.items():
        path = os.path.join(args.checkpoint_dir, f"{name}.npz")
        if "kl_levels" in row or not os.path.exists(path):
            continue
        m = hvae.load(path)
        kl, active = level_stats(m, X_test[:row.get("test_examples")])
        rows.append(dict(row, kl_levels=kl, active_units=active, latent_dims=m.latent_dims))
        print(f"{name}: KL per level {kl}, active units {active}", flush=True)
    write_table(args.output, rows)
    return 0


def git_commit():
    """The short commit of the checkout, with '+' when the working tree differs from it."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, cwd=here).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty.strip() else "")


def write_table(path, rows):
    """Merge rows (by model name) into the markdown table at path (and its .json store), under
    a lock: runs of different models in parallel keep each other's rows."""
    store = path + ".json"
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = {}
        if os.path.exists(store):
            with open(store) as f:
                data = json.load(f)
        data.update({r["model"]: r for r in rows})
        tmp = store + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, store)
        _write_markdown(path, data)


def _write_markdown(path, data):
    """The markdown table of every stored row."""
    lines = [
        "# Test log-likelihood on statically binarized MNIST",
        "",
        "Written by `benchmarks/mnist.py` (see the README). Log-likelihoods in nats, "
        "importance-sampled with k samples over the test split; ELBO with k = 1. Adam, batch 100, "
        "KL warm-up, early stopping on the validation split, learning rate decayed over a "
        "budget of training time (CPU time of the run's process where the train time says CPU, "
        "wall-clock time before), on the machine named in each row.",
        "",
        "KL warm-up: epochs at KL weight 0 + epochs of linear rise. KL and active units per level "
        "(bottom level first) over the test split: the mean KL term in nats, and the units whose "
        "posterior mean varies over the test images by more than 1e-2 (Burda et al. 2015), of "
        "the level's size.",
        "",
        "| model | architecture | kl | test log-lik. | k | test ELBO | published | target | "
        "KL per level | active units | epochs (best) | KL warm-up | train time | date | commit | "
        "machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data.values():
        met = "met" if r["test_ll"] >= r["target"] else f"missed by {r['target'] - r['test_ll']:.2f}"
        cells = [r["model"], r["architecture"], r["kl"],
                 f"**{r['test_ll']:.2f}** ± {r['test_ll_se']:.2f}", r["k"],
                 f"{r['test_elbo']:.2f}", f"{r['published']} ({r['source']})",
                 f"{r['target']} ({met})",
                 " / ".join(f"{k:.1f}" for k in r["kl_levels"]) if "kl_levels" in r else "",
                 " / ".join(f"{a} of {d}" for a, d in zip(r["active_units"], r["latent_dims"]))
                 if "active_units" in r else "",
                 f"{r['epochs']} ({r['best_epoch']})", r.get("warmup", "0 + 20"),
                 f"{r['train_minutes']:.1f} min{' CPU' if r.get('clock') == 'CPU' else ''}",
                 r["date"],
                 r["commit"], r["machine"]]
        # a "|" inside a cell (p(z1|z2)) is escaped, else it splits the cell
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)

    def log(msg):
        print(msg, flush=True)

    if args.level_stats:
        return fill_level_stats(args)
    commit = git_commit()  # the code that trains: recorded before anything else can change
    X = datasets.load_binarized_mnist("train", args.data_dir)[:args.max_examples]
    X_val = datasets.load_binarized_mnist("valid", args.data_dir)
    X_test = datasets.load_binarized_mnist("test", args.data_dir)[:args.eval_examples]
    if args.quick:
        X_val = X_val[:500]
    os.makedirs(args.checkpoint_dir, exist_ok=True)
    rows = []
    for name in args.models:
        m, epochs, best_epoch, seconds = train(name, X, X_val, args, log)
        t0 = time.perf_counter()
        ll = m.log_likelihood(X_test, k=args.k, progress=sys.stderr.isatty())
        elbo = m.elbo(X_test)
        log(f"{name}: test log-likelihood {ll.mean():.2f} (k={args.k}, {len(ll)} examples, "
            f"{time.perf_counter() - t0:.0f}s), test ELBO {elbo.mean():.2f}")
        kl, active = level_stats(m, X_test)
        ckpt = checkpoint_path(name, args)
        save_best(m, m.params, ckpt)
        kwargs, published, source = MODELS[name]
        arch = " -> ".join(["784"] + [f"{h} -> {d}" for h, d in zip(kwargs["hidden_dims"],
                                                                   kwargs["latent_dims"])])
        if len(kwargs["latent_dims"]) > 1:
            arch += f", {m.prior_variance} variance of p(z_i|z_i+1)"
        if m.inference == "top_down":
            arch += ", top-down inference"
        rows.append(dict(
            model=name, architecture=arch,
            kl=kwargs["kl"] + "".join(f", {k}={v}" for k, v in TRAINING.get(name, {}).items())
            + ("" if free_bits(name, args) is None
               else f", free bits {free_bits(name, args):g} nats per level")
            + ("" if args.average is None
               else f", parameters averaged (decay {args.average:g} per epoch)")
            + ("" if args.seed == 0 else f", seed {args.seed}"),
            test_ll=float(ll.mean()),
            test_ll_se=float(ll.std() / np.sqrt(len(ll))), k=args.k,
            test_elbo=float(elbo.mean()), kl_levels=kl, active_units=active,
            latent_dims=list(kwargs["latent_dims"]), published=published, source=source,
            target=TARGETS[name], epochs=epochs, best_epoch=best_epoch,
            warmup=f"{warmup_delay(name, args):g} + {args.warmup_epochs:g}",
            train_minutes=seconds / 60, clock="CPU", date=datetime.date.today().isoformat(),
            commit=commit, machine=f"{os.cpu_count()} cores {platform.machine()}",
            test_examples=len(ll), checkpoint=os.path.relpath(ckpt)))
    write_table(args.output, rows)
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
