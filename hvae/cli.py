"""The ``hvae`` command line: train, evaluate, sample from and inspect checkpoints.

    hvae train --data binarized_mnist --latent-dims 100 50 --epochs 100 --checkpoint run.npz
    hvae eval run.npz -k 5000
    hvae sample run.npz -n 64 --output samples.png
    hvae info run.npz

``python -m hvae ...`` is the same. Every command has ``--help``. Expected failures (a missing
file, bad flag values, a diverged run) print one line ``hvae: error: ...`` on stderr and exit
with status 2 (usage) or 1 (everything else); ``--traceback`` shows the full traceback instead.
"""
import argparse
import math
import os
import sys
import time
import traceback
import warnings

import numpy as np

from . import parallel
from .datasets import SPLITS, subset
from .training import TRAIN_DEFAULTS

DATASETS = ("binarized_mnist", "mnist", "digits")
GREY = ("mnist", "digits")
DEFAULT_LATENT = {"binarized_mnist": [100, 50], "mnist": [100, 50], "digits": [16, 8]}
_SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}
EXIT_USAGE, EXIT_ERROR, EXIT_INTERRUPTED = 2, 1, 130


class UsageError(Exception):
    """Bad command-line usage: exit status 2."""


class CLIError(Exception):
    """An expected runtime failure: exit status 1."""


# ----------------------------------------------------------------------------------------------
# argument parsing


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" for every option with a real default (not None / False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default is None or default is False
                or default is argparse.SUPPRESS or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and do not exit (main returns 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _float_at_least(low, strict=False):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low or (strict and value == low):
            bound = f"> {low:g}" if strict else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text!r}")
        return value
    parse.__name__ = "number"
    return parse


_positive_float = _float_at_least(0.0, strict=True)
_nonnegative_float = _float_at_least(0.0)


def _hidden_group(text):
    """'200,200' -> [200, 200]; '' or 'none' -> [] (no hidden layer at that level)."""
    if text.strip().lower() in ("", "none"):
        return []
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        widths = None
    if not widths or any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated widths >= 1 such as '200,200' (or 'none'), got {text!r}")
    return widths


def _image_shape(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 28x28, got {text!r}") \
            from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 28x28, got {text!r}")
    return h, w


def _add_data_flags(p, help_default):
    p.add_argument("--data", choices=DATASETS,
                   help="the data set: binarized_mnist (statically binarized MNIST, the standard "
                        "train/valid/test split), mnist (grey-level MNIST; train = the first 90%% "
                        "of the 60000 training images, valid = the last 10%%, test = t10k), "
                        "digits (scikit-learn's 1797 8x8 digits; train = the first 1350, valid = "
                        "the next 150, test = the last 297)" + help_default)
    p.add_argument("--data-dir", metavar="DIR",
                   help="directory holding the data files (default: $HVAE_DATA, else "
                        "../shared/data beside the repository)")
    p.add_argument("--no-binarize", action="store_true",
                   help="use grey levels as they are (mnist, digits). By default, for the "
                        "bernoulli likelihood, grey-level training data are dynamically "
                        "binarized (fresh Bernoulli draws every epoch) and validation/test data "
                        "binarized once, seeded by the model's seed")


