"""A few-minute demonstration: train a two-level hierarchical VAE, then look at what it learned.

    python -m hvae.demo [--out demo] [--quick]

Trains ``HVAE(784, [100, 50])`` with every default of ``HVAE`` and ``HVAE.fit`` (the IWAE
paper's two-level architecture x -> [200, 200] -> z_1 (100) -> [100, 100] -> z_2 (50), tanh,
Glorot initialisation, the unbiased KL estimator, 50 epochs with 5 at KL weight 0 and a 20-epoch
warm-up, lr 1e-3 falling to 1e-4) on statically binarized MNIST with its validation split: two
minutes on one idle core, evaluation included, four on a busy one. Without the MNIST file it
trains on scikit-learn's 8x8 digits instead (dynamically binarized, with a note), with a
smaller architecture for the 64 pixels and 100 epochs for the 14 steps of each. Writes to the
output directory:

- ``samples.png``          64 ancestral samples (pixel probabilities),
- ``reconstructions.png``  32 test inputs (odd rows) above their reconstructions (even rows),
- ``loss.png``             the training curves (needs matplotlib),
- ``model.npz``            the checkpoint (``hvae info``, ``hvae eval``, ``hvae sample`` read it),

then prints the test ELBO (all test examples) and an importance-sampled test log-likelihood
(k = 1000 on 1000 test examples drawn at random, with the ELBO on the same examples).
``--quick`` shrinks everything to a few seconds (a smoke test, not a result).
"""
import argparse
import os
import sys
import time

import numpy as np

from . import cli, training

# architecture and what fit gets beyond its defaults, per data set
MNIST = {"latent_dims": [100, 50], "hidden_dims": None, "fit": {}, "eval_k": 1000,
         "eval_n": 1000, "max_examples": None}
DIGITS = {"latent_dims": [16, 8], "hidden_dims": [[64, 64], [32, 32]], "fit": {"epochs": 100},
          "eval_k": 1000, "eval_n": 297, "max_examples": None}
QUICK_FIT = {"epochs": 2, "kl_warmup_epochs": 1, "kl_warmup_delay": 0}
QUICK = {"binarized_mnist": {"latent_dims": [16, 8], "hidden_dims": [[64, 64], [32, 32]],
                             "fit": QUICK_FIT, "max_examples": 1000, "eval_k": 20,
                             "eval_n": 100},
         "digits": {"fit": {**QUICK_FIT, "epochs": 3}, "max_examples": 500, "eval_k": 20,
                    "eval_n": 100}}


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m hvae.demo", formatter_class=cli._Formatter,
        description="Train a two-level hierarchical VAE on binarized MNIST (or the 8x8 digits "
                    "when MNIST is not found) and write samples.png, reconstructions.png, "
                    "loss.png and model.npz; print the test ELBO and log-likelihood.")
    p.add_argument("--out", default="demo", help="output directory (created if needed)")
    p.add_argument("--quick", action="store_true",
                   help="a few seconds: a tiny model, a few epochs, a small evaluation")
    p.add_argument("--data", choices=("auto", "binarized_mnist", "digits"), default="auto",
                   help="auto: binarized MNIST if its file is found, else the digits")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="directory holding binarized_mnist.npz (default: $HVAE_DATA, else "
                        "../shared/data beside the repository)")
    p.add_argument("--seed", type=int, default=0, help="seeds everything")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _load_data(choice, data_dir, out):
    """(name, grey?, train, valid, test) for the demo."""
    if choice in ("auto", "binarized_mnist"):
        try:
            splits = [cli.load_split("binarized_mnist", s, data_dir) for s in cli.SPLITS]
            return ("binarized_mnist", False, *splits)
        except FileNotFoundError as exc:
            if choice == "binarized_mnist":
                raise
            print(f"note: binarized MNIST not found ({exc}).\n"
                  f"note: training on scikit-learn's 8x8 digits instead (1350 train, 150 "
                  f"valid, 297 test, dynamically binarized); the numbers are not comparable "
                  f"with MNIST tables.", file=out, flush=True)
    return ("digits", True, *[cli.load_split("digits", s) for s in cli.SPLITS])


def _reconstruction_rows(x, recon, ncols):
    """Rows alternating ``ncols`` inputs and their ``ncols`` reconstructions."""
    rows = []
    for start in range(0, len(x), ncols):
        rows += [x[start:start + ncols], recon[start:start + ncols]]
    return np.concatenate(rows)


