"""Data-parallel scaling of training over MPI: measured on this machine, modelled beyond it.

Times an MNIST epoch of hvae2 (the two-level IWAE architecture, float32) at global batch 100 and
1000 as 1 process x 1 thread, 1 process x 2 threads and 2 MPI ranks x 1 thread; the Allreduce's
share of a step (from fit's ``allreduce_seconds``, and a bare Allreduce of the gradient's size);
then models the parallel efficiency at 2-64 nodes from the measured compute rates and stated
network assumptions, and the global batch above which it stays over 80%. Writes
benchmarks/results/scaling.md.

    python benchmarks/scaling.py            # about 5 minutes on an idle 2-core machine
    python benchmarks/scaling.py --quick    # a smoke run in seconds (2000 examples, 1 epoch)
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
HVAE2 = dict(latent_dims=[100, 50], hidden_dims=[[200, 200], [100, 100]], kl="mc",
             prior_variance="learned", dtype="float32")
# (name, bandwidth in bytes/s, latency in s) of the networks the model assumes
NETWORKS = [("10 Gb Ethernet", 1.25e9, 20e-6), ("100 Gb InfiniBand", 12.5e9, 2e-6)]
NODES = [2, 4, 8, 16, 32, 64]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per run (best is kept)")
    p.add_argument("--batches", type=int, nargs="+", default=[100, 1000], help="global batches")
    p.add_argument("--max-examples", type=int, default=None, help="training rows (all: 50000)")
    p.add_argument("--output", default=os.path.join(RESULTS, "scaling.md"))
    p.add_argument("--quick", action="store_true", help="smoke run: 2000 rows, 1 epoch")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mpi", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=100, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.max_examples, args.epochs = 2000, 1
    return args


def worker(args):
    """One configuration: time the epochs of a fit; rank 0 prints a JSON line."""
    import hvae
    from hvae import datasets
    comm = None
    if args.mpi:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    X = datasets.load_binarized_mnist("train")[:args.max_examples]
    m = hvae.HVAE(784, seed=0, **HVAE2)
    fit = dict(batch_size=args.batch, lr=1e-3, lr_decay=1.0, kl_warmup_epochs=0,
               kl_warmup_delay=0, progress=False, n_jobs=args.threads, comm=comm)
    m.fit(X, epochs=1, **fit)  # warm-up: pages touched, thread team and MPI connections up
    best = None
    for e in range(args.epochs):
        m.fit(X, epochs=2 + e, **fit)
        rec = m.history_[-1]
        if best is None or rec["seconds"] < best["seconds"]:
            best = rec
    if comm is None or comm.Get_rank() == 0:
        steps = -(-len(X) // args.batch)
        print(json.dumps(dict(seconds=best["seconds"], steps=steps, rows=len(X),
                              allreduce=best.get("allreduce_seconds", 0.0),
                              n_params=m.n_params)), flush=True)


def bare_allreduce(args, n_params, reps=200):
    """Seconds of one Allreduce of n_params float32 over 2 ranks (median), by a child job."""
    code = ("import sys, time, numpy as np; from mpi4py import MPI; c = MPI.COMM_WORLD; "
            f"a = np.ones({n_params}, np.float32); t = []\n"
            f"for _ in range({reps}):\n"
            "    c.Barrier(); t0 = time.perf_counter(); c.Allreduce(MPI.IN_PLACE, a); "
            "t.append(time.perf_counter() - t0)\n"
            "c.Get_rank() or print(np.median(t))")
    out = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-c", code], env=child_env(),
                         capture_output=True, text=True, check=True, timeout=300).stdout
    return float(out.split()[-1])


def mpiexec():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else "mpiexec"


def child_env():
    return dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run_config(args, ranks, threads, batch):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(threads),
           "--batch", str(batch), "--epochs", str(args.epochs)]
    if args.max_examples:
        cmd += ["--max-examples", str(args.max_examples)]
    if ranks > 1:
        cmd = [mpiexec(), "-n", str(ranks)] + cmd + ["--mpi"]
    out = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, check=True,
                         timeout=3600).stdout
    return json.loads(out.strip().splitlines()[-1])


def ring_allreduce(nbytes, nodes, bandwidth, latency):
    """Seconds of a ring Allreduce (reduce-scatter + all-gather): 2 (N-1) messages of S/N."""
    return 2 * (nodes - 1) * (latency + nbytes / nodes / bandwidth)


def model_table(t_step, nbytes):
    """Parallel efficiency at each node count and network, and the smallest global batch
    (a power-of-two multiple of 100) with efficiency >= 80%. t_step(b): seconds of one
    step's compute for b rows on one node (one core)."""
    rows = []
    for name, bw, lat in NETWORKS:
        for n in NODES:
            t_ar = ring_allreduce(nbytes, n, bw, lat)

            def eff(B):
                return t_step(B) / (n * (t_step(B / n) + t_ar))
            b80 = next((B for B in (100 * 2 ** i for i in range(14)) if eff(B) >= 0.8), None)
            rows.append(dict(network=name, nodes=n, allreduce_ms=1e3 * t_ar,
                             eff_100=eff(100), eff_1000=eff(1000), batch_80=b80))
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    configs = [(1, 1), (1, 2), (2, 1)]
    res = {}
    for batch in args.batches:
        for ranks, threads in configs:
            r = run_config(args, ranks, threads, batch)
            res[(batch, ranks, threads)] = r
            print(f"batch {batch:5d}  {ranks} rank(s) x {threads} thread(s): epoch "
                  f"{r['seconds']:.2f} s, Allreduce {100 * r['allreduce'] / r['seconds']:.1f}% "
                  "of it", flush=True)
    n_params = next(iter(res.values()))["n_params"]
    t_bare = bare_allreduce(args, n_params)
    print(f"bare Allreduce of {n_params} float32 over 2 ranks: {1e3 * t_bare:.3f} ms")
    # compute per step on one core: a + c b, from the 1 x 1 runs at the two batches
    b_lo, b_hi = min(args.batches), max(args.batches)
    t_lo = res[(b_lo, 1, 1)]["seconds"] / res[(b_lo, 1, 1)]["steps"]
    t_hi = res[(b_hi, 1, 1)]["seconds"] / res[(b_hi, 1, 1)]["steps"]
    c = (t_hi - t_lo) / (b_hi - b_lo) if b_hi > b_lo else t_lo / b_lo
    a = max(0.0, t_lo - c * b_lo)

    def t_step(b):
        return a + c * b
    table = model_table(t_step, 4 * n_params)
    write(args, res, t_bare, n_params, a, c, table)
    print(f"wrote {args.output}")
    return 0