def build_parser():
    """The argparse parser of the ``hvae`` command."""
    from . import __version__

    parser = _Parser(
        prog="hvae",
        description="Hierarchical VAEs with a C core: train, evaluate, sample, inspect.",
        epilog="Run 'hvae COMMAND --help' for the flags of a command. Numbers are in nats per "
               "example; log-likelihoods are importance-sampled (the IWAE bound with k "
               "samples).")
    parser.add_argument("--version", action="version", version=f"hvae {__version__}")
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, show the full Python traceback instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser,
                                help="one of:")

    # train ------------------------------------------------------------------------------------
    p = sub.add_parser(
        "train", help="train a model, checkpointing after every epoch",
        description="Train a hierarchical VAE with Adam. The checkpoint is written atomically "
                    "after every epoch with the run's settings; --resume continues an "
                    "interrupted run with them (flags given anew override them and are "
                    "reported). The defaults are those of HVAE and HVAE.fit in Python.",
        epilog="example: hvae train --data binarized_mnist --latent-dims 100 50 "
               "--prior-variance learned --epochs 100 --checkpoint run.npz; later: hvae train "
               "--checkpoint run.npz --resume")
    resumed = "; with --resume: the run's"
    _add_data_flags(p, f" (default: binarized_mnist{resumed})")
    p.add_argument("--max-examples", type=_positive_int, metavar="N",
                   help="train on N training examples only, a fixed random subset (quick runs; "
                        f"default: all{resumed})")
    g = p.add_argument_group("architecture (ignored with --resume of an existing checkpoint, "
                             "where they must match it if given)")
    g.add_argument("--latent-dims", type=_positive_int, nargs="+", metavar="D",
                   help="widths of the stochastic levels, bottom first; their number is the "
                        "number of levels (default: 100 50 for the MNIST data, 16 8 for digits)")
    g.add_argument("--hidden-dims", type=_hidden_group, nargs="+", metavar="W,W",
                   help="hidden widths of each level's encoder MLP, one comma-separated group "
                        "per level (or one group for every level; 'none' for no hidden layer); "
                        "decoders use them reversed (default: IWAE-style, two layers of "
                        "max(2 d_i, min(200, d_{i-1})), e.g. 200,200 100,100 for 784 -> 100 -> "
                        "50)")
    g.add_argument("--likelihood", choices=("bernoulli", "gaussian", "gaussian_learned"),
                   help="p(x|z_1) (default: bernoulli)")
    g.add_argument("--activation", choices=("tanh", "relu", "leaky_relu"),
                   help="after every hidden layer (default: tanh)")
    g.add_argument("--kl", choices=("mc", "analytic"),
                   help="KL estimator of the training loss: mc is unbiased (the loss is a true "
                        "negative ELBO); analytic is the closed-form chain of the seed "
                        "documents, biased for two or more levels (default: mc)")
    g.add_argument("--prior-variance", choices=("unit", "learned"),
                   help="variance of p(z_{i-1}|z_i) between levels: the identity, or learned by "
                        "the decoder as in the IWAE paper (default: unit for bottom-up inference, "
                        "learned for top-down)")
    g.add_argument("--inference", choices=("bottom_up", "top_down"),
                   help="q(z_i|z_{i-1}) (bottom_up), or the Ladder VAE's top-down q(z_i|z_{i+1}, "
                        "x), which shares the decoders with p (needs a hidden layer per level) "
                        "(default: bottom_up)")
    g.add_argument("--init", choices=("glorot", "torch"),
                   help="weight initialisation: Glorot uniform with zero biases, or "
                        "torch.nn.Linear's (default: glorot)")
    g.add_argument("--dtype", choices=("float32", "float64"), help="(default: float32)")
    g.add_argument("--seed", type=int,
                   help="seeds initialisation, noise, shuffling and binarization (default: 0)")
    g.add_argument("--deterministic", action="store_true",
                   help="a plain autoencoder: no sampling, no KL")
    d = TRAIN_DEFAULTS
    g = p.add_argument_group("training (saved in the checkpoint; --resume restores them)")
    g.add_argument("--epochs", type=_positive_int, metavar="N",
                   help=f"the run's length in epochs, those already done included (default: "
                        f"{d['epochs']}{resumed})")
    g.add_argument("--batch-size", type=_positive_int, metavar="N",
                   help=f"examples per Adam step (default: {d['batch_size']}{resumed})")
    g.add_argument("--lr", type=_positive_float, metavar="LR",
                   help=f"Adam's step size in the first epoch (default: {d['lr']:g}{resumed})")
    g.add_argument("--lr-decay", type=_positive_float, metavar="F",
                   help=f"the step size falls exponentially to LR * F in the last epoch (1: "
                        f"constant; default: {d['lr_decay']:g}{resumed})")
    g.add_argument("--kl-warmup-epochs", type=_nonnegative_float, metavar="E",
                   help=f"the KL weight rises linearly from 0 to --beta over this many epochs "
                        f"(default: {d['kl_warmup_epochs']:g}{resumed})")
    g.add_argument("--kl-warmup-delay", type=_nonnegative_float, metavar="E",
                   help=f"epochs at KL weight 0 before the warm-up starts (keeps the upper "
                        f"levels of a hierarchy from collapsing; default: "
                        f"{d['kl_warmup_delay']:g}{resumed})")
    g.add_argument("--beta", type=_nonnegative_float, metavar="B",
                   help=f"KL weight after warm-up (1 for the ELBO; default: {d['beta']:g}"
                        f"{resumed})")
    g.add_argument("--free-bits", type=_nonnegative_float, nargs="+", metavar="NATS",
                   help="free bits: each level's KL term in the training loss is at least this "
                        f"(one value for every level, or one per level; default: none{resumed})")
    g.add_argument("--objective", choices=("elbo", "iwae"),
                   help="the ELBO, or the importance-weighted bound (IWAE) with -k samples per "
                        f"example (default: {d['objective']}{resumed})")
    g.add_argument("-k", "--samples", type=_positive_int, metavar="K", dest="k",
                   help=f"importance samples per example of --objective iwae (default: "
                        f"{d['k']}{resumed})")
    g.add_argument("--gradient", choices=("standard", "dreg"),
                   help="IWAE's gradient: standard, or doubly reparameterized (one level only; "
                        f"lower variance for the encoder; default: {d['gradient']}{resumed})")
    g.add_argument("--patience", type=int, metavar="N",
                   help="stop after this many epochs without a better validation loss and keep "
                        f"the best parameters (0: no early stopping; default: {d['patience']}"
                        f"{resumed})")
    g.add_argument("--n-jobs", type=int, metavar="N",
                   help="threads of the core for each training step (-1: every CPU; default: "
                        "1); not saved, the results depend on it only up to rounding")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar (one line per epoch instead)")
    g.add_argument("--mpi", action="store_true",
                   help="data-parallel training over the ranks of an MPI job: mpiexec -n N "
                        "hvae train ... --mpi (needs pip install 'hvae[mpi]'); each batch is "
                        "split over the ranks, the result equals a one-process run with the "
                        "same --batch-size; rank 0 prints and writes the checkpoint")
    g = p.add_argument_group("checkpoint")
    g.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="the .npz file written atomically after every epoch (required; missing "
                        "folders are created)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--resume", action="store_true",
                   help="if PATH exists, load it and continue its run with its saved settings "
                        "and data up to its planned --epochs")
    x.add_argument("--overwrite", action="store_true",
                   help="start a new model even if PATH exists (default: refuse)")

    # eval -------------------------------------------------------------------------------------
    p = sub.add_parser(
        "eval", help="importance-sampled log-likelihood and ELBO of a checkpoint",
        description="Estimate the log-likelihood of a data split by importance sampling (the "
                    "IWAE bound with k samples; k = 5000 for published tables) and the ELBO "
                    "(k = 1), each as mean +- standard error over examples, in nats.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint written by train")
    _add_data_flags(p, " (default: the data set the checkpoint was trained on; for older "
                       "checkpoints binarized_mnist for a 784-pixel model, digits for a 64-pixel "
                       "one)")
    p.add_argument("--split", choices=SPLITS, default="test", help="which split to evaluate")
    p.add_argument("-k", type=_positive_int, default=5000, help="importance samples per example")
    p.add_argument("--max-examples", type=_positive_int, metavar="N",
                   help="evaluate N examples of the split only, a fixed random subset (the same "
                        "every run; default: all)")
    p.add_argument("--batch-size", type=_positive_int, default=4096, metavar="ROWS",
                   help="(example, sample) rows per core call; bounds memory")
    p.add_argument("--seed", type=int,
                   help="seed of the importance samples (default: the checkpoint's saved "
                        "random state)")
    p.add_argument("--n-jobs", type=int, metavar="N",
                   help="threads of the core (-1: every CPU; default: 1); the estimate does not "
                        "depend on it (up to rounding)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--mpi", action="store_true",
                   help="split the examples over the ranks of an MPI job: mpiexec -n N hvae "
                        "eval ... --mpi (needs pip install 'hvae[mpi]'); rank 0 prints")

    # sample -----------------------------------------------------------------------------------
    p = sub.add_parser(
        "sample", help="draw samples from a checkpoint into a PNG grid",
        description="Ancestral samples z_T -> ... -> z_1 -> E[x|z_1] (pixel probabilities for "
                    "the bernoulli likelihood), tiled into a greyscale PNG.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint written by train")
    p.add_argument("-n", type=_positive_int, default=64, help="number of samples")
    p.add_argument("--temperature", type=_nonnegative_float, default=1.0, metavar="T",
                   help="noise scale at every level (1: the model; < 1: sharper samples)")
    p.add_argument("--output", "-o", default="samples.png", metavar="PNG",
                   help="the PNG file to write")
    p.add_argument("--seed", type=int,
                   help="seed of the samples (default: fresh randomness)")
    p.add_argument("--ncols", type=_positive_int, metavar="N",
                   help="images per row (default: about sqrt(n))")
    p.add_argument("--scale", type=_positive_int, metavar="S",
                   help="enlarge every pixel this many times (default: about 56 / image side, "
                        "2 for 28x28)")
    p.add_argument("--image-shape", type=_image_shape, metavar="HxW",
                   help="shape of one image (default: square, inferred from the model's x_dim)")

    # info -------------------------------------------------------------------------------------
    p = sub.add_parser(
        "info", help="describe a checkpoint",
        description="Print a checkpoint's architecture, parameter count, training history "
                    "summary and file size.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint written by train")
    return parser