def run(out_dir="demo", quick=False, data="auto", data_dir=None, seed=0, progress=True,
        out=None):
    """The demo; returns a dict of the numbers it printed."""
    from .model import HVAE
    from .plotting import plot_history, save_image_grid

    out = sys.stdout if out is None else out
    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    name, grey, train, valid, test = _load_data(data, data_dir, out)
    cfg = dict(MNIST if name == "binarized_mnist" else DIGITS)
    if quick:
        cfg.update(QUICK[name])
    train = cli.subset(train, cfg["max_examples"])

    model = HVAE(train.shape[1], cfg["latent_dims"], cfg["hidden_dims"], seed=seed)
    valid = cli._prepare(valid, name, model, "valid", False)
    test = cli._prepare(test, name, model, "test", False)
    X, redraw = cli.training_data(model, train, grey)
    ckpt = os.path.join(out_dir, "model.npz")
    run, _ = training.resolve_settings(model, cfg["fit"])
    print(f"model: {model!r}\n"
          f"data: {name}, train {len(X)}, valid {len(valid)}, test {len(test)}\n"
          f"training {run['epochs']} epochs (batch {run['batch_size']}, lr {run['lr']:g} falling "
          f"to {run['lr'] * run['lr_decay']:g}, KL weight 0 for {run['kl_warmup_delay']:g} "
          f"epochs then rising over {run['kl_warmup_epochs']:g}), checkpoint {ckpt}",
          file=out, flush=True)

    def report(m, record):
        line = cli._epoch_line(record, run["epochs"])
        if progress:
            from tqdm.auto import tqdm
            tqdm.write(line, file=out)
        else:
            print(line, file=out, flush=True)
        redraw(m, record)

    t0 = time.perf_counter()
    model.fit(X, **cfg["fit"], validation_data=valid, progress=progress, checkpoint=ckpt,
              callbacks=[report])
    if getattr(model, "interrupted_", False):
        raise KeyboardInterrupt
    t_train = time.perf_counter() - t0

    # pictures
    side = int(round(np.sqrt(model.x_dim)))
    scale = max(1, round(56 / side))
    save_image_grid(os.path.join(out_dir, "samples.png"), model.sample(64), ncols=8,
                    scale=scale)
    shown = cli.subset(test, 32)  # spread over the digits (binarized MNIST's test is sorted)
    save_image_grid(os.path.join(out_dir, "reconstructions.png"),
                    _reconstruction_rows(shown, model.reconstruct(shown), 8), ncols=8,
                    scale=scale)
    wrote = ["samples.png", "reconstructions.png"]
    try:
        plot_history(model.history_, os.path.join(out_dir, "loss.png"),
                     title=f"{len(model.latent_dims)}-level HVAE on {name}")
        wrote.append("loss.png")
    except ImportError as exc:
        print(f"note: no loss.png ({exc})", file=out)
    wrote.append("model.npz")

    # numbers
    elbo, elbo_se = cli._mean_se(model.elbo(test, k=1))
    print(f"test ELBO (k=1, all {len(test)} test examples): {elbo:.2f} +- {elbo_se:.2f} nats",
          file=out, flush=True)
    k = cfg["eval_k"]
    part = cli.subset(test, cfg["eval_n"])
    n = len(part)
    t0 = time.perf_counter()
    ll, ll_se = cli._mean_se(model.log_likelihood(part, k=k, progress=progress))
    t_eval = time.perf_counter() - t0
    sub_elbo, sub_se = cli._mean_se(model.elbo(part, k=1))
    print(f"test log-likelihood (importance-sampled, k={k}, on {n} test examples drawn at "
          f"random): {ll:.2f} +- {ll_se:.2f} nats (ELBO on the same: {sub_elbo:.2f} +- "
          f"{sub_se:.2f})", file=out)
    if name == "binarized_mnist" and not quick:
        print("  (published, k=5000 on all 10000 and hundreds of epochs: 1-level VAE about "
              "-88.7, 2-level about -86; this demo trains for minutes)", file=out)
    total = time.perf_counter() - t_start
    print(f"wrote {', '.join(wrote)} to {out_dir}/  (training {t_train:.0f}s, "
          f"log-likelihood {t_eval:.0f}s, total {total:.0f}s)", file=out)
    return {"data": name, "elbo": elbo, "log_likelihood": ll, "k": k, "n_eval": n,
            "seconds": total, "files": wrote}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args.out, quick=args.quick, data=args.data, data_dir=args.data_dir, seed=args.seed,
            progress=not args.no_progress)
    except KeyboardInterrupt:
        print("hvae.demo: interrupted", file=sys.stderr)
        return cli.EXIT_INTERRUPTED
    except (ValueError, FileNotFoundError, ImportError, OSError, FloatingPointError) as exc:
        print(f"hvae.demo: error: {cli._one_line(exc)}", file=sys.stderr)
        return cli.EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
