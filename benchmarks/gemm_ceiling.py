"""How much of the GEMM peak a training step can reach at all: the matrix products of one dense
step (forward, weight and input gradients of every layer, the shapes and transposes the core
uses), each timed alone through the OpenBLAS hvae links, against hvae's whole step.

The speed benchmark's "% GEMM peak" is the dense step's GEMM FLOPs over the step's time, as a
share of an n x n x n SGEMM's rate. A dense step cannot beat its own GEMMs: the FLOPs over the
time of those GEMMs alone, at their real shapes (a 1024 x 100 x 100 product runs far below the
square one's rate) and issued one at a time at OpenBLAS's own threading, bounds that measure
for such an implementation on this BLAS, before any elementwise work or Adam; hvae's sparse
first layer does fewer FLOPs, so can pass it, and another split of a product over threads can
do a little better than OpenBLAS's.

    python benchmarks/gemm_ceiling.py   # writes benchmarks/results/gemm_ceiling.md
"""
import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import speed  # noqa: E402  (benchmarks/speed.py: models, data, timing, tables)

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["hvae2", "hvae2-topdown", "hvae5",
                                                   "hvae5-topdown"], choices=list(speed.MODELS))
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=7, help="timed repeats; the median is kept")
    p.add_argument("--gemm-size", type=int, default=2048, help="n of the peak's n x n x n GEMM")
    p.add_argument("--output", type=Path, default=HERE / "results" / "gemm_ceiling.md")
    return p.parse_args(argv)


def step_gemms(m, batch):
    """(M, N, K, transA, transB) of every GEMM of a dense step: per layer W (out, in), the
    forward Y (B, out) = X (B, in) W^T, the weight gradient dW (out, in) = dY^T X, the input
    gradient dX (B, in) = dY W (not for the first layer, whose input is the data)."""
    shapes = []
    for name, w in m.named_params().items():
        if name.endswith(".weight"):
            out, inp = w.shape
            shapes.append((batch, out, inp, NO_TRANS, TRANS))
            shapes.append((out, inp, batch, TRANS, NO_TRANS))
            if name != "enc1.0.weight":
                shapes.append((batch, inp, out, NO_TRANS, NO_TRANS))
    return shapes


def time_gemms(blas, shapes, threads, repeats):
    """Seconds of all the GEMMs one after another at `threads` OpenBLAS threads (median)."""
    rng = np.random.default_rng(0)
    calls = []
    for M, N, K, ta, tb in shapes:
        a = rng.standard_normal((M, K) if ta == NO_TRANS else (K, M)).astype(np.float32)
        b = rng.standard_normal((K, N) if tb == NO_TRANS else (N, K)).astype(np.float32)
        c = np.zeros((M, N), np.float32)
        calls.append(((a, b, c), (ROW_MAJOR, ta, tb, M, N, K, ctypes.c_float(1.0),
                                  ctypes.c_void_p(a.ctypes.data), a.shape[1],
                                  ctypes.c_void_p(b.ctypes.data), b.shape[1], ctypes.c_float(0.0),
                                  ctypes.c_void_p(c.ctypes.data), N)))
    blas.openblas_set_num_threads(threads)
    for _, call in calls:  # warm up
        blas.cblas_sgemm(*call)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _, call in calls:
            blas.cblas_sgemm(*call)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    blas = speed.OpenBLAS(speed.linked_openblas())
    info = speed.machine_info(blas)
    start, t_start = speed.cpu_seconds(), time.perf_counter()
    data, data_note = speed.load_data(speed.parse_args([]).data, 0)
    peaks = {th: speed.gemm_peak(blas, "float32", th, args.gemm_size) for th in args.threads}
    results = []
    for name in args.models:
        m = speed.make_model(name, "float32", 0)
        pool = speed.batch_pool(data, m, args.batch, 0)
        flops = speed.step_flops(m, args.batch)
        shapes = step_gemms(m, args.batch)
        for th in args.threads:
            gemm_sec = time_gemms(blas, shapes, th, args.repeats)
            blas.openblas_set_num_threads(1)
            step = speed.hvae_stepper(m, pool, th)
            step_sec = speed.time_interleaved({"hvae": step}, {"hvae": args.repeats}, 0.3, 1.0,
                                              0.0)["hvae"]
            results.append((name, th, len(shapes), flops, gemm_sec, step_sec))
            print(name, th, f"GEMMs alone {speed.ms(gemm_sec)} ms, step {speed.ms(step_sec)} ms",
                  flush=True)
    for th in args.threads:  # the better of the peak at the start and at the end, as speed.py
        peaks[th] = max(peaks[th], speed.gemm_peak(blas, "float32", th, args.gemm_size))
    rows = [[name, args.batch, th, n, f"{flops / 1e9:.2f}", speed.ms(gemm_sec),
             f"{flops / gemm_sec / 1e9 / peaks[th]:.0%}", speed.ms(step_sec),
             f"{flops / step_sec / 1e9 / peaks[th]:.0%}", f"{step_sec / gemm_sec:.2f}"]
            for name, th, n, flops, gemm_sec, step_sec in results]
    share = speed.others_share(start, speed.cpu_seconds(), time.perf_counter() - t_start)
    headers = ["model", "batch", "threads", "GEMMs", "dense GFLOP", "GEMMs alone ms",
               "ceiling: % of peak", "hvae step ms", "hvae: % of peak", "step / GEMMs alone"]
    md = ["# How much of the GEMM peak a step can reach: its GEMMs alone", "",
          "Command: `" + " ".join(["python benchmarks/gemm_ceiling.py",
                                   *(argv or sys.argv[1:])]) + "`",
          "", *[f"- {k}: {v}" for k, v in info.items()],
          f"- SGEMM peak ({args.gemm_size}^3, GFLOP/s, by threads; the better of the start's "
          "and the end's): "
          + ", ".join(f"{th}: {p:.1f}" for th, p in peaks.items()),
          f"- data: {data_note}",
          f"- CPU time taken by other processes during the run: {share:.1%}", "",
          __doc__.split("\n\n")[1].replace("\n", " "), "",
          "Each GEMM timed with its own random operands, all of a step one after another, "
          f"median of {args.repeats}; OpenBLAS at the row's threads (the core instead splits "
          "each product over its team with OpenBLAS at one thread). hvae's step: "
          "`train_step(threads=n)` on binarized MNIST batches, timed as in speed.py. Both "
          "percentages count the dense step's FLOPs (hvae's sparse first layer does fewer).", "",
          speed.md_table(headers, rows), ""]
    args.output.write_text("\n".join(md))
    print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