# ----------------------------------------------------------------------------------------------
# data


def data_seed(model):
    """The seed for binarizing data: the model's seed (0 if it has none), an int or a list."""
    return 0 if model.seed is None else model.seed


def load_split(data, split, data_dir=None):
    """One split of a data set as float32 (n, pixels) in [0, 1] (grey levels for mnist and
    digits). Splits: see ``hvae train --help``."""
    from . import datasets

    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if data == "binarized_mnist":
        return datasets.load_binarized_mnist(split, data_dir=data_dir)
    if data == "mnist":
        return datasets.load_mnist(split, data_dir=data_dir)
    if data == "digits":
        return datasets.load_digits(split)
    raise ValueError(f"data: expected one of {DATASETS}, got {data!r}")


def binarizes(data, likelihood, no_binarize=False):
    """Whether grey-level data are binarized for this model."""
    return data in GREY and likelihood == "bernoulli" and not no_binarize


def binarize_split(x, seed, split, epoch=0):
    """Bernoulli draws of grey levels, reproducible from (seed, split, epoch)."""
    from . import datasets

    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
    return datasets.binarize(x, rng=np.random.default_rng([*seeds, _SPLIT_CODE[split], epoch]))


def training_data(model, x, dynamic):
    """The array to pass to ``model.fit`` and a callback to pass with it.

    With ``dynamic`` (grey levels under the Bernoulli likelihood), the array holds Bernoulli
    draws of ``x`` for the model's next epoch and the callback redraws it in place after every
    epoch, from (model seed, epoch), so that a resumed run sees the same draws as an
    uninterrupted one. Otherwise the array is ``x`` in the model's dtype and the callback does
    nothing.
    """
    grey = np.ascontiguousarray(x, dtype=model.dtype)
    if not dynamic:
        return grey, lambda m, record: None
    seed = data_seed(model)
    X = np.ascontiguousarray(binarize_split(grey, seed, "train", len(model.history_)),
                             dtype=model.dtype)
    if model._check_x(X) is not X:  # fit must train on this very buffer
        raise RuntimeError("internal: HVAE.fit copies its training data, so dynamic "
                           "binarization cannot redraw it")

    def redraw(m, record):
        X[:] = binarize_split(grey, seed, "train", len(m.history_))

    return X, redraw


