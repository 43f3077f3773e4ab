"""Benchmark: the engine's truncated normal against torch's samplers, in the same process.

Goals (issue #2, "Performance"):

1. ``initlab.truncated_normal_`` >= 10x faster than ``torch.nn.init.trunc_normal_`` drawing the
   same distribution (bounds at +-2 of the underlying std), with the distribution checked by
   Kolmogorov-Smirnov tests (against scipy's truncnorm, and two-sample against torch's);
2. ``initlab.truncated_normal_`` <= 1.5x the time of ``Tensor.normal_``;
3. stretch: 2 threads >= 1.7x the single-thread throughput, bit-identical results.

Timings are the best of ``--repeat`` runs, interleaved so that every sampler sees the same
machine load. Goals 1-2 are measured with ``torch.set_num_threads(1)`` (torch's normal_ and
trunc_normal_ do not use more than one core for the random draws anyway). For goal 3 the
script also prints the process CPU time over wall time of the 2-thread run: a value near 1
means the second core was busy with something else and the ratio says nothing.

    python bench/bench_engine.py [--numel 16777216] [--repeat 5]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

import initlab
from initlab._engine import TRUNC_STD


def best_of(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    for f in fns.values():  # warm-up
        f()
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def cpu_over_wall(f: Callable[[], object], repeat: int) -> float:
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        f()
    return (time.process_time() - c0) / (time.perf_counter() - w0)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 24, help="elements per tensor (default 16M, 64 MB fp32)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n, rep = args.numel, args.repeat
    std = 0.02
    s = std / TRUNC_STD  # the underlying normal's std
    x = torch.empty(n)
    g = torch.Generator().manual_seed(0)
    threads_before = torch.get_num_threads()
    print(f"torch {torch.__version__}, {n:,} fp32 elements, best of {rep}; "
          f"cores visible: {threads_before}")

    torch.set_num_threads(1)
    t = best_of({
        "torch normal_": lambda: x.normal_(0.0, std, generator=g),
        "torch uniform_": lambda: x.uniform_(-std, std, generator=g),
        "torch trunc_normal_": lambda: torch.nn.init.trunc_normal_(x, 0.0, s, -2 * s, 2 * s, generator=g),
        "initlab truncated_normal_": lambda: initlab.truncated_normal_(x, std, generator=g),
        "initlab normal": lambda: initlab.variance_scaling_(x.view(-1, 1), std * std, "fan_in", "normal",
                                                            generator=g, fans=(1, 1)),
        "initlab uniform": lambda: initlab.variance_scaling_(x.view(-1, 1), std * std, "fan_in", "uniform",
                                                             generator=g, fans=(1, 1)),
    }, rep)
    print("\nsingle thread                    time (s)   Gelem/s")
    for k, v in t.items():
        print(f"  {k:<28} {v:9.4f} {n / v / 1e9:9.3f}")
    speedup = t["torch trunc_normal_"] / t["initlab truncated_normal_"]
    vs_normal = t["initlab truncated_normal_"] / t["torch normal_"]
    print("\nratios")
    print(f"  trunc_normal_ time / initlab truncated_normal_ time : {speedup:6.2f}x  (goal >= 10x: {verdict(speedup >= 10)})")
    print(f"  initlab truncated_normal_ time / normal_ time       : {vs_normal:6.2f}x  (goal <= 1.5x: {verdict(vs_normal <= 1.5)})")
    print(f"  initlab normal time / torch normal_ time            : {t['initlab normal'] / t['torch normal_']:6.2f}x")
    print(f"  initlab uniform time / torch uniform_ time          : {t['initlab uniform'] / t['torch uniform_']:6.2f}x")

    # the distributions: KS against the exact truncated normal, and two-sample against torch's
    m = 1_000_000
    ours = initlab.truncated_normal_(torch.empty(m), std, generator=torch.Generator().manual_seed(1))
    theirs = torch.nn.init.trunc_normal_(torch.empty(m), 0.0, s, -2 * s, 2 * s,
                                         generator=torch.Generator().manual_seed(2))
    try:
        from scipy import stats
    except ImportError:  # scipy is a test dependency
        print("\nKS check skipped (scipy not installed)")
    else:
        a = ours.double().numpy()
        p1 = stats.kstest(a, stats.truncnorm(-2, 2, scale=s).cdf).pvalue
        p2 = stats.ks_2samp(a, theirs.double().numpy()).pvalue
        p0 = stats.kstest(a, stats.norm(scale=std).cdf).pvalue
        print(f"\nKS, {m:,} samples: vs scipy truncnorm(-2, 2) p = {p1:.3f}; vs torch trunc_normal_ (2-sample) "
              f"p = {p2:.3f}; negative control vs an untruncated normal of the same std p = {p0:.1e}")
        print(f"  same distribution: {verdict(p1 > 1e-3 and p2 > 1e-3 and p0 < 1e-6)}")
    print(f"  realised std {float(ours.std()):.6f} (target {std}); max |w| {float(ours.abs().max()):.6f} "
          f"(cut {2 * s:.6f})")

    # stretch: threads
    if threads_before >= 2:
        res = {}
        for th in (1, 2):
            torch.set_num_threads(th)
            res[th] = initlab.truncated_normal_(torch.empty(n), std, generator=torch.Generator().manual_seed(3))
        same = torch.equal(res[1], res[2])
        times = {}
        load = 0.0
        for th in (1, 2, 1, 2):
            torch.set_num_threads(th)
            tt = best_of({"f": lambda: initlab.truncated_normal_(x, std, generator=g)}, rep)["f"]
            times[th] = min(times.get(th, float("inf")), tt)
            if th == 2:
                load = max(load, cpu_over_wall(lambda: initlab.truncated_normal_(x, std, generator=g), 2))
        ratio = times[1] / times[2]
        print(f"\nthreads: 1 thread {times[1]:.4f} s, 2 threads {times[2]:.4f} s -> {ratio:.2f}x "
              f"(goal >= 1.7x: {verdict(ratio >= 1.7)}); process CPU/wall with 2 threads: {load:.2f}")
        print(f"  bit-identical for 1 and 2 threads: {same}")
    torch.set_num_threads(threads_before)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