def write(args, res, t_bare, n_params, a, c, table):
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=HERE).stdout.strip() or "unknown"
    lines = [
        "# Data-parallel scaling over MPI",
        "",
        f"Written by `benchmarks/scaling.py` on {datetime.date.today().isoformat()}, commit "
        f"{commit}, {os.cpu_count()} cores {platform.machine()} ({platform.processor() or 'cpu'})"
        f", MPICH through mpi4py. hvae2 (784 -> [200, 200] -> 100 -> [100, 100] -> 50, "
        f"float32, {n_params:,} parameters), one epoch of {next(iter(res.values()))['rows']} "
        f"binarized MNIST rows, best of {args.epochs} epochs after a warm-up epoch.",
        "",
        "## Measured on this machine",
        "",
        "| global batch | ranks x threads | epoch (s) | speed-up | Allreduce share of the epoch |",
        "|---|---|---|---|---|",
    ]
    for (batch, ranks, threads), r in res.items():
        base = res[(batch, 1, 1)]["seconds"]
        lines.append(f"| {batch} | {ranks} x {threads} | {r['seconds']:.2f} | "
                     f"{base / r['seconds']:.2f}x | "
                     + (f"{100 * r['allreduce'] / r['seconds']:.1f}%" if ranks > 1 else "-")
                     + " |")
    for batch in sorted({b for b, _, _ in res}):
        if (batch, 2, 1) in res:
            model2 = (a + c * batch) / (a + c * batch / 2 + t_bare)
            measured = res[(batch, 1, 1)]["seconds"] / res[(batch, 2, 1)]["seconds"]
            lines.append("")
            lines.append(f"Batch {batch}, 2 ranks: the model below (with the bare Allreduce "
                         f"measured here) predicts {model2:.2f}x, measured {measured:.2f}x.")
    lines += [
        "",
        f"A bare Allreduce of the {n_params:,} float32 gradient (plus the loss terms) between "
        f"the two ranks (shared memory) takes {1e3 * t_bare:.3f} ms (median of 200). The "
        "Allreduce share above is fit's `allreduce_seconds`: the call's time including any "
        "wait for the slower rank.",
        "",
        "## Model beyond one machine",
        "",
        "Assumptions: one rank per node, each computing at this machine's one-core rate; a "
        f"step's compute for b rows is a + c b with a = {1e3 * a:.3f} ms and c = "
        f"{1e6 * c:.2f} us per row (fit to the 1 x 1 runs at the two batches); the gradient "
        f"({4 * n_params / 1e6:.2f} MB) is summed by a ring Allreduce, 2 (N - 1) messages of "
        "S / N bytes, each costing latency + size / bandwidth; no overlap of communication "
        "and compute; perfect load balance. Efficiency = t(B) / (N (t(B / N) + t_allreduce)). "
        "Where the measured 2-rank speed-up above falls short of the model's, the model is "
        "optimistic by as much: it leaves out what every rank does for the whole batch (the "
        "noise of every row is drawn on every rank, the shuffle, Python's per-step work) and "
        "ranks that share a machine's caches and memory bandwidth.",
        "",
        "| network | nodes | Allreduce (ms) | efficiency, batch 100 | efficiency, batch 1000 |"
        " smallest global batch with efficiency >= 80% |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(f"| {r['network']} | {r['nodes']} | {r['allreduce_ms']:.2f} | "
                     f"{100 * r['eff_100']:.0f}% | {100 * r['eff_1000']:.0f}% | "
                     f"{r['batch_80'] if r['batch_80'] else '> 819200'} |")
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