def _prepare(x, data, model, split, no_binarize):
    x = binarize_split(x, data_seed(model), split) if binarizes(data, model.likelihood,
                                                                no_binarize) else x
    if x.shape[1] != model.x_dim:
        raise CLIError(f"{data} has {x.shape[1]} pixels per example but the model has "
                       f"x_dim={model.x_dim}; pass the --data the model was trained on")
    return np.ascontiguousarray(x, dtype=model.dtype)


def _mean_se(values):
    values = np.asarray(values, dtype=np.float64)
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(se)


# ----------------------------------------------------------------------------------------------
# commands


def _load(path):
    from .model import load

    if not os.path.exists(path):
        raise CLIError(f"{path}: no such checkpoint")
    if os.path.isdir(path):
        raise CLIError(f"{path}: is a directory, not a checkpoint")
    return load(path)


def _check_resume_flags(args, model):
    """With --resume, architecture flags that were given must match the checkpoint."""
    given = {"latent_dims": args.latent_dims, "likelihood": args.likelihood,
             "activation": args.activation, "kl": args.kl, "dtype": args.dtype,
             "seed": args.seed, "prior_variance": args.prior_variance, "init": args.init,
             "inference": args.inference}
    if args.hidden_dims is not None:
        hd = args.hidden_dims
        given["hidden_dims"] = hd * len(model.latent_dims) if len(hd) == 1 else hd
    if args.deterministic:
        given["deterministic"] = True
    for name, value in given.items():
        if value is not None and value != getattr(model, name):
            flag = "--" + name.replace("_", "-")
            raise CLIError(f"{flag} {value} does not match the checkpoint {args.checkpoint} "
                           f"({name}={getattr(model, name)!r}); drop the flag to resume it, or "
                           f"use --overwrite to start a new model")


