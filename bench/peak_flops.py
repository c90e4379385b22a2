"""Measured matmul peak of this machine: the denominator of the MFU figures in bench_train.

    .venv/bin/python bench/peak_flops.py                       # bf16 + fp32, 1 process and N concurrent
    .venv/bin/python bench/peak_flops.py --dtypes fp32 --procs 2 --size 2048

One thread per process (as a training rank runs: OMP_NUM_THREADS=1). ``--procs N`` runs N processes at
once, like N ranks on N cores, and reports the sum (what N ranks can reach together). Best of
``--repeats`` timings of a square ``--size`` matmul (other processes on a shared machine only ever add
time). Prints a table; writes JSON to bench/results/peak_flops_<time>.json.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DTYPE_NAMES = ("bf16", "fp32")


def matmul_tflops(dtype_name: str, size: int = 1024, repeats: int = 10, threads: int = 1) -> float:
    """Best achieved TFLOP/s of one ``size``^3 matmul in this process."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def _worker(args: tuple[str, int, int], barrier: mp.Barrier, queue: mp.Queue) -> None:
    import torch

    torch.set_num_threads(1)
    matmul_tflops(args[0], 256, 1)  # load kernels before the common start
    barrier.wait()
    queue.put(matmul_tflops(*args))


def concurrent_tflops(dtype_name: str, procs: int, size: int = 1024, repeats: int = 10) -> list[float]:
    """Per-process best TFLOP/s with ``procs`` single-thread processes multiplying at the same time."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=((dtype_name, size, repeats), barrier, queue))
               for _ in range(procs)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
    return sorted(results)


def measure(dtypes: tuple[str, ...] = DTYPE_NAMES, procs: int = 2, size: int = 1024, repeats: int = 10
            ) -> dict[str, dict[str, float]]:
    """{dtype: {"single": TFLOP/s of one process alone, "per_proc": [..], "total": sum over procs}}."""
    out = {}
    for name in dtypes:
        per_proc = concurrent_tflops(name, procs, size, repeats)
        out[name] = {"single": matmul_tflops(name, size, repeats), "per_proc": per_proc, "total": sum(per_proc),
                     "size": size, "procs": procs}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", choices=DTYPE_NAMES, default=list(DTYPE_NAMES))
    p.add_argument("--procs", type=int, default=2, help="concurrent single-thread processes")
    p.add_argument("--size", type=int, default=1024, help="square matmul side")
    p.add_argument("--repeats", type=int, default=10, help="best of this many matmuls")
    p.add_argument("--quick", action="store_true", help="size 512, 3 repeats")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from bench.common import load_line, print_table, write_result

    args = parse_args(argv)
    if args.quick:
        args.size, args.repeats = 512, 3
    peaks = measure(tuple(args.dtypes), args.procs, args.size, args.repeats)
    print(f"matmul peak, {args.size}^3, 1 thread per process, best of {args.repeats}; {load_line()}")
    print_table(["dtype", "1 process TFLOP/s", f"{args.procs} concurrent, per process", "total"],
                [[k, v["single"], ", ".join(f"{x:.3f}" for x in v["per_proc"]), v["total"]] for k, v in peaks.items()])
    write_result("peak_flops", {"settings": vars(args), "peaks": peaks})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
