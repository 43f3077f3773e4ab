"""Side effects of an initialiser: how much slower a ~1 ms torch op runs right after it than before.

For each initialiser (initlab's and torch's own as the peer) on an N x N matrix, in rounds
interleaved over the initialisers: warm the op up, time it ``--ops`` times (median: "before"),
run the initialiser once, time the op ``--ops`` times again ("after": the first call and the
median). Two controls show what the machine does by itself: ``idle`` (sleep as long as initlab's
orthogonal_ took) and ``busy-1-thread`` (a single-threaded Python loop as long), since on a shared
machine an OpenMP op whose worker thread has been asleep waits for a time slice.

Prints per initialiser the median over rounds of after/before (goal for initlab.orthogonal_ at
4096: <= 1.2x), the first call's ratio, and the load average.

Run: ``python bench/bench_side_effects.py [--size 4096] [--rounds 5] [--ops 10] [--threads N]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

import initlab


def make_op(target_s: float = 1e-3) -> tuple[Callable[[], object], int]:
    """A matmul + relu + sum whose size is picked so that it takes about ``target_s``."""
    n = 64
    while n < 4096:
        x, y = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            (x @ y).relu_().sum()
        t0 = time.perf_counter()
        for _ in range(5):
            (x @ y).relu_().sum()
        if (time.perf_counter() - t0) / 5 >= target_s:
            break
        n = int(n * 1.25)
    x, y = torch.randn(n, n), torch.randn(n, n)
    return (lambda: (x @ y).relu_().sum()), n


def times(op: Callable[[], object], k: int) -> list[float]:
    out = []
    for _ in range(k):
        t0 = time.perf_counter()
        op()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ops", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    op, n = make_op()
    w = torch.empty(args.size, args.size)
    g = torch.Generator().manual_seed(0)
    took = {"initlab.orthogonal_": 1.0}

    def busy() -> None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < took["initlab.orthogonal_"]:
            pass

    inits: dict[str, Callable[[], object]] = {
        "initlab.orthogonal_": lambda: initlab.orthogonal_(w, generator=g),
        "torch.nn.init.orthogonal_": lambda: torch.nn.init.orthogonal_(w),
        "initlab.he_normal_": lambda: initlab.he_normal_(w, generator=g),
        "torch.nn.init.kaiming_normal_": lambda: torch.nn.init.kaiming_normal_(w),
        "idle (control)": lambda: time.sleep(took["initlab.orthogonal_"]),
        "busy-1-thread (control)": busy,
    }
    ratio: dict[str, list[float]] = {k: [] for k in inits}
    first: dict[str, list[float]] = {k: [] for k in inits}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; op: {n}x{n} matmul+relu+sum; "
          f"initialisers on {args.size}x{args.size}; load average {os.getloadavg()[0]:.1f}")
    for _ in range(args.rounds):
        for k, init in inits.items():
            times(op, 20)
            before = statistics.median(times(op, args.ops))
            t0 = time.perf_counter()
            init()
            if k == "initlab.orthogonal_":
                took[k] = time.perf_counter() - t0
            after = times(op, args.ops)
            ratio[k].append(statistics.median(after) / before)
            first[k].append(after[0] / before)
    print(f"{'initialiser':28s} {'after/before (median op)':>26s} {'first op after':>16s}")
    for k in inits:
        print(f"{k:28s} {statistics.median(ratio[k]):25.2f}x {statistics.median(first[k]):15.2f}x"
              + ("   (goal <= 1.2x)" if k == "initlab.orthogonal_" else ""))
    print(f"initlab.orthogonal_ took {took['initlab.orthogonal_']:.2f} s (last round); load average now "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