def _new_model(args, data):
    from .model import HVAE

    latent = args.latent_dims or DEFAULT_LATENT[data]
    hidden = args.hidden_dims
    if hidden is not None and len(hidden) not in (1, len(latent)):
        raise UsageError(f"argument --hidden-dims: {len(hidden)} groups for {len(latent)} "
                         f"levels; give one group per level (or one for all) "
                         f"(see 'hvae train --help')")
    if hidden is not None and len(hidden) == 1:
        hidden = hidden * len(latent)
    x_dim = 64 if data == "digits" else 784
    given = {"likelihood": args.likelihood, "activation": args.activation, "kl": args.kl,
             "dtype": args.dtype, "prior_variance": args.prior_variance, "init": args.init,
             "inference": args.inference}
    return HVAE(x_dim, latent, hidden, seed=0 if args.seed is None else args.seed,
                deterministic=args.deterministic,
                **{k: v for k, v in given.items() if v is not None})


def _free_bits(values):
    """--free-bits as fit takes it: None, one number for every level, or one per level."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else values


def _epoch_line(record, total):
    kl = "/".join(f"{k:.2f}" for k in record["kl"])
    val = "" if record.get("val_loss") is None else f"  val {record['val_loss']:.2f}"
    return (f"epoch {record['epoch']}/{total}  loss {record['loss']:.2f}  "
            f"rec {record['reconstruction']:.2f}  kl {kl}  beta {record['beta']:.2f}{val}  "
            f"{record['seconds']:.1f}s")


def _plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def _data_settings(args, model, resuming):
    """The run's data set, its subset and binarization: the flags, else (resuming) the saved
    ones, else the defaults; and the flags that change saved values, as (flag, old, new)."""
    saved = model.train_config_ if resuming else {}
    given = {"data": args.data, "max_examples": args.max_examples,
             "no_binarize": args.no_binarize or None}
    defaults = {"data": "binarized_mnist", "max_examples": None, "no_binarize": False}
    settings, changed = {}, []
    for key, value in given.items():
        if value is None:
            value = saved.get(key, defaults[key])
        elif key in saved and saved[key] != value:
            changed.append(("--" + key.replace("_", "-"), saved[key], value))
        settings[key] = value
    return settings, changed


def cmd_train(args, out):
    from . import training

    path = args.checkpoint
    if os.path.isdir(path):
        raise CLIError(f"--checkpoint {path}: is a directory; give a file name such as "
                       f"{os.path.join(path, 'model.npz')}")
    exists = os.path.exists(path)
    resuming = args.resume and exists
    if resuming:
        model = _load(path)
        _check_resume_flags(args, model)
    else:
        if exists and not args.overwrite:
            raise CLIError(f"{path} exists; pass --resume to continue training it or "
                           f"--overwrite to start a new model")
        model = _new_model(args, args.data or "binarized_mnist")
        if args.resume:
            print(f"no checkpoint at {path} yet; starting a new model", file=out)
    data, changed = _data_settings(args, model, resuming)
    if args.free_bits is not None and len(args.free_bits) not in (1, model.n_levels):
        raise UsageError(f"argument --free-bits: {len(args.free_bits)} values for "
                         f"{model.n_levels} levels; give one value (every level) or one per "
                         f"level (see 'hvae train --help')")
    given = {key: getattr(args, key) for key in TRAIN_DEFAULTS}
    given["free_bits"] = _free_bits(args.free_bits)
    try:
        settings, overrides = training.resolve_settings(model, given)
    except ValueError as exc:  # "name: why" -> "argument --name: why"
        name, why = str(exc).split(":", 1)
        flag = "-k" if name == "k" else "--" + name.lstrip("-").replace("_", "-")
        raise UsageError(f"argument {flag}:{why} (see 'hvae train --help')") from None
    if resuming:
        planned = model.train_config_.get("epochs")
        print(f"resuming {path}: {_plural(len(model.history_), 'epoch')} done"
              + (f" of {planned}" if planned else "")
              + ("" if model.train_config_ else " (a checkpoint without saved settings: the "
                 "flags and the defaults apply)"), file=out)
        for flag, old, new in changed + [("--" + k.replace("_", "-"), old, new)
                                         for k, (old, new) in overrides.items()]:
            print(f"{flag} {new} overrides the run's {old}", file=out)
    if model.x_dim != (64 if data["data"] == "digits" else 784):
        raise CLIError(f"{path}: the model has x_dim={model.x_dim}, which does not fit "
                       f"--data {data['data']}")
    # all data first, so a missing file fails before any training
    grey = binarizes(data["data"], model.likelihood, data["no_binarize"])
    train = subset(load_split(data["data"], "train", args.data_dir), data["max_examples"])
    valid = _prepare(load_split(data["data"], "valid", args.data_dir), data["data"], model,
                     "valid", data["no_binarize"])
    X, redraw = training_data(model, train, grey)
    model.train_config_.update(data)
    print(f"model: {model!r}", file=out)
    how = " (dynamically binarized)" if grey else ""
    print(f"data: {data['data']}, train {len(X)}{how}, valid {len(valid)}, {model.x_dim} "
          f"pixels", file=out)
    remaining = settings["epochs"] - len(model.history_)
    progress = not args.no_progress

    def report(m, record):
        line = _epoch_line(record, settings["epochs"])
        if progress:
            from tqdm.auto import tqdm
            tqdm.write(line, file=out)
        else:
            print(line, file=out, flush=True)
        redraw(m, record)

    if remaining <= 0:
        print(f"{path} already holds {_plural(len(model.history_), 'epoch')} (--epochs "
              f"{settings['epochs']}); nothing to train", file=out)
        return 0
    for note in training.notes(model, settings, {}):
        print(f"note: {note}", file=out)
    print(f"training {_plural(remaining, 'epoch')} (batch {settings['batch_size']}, lr "
          f"{settings['lr']:g} decaying to {settings['lr'] * settings['lr_decay']:g}, KL weight "
          f"0 for {settings['kl_warmup_delay']:g} epochs then rising to {settings['beta']:g} "
          f"over {settings['kl_warmup_epochs']:g}); checkpoint {path}", file=out, flush=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fit interrupted", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="fit: ", category=UserWarning)  # said above
        try:
            model.fit(X, **given, validation_data=valid, progress=progress, checkpoint=path,
                      callbacks=[report], n_jobs=args.n_jobs, comm=args.comm)
        except FloatingPointError as exc:
            raise CLIError(f"{exc} {_saved(path, model)}") from None
    if getattr(model, "interrupted_", False):
        print(f"hvae: interrupted; {_saved(path, model)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if len(model.history_) < settings["epochs"]:
        print(f"early stopping after epoch {len(model.history_)} (no better validation "
              f"loss for {settings['patience']} epochs); kept the best parameters", file=out)
    print(f"done: {path} holds {_plural(len(model.history_), 'epoch')}; evaluate it with "
          f"'hvae eval {path}'", file=out)
    return 0


def _saved(path, model):
    if not model.history_ or not os.path.exists(path):
        return "No epoch was completed, nothing was saved."
    return (f"{path} holds the {len(model.history_)} completed epochs; continue with "
            f"--resume.")


def _resolve_eval_data(args, model):
    if args.data is not None:
        return args.data
    if "data" in model.train_config_:
        return model.train_config_["data"]
    if model.x_dim == 784:
        return "binarized_mnist"
    if model.x_dim == 64:
        return "digits"
    raise CLIError(f"the model has x_dim={model.x_dim}, which matches none of the data sets; "
                   f"pass --data")


def cmd_eval(args, out):
    model = _load(args.checkpoint)
    if model.deterministic:
        raise CLIError(f"{args.checkpoint}: a deterministic autoencoder has no likelihood to "
                       f"evaluate")
    data = _resolve_eval_data(args, model)
    x = load_split(data, args.split, args.data_dir)
    x = subset(x, args.max_examples)
    no_binarize = args.no_binarize or model.train_config_.get("no_binarize", False)
    x = _prepare(x, data, model, args.split, no_binarize)
    if args.seed is not None:
        model._rng = np.random.default_rng(args.seed)
    print(f"model: {model!r}", file=out)
    how = " (binarized)" if binarizes(data, model.likelihood, no_binarize) else ""
    print(f"data: {data} {args.split}, {len(x)} examples{how}", file=out, flush=True)
    t0 = time.perf_counter()
    mean, se = _mean_se(model.elbo(x, k=1, n_jobs=args.n_jobs, comm=args.comm))
    t_elbo = time.perf_counter() - t0
    print(f"ELBO (k=1): {mean:.3f} +- {se:.3f} nats", file=out, flush=True)
    print(f"log-likelihood with k={args.k}: about {_duration(t_elbo * args.k)} (the ELBO, one "
          f"sample per example, took {t_elbo:.1f}s; --max-examples or a smaller -k is faster)",
          file=out, flush=True)
    t0 = time.perf_counter()
    ll = model.log_likelihood(x, k=args.k, batch_size=args.batch_size,
                              progress=not args.no_progress, n_jobs=args.n_jobs, comm=args.comm)
    mean, se = _mean_se(ll)
    print(f"log-likelihood (importance-sampled, k={args.k}): {mean:.3f} +- {se:.3f} nats "
          f"(mean +- standard error over {len(x)} examples; {time.perf_counter() - t0:.1f}s)",
          file=out)
    return 0


def _duration(seconds):
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cmd_sample(args, out):
    from .plotting import infer_image_shape, save_image_grid

    model = _load(args.checkpoint)
    shape = args.image_shape
    if shape is None:
        try:
            shape = infer_image_shape(model.x_dim)
        except ValueError:
            raise CLIError(f"the model's x_dim={model.x_dim} is not a square image; pass "
                           f"--image-shape HEIGHTxWIDTH") from None
    elif shape[0] * shape[1] != model.x_dim:
        raise CLIError(f"--image-shape {shape[0]}x{shape[1]} has {shape[0] * shape[1]} pixels, "
                       f"the model has x_dim={model.x_dim}")
    model._rng = np.random.default_rng(args.seed)
    x = model.sample(args.n, temperature=args.temperature)
    scale = args.scale or max(1, round(56 / max(shape)))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_image_grid(args.output, x, image_shape=shape, ncols=args.ncols, scale=scale)
    print(f"wrote {args.n} samples (temperature {args.temperature:g}) to {args.output}",
          file=out)
    return 0


def _size(n):
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def cmd_info(args, out):
    model = _load(args.checkpoint)
    size = os.path.getsize(args.checkpoint)
    print(f"checkpoint: {args.checkpoint} ({_size(size)})", file=out)
    print(f"model: {model!r}", file=out)
    print(f"parameters: {model.n_params:,}", file=out)
    hist = model.history_
    seconds = sum(r.get("seconds") or 0 for r in hist)
    planned = model.train_config_.get("epochs")
    of = f" of {planned} planned" if planned else ""
    if model.optimizer_ is not None:
        state = f"{model.optimizer_.step:,} optimizer steps"
    elif hist:
        state = "optimizer state not saved: training it further starts Adam afresh"
    else:
        state = "never trained"
    print(f"epochs trained: {len(hist)}{of} ({state}; {seconds:.1f}s)", file=out)
    settings = {k: v for k, v in model.train_config_.items() if k != "epochs"}
    if settings:
        print("training settings: " + ", ".join(f"{k}={v!r}" for k, v in settings.items()),
              file=out)
    if hist:
        val = [r["val_loss"] for r in hist if r.get("val_loss") is not None]
        if val:
            best = min(range(len(hist)), key=lambda i: (hist[i].get("val_loss") is None,
                                                        hist[i].get("val_loss") or 0))
            print(f"best val_loss: {hist[best]['val_loss']:.3f} (epoch {hist[best]['epoch']})",
                  file=out)
        print("last epoch:", file=out)
        for key, value in hist[-1].items():
            if isinstance(value, float):
                value = f"{value:.4f}"
            elif isinstance(value, list):
                value = "[" + ", ".join(f"{v:.4f}" if isinstance(v, float) else str(v)
                                        for v in value) + "]"
            print(f"  {key}: {value}", file=out)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "info": cmd_info}


def main(argv=None):
    """Run the ``hvae`` command line; returns the exit status (0 on success). In an MPI job
    (--mpi on more than one rank), a failure on this rank ends every rank (MPI_Abort): the
    others may be waiting for this one, which is not coming."""
    argv = sys.argv[1:] if argv is None else list(argv)
    world = []  # MPI.COMM_WORLD once --mpi has started it
    try:
        code = _main(argv, world)
    except BaseException:  # --traceback, or what _main does not turn into a status
        if _in_job(world):
            traceback.print_exc()
            parallel.end_job(world[0], 1)
        raise
    if code and _in_job(world):
        parallel.end_job(world[0], code)
    return code


def _main(argv, world):
    parser = build_parser()
    debug = "--traceback" in argv
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version
            return exc.code if isinstance(exc.code, int) else 0
        if args.command is None:
            raise UsageError("choose a command: " + ", ".join(COMMANDS) + " (see 'hvae --help')")
        args.comm = _comm(args)
        if args.comm is not None:
            world.append(args.comm)
        out = sys.stdout if args.comm is None or args.comm.Get_rank() == 0 else _Null()
        return COMMANDS[args.command](args, out)
    except UsageError as exc:
        if debug:
            raise
        print(f"hvae: error: {_rank(world)}{exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"hvae: {_rank(world)}interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CLIError, ValueError, FloatingPointError, ImportError, MemoryError, OSError,
            RuntimeError) as exc:
        if debug:
            raise
        print(f"hvae: error: {_rank(world)}{_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


class _Null:
    """Where the output of the ranks other than 0 goes."""

    def write(self, text):
        return len(text)

    def flush(self):
        pass


def _comm(args):
    """MPI.COMM_WORLD with --mpi, else None."""
    if not getattr(args, "mpi", False):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise CLIError("--mpi needs mpi4py and an MPI: pip install 'hvae[mpi]'") from None
    return MPI.COMM_WORLD


def _in_job(world):
    """True in an MPI job of more than one rank whose MPI is up."""
    if not world:
        return False
    MPI = sys.modules["mpi4py.MPI"]
    return MPI.Is_initialized() and not MPI.Is_finalized() and world[0].Get_size() > 1


def _rank(world):
    return f"rank {world[0].Get_rank()} of {world[0].Get_size()}: " if _in_job(world) else ""




def _one_line(exc):
    text = str(exc) or type(exc).__name__
    if isinstance(exc, FileNotFoundError):  # the loaders speak Python; this is the CLI
        text = text.replace("pass data_dir=...", "pass --data-dir DIR")
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
