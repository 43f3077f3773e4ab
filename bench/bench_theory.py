"""Benchmark of initlab.theory: how long the predictions take, each beside a peer in the same process.

1. The variance recursion through 100 layers (tanh at the edge of chaos, width 1000), forward
   and backward, against simulating the same 100-layer network on a batch (width 1000, batch
   256, one forward + backward pass): the recursion should take milliseconds.
2. Mean-field solves, cold (caches cleared before every run) and warm: ``q_star``, ``chi1``,
   ``critical_sw2``, ``c_star``, ``depth_scales``, and single map evaluations (``length_map``,
   ``correlation_map``): well under a millisecond for the maps, milliseconds for the solves.
   Peer: a straightforward scipy implementation (``integrate.quad`` expectations,
   ``optimize.brentq`` roots) of q*, chi1 and the critical sw2, for the speed ratio and the
   agreement of the values. Skipped, with a message, when scipy is not installed.

Run: ``python bench/bench_theory.py [--repeat N] [--threads N]``. Timings are medians after one
warm-up run, on the current torch thread count (initlab.theory itself evaluates on one thread).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from initlab import theory as T


def median_time(fn: Callable[[], object], repeat: int, *, cold: bool = False) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs after a warm-up (caches cleared first if cold)."""
    fn()
    times = []
    for _ in range(repeat):
        if cold:
            T._clear_caches()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:9.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:9.1f} us"


def bench_recursion(repeat: int) -> None:
    sb2 = 0.05
    sw2 = T.critical_sw2("tanh", sb2)
    width, depth, batch = 1000, 100, 256
    specs = [T.LayerSpec(width, width, sw2 / width, sb2, "tanh" if k < depth - 1 else None) for k in range(depth)]
    fwd = T.forward_variances(1.0, specs)
    t_fwd = median_time(lambda: T.forward_variances(1.0, specs), repeat)
    t_bwd = median_time(lambda: T.backward_variances(1.0, specs, fwd["pre_var"]), repeat)

    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(width, width, generator=g) * math.sqrt(sw2 / width) for _ in range(depth)]
    biases = [torch.randn(width, generator=g) * math.sqrt(sb2) for _ in range(depth)]
    x = torch.randn(batch, width, generator=g)

    def simulate() -> None:
        h = x.requires_grad_(True)
        for k, (w, b) in enumerate(zip(weights, biases)):
            h = h @ w.T + b
            if k < depth - 1:
                h = torch.tanh(h)
        h.square().sum().backward()

    t_sim = median_time(simulate, max(3, repeat // 5))
    print(f"100-layer recursion (tanh, sw2 = {sw2:.4f}, sb2 = {sb2}):")
    print(f"  forward_variances        {fmt(t_fwd)}")
    print(f"  backward_variances       {fmt(t_bwd)}")
    print(f"  peer: simulate the network (width {width}, batch {batch}, forward + backward) {fmt(t_sim)}"
          f"  -> recursion (fwd + bwd) is {t_sim / (t_fwd + t_bwd):.0f}x faster")


def scipy_peer() -> dict[str, Callable[..., float]] | None:
    try:
        from scipy import integrate, optimize
    except ImportError:
        return None

    def expect(g: Callable[[float], float], q: float) -> float:
        s = math.sqrt(q)
        return integrate.quad(lambda z: g(s * z) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi),
                              -12, 12, points=[0.0], limit=200, epsabs=1e-13, epsrel=1e-12)[0]

    tanh2 = lambda u: math.tanh(u) ** 2  # noqa: E731
    dtanh2 = lambda u: (1.0 / math.cosh(min(abs(u), 300.0))) ** 4  # noqa: E731

    def q_star(sw2: float, sb2: float) -> float:
        f = lambda q: sw2 * expect(tanh2, q) + sb2 - q  # noqa: E731
        return optimize.brentq(f, 1e-12, sw2 + sb2 + 1.0, xtol=1e-14, rtol=1e-13)

    def chi1(sw2: float, sb2: float) -> float:
        return sw2 * expect(dtanh2, q_star(sw2, sb2))

    def critical(sb2: float) -> float:
        return optimize.brentq(lambda s: chi1(s, sb2) - 1.0, 1.0, 4.0, xtol=1e-13, rtol=1e-13)

    return {"q_star": q_star, "chi1": chi1, "critical": critical}


def bench_mean_field(repeat: int) -> None:
    sw2, sb2 = 1.5, 0.05
    rows = [
        ("length_map (one q)", lambda: T.length_map(0.7, "tanh", sw2, sb2), False),
        ("correlation_map (one c, q = q*)", lambda: T.correlation_map(0.5, None, "tanh", sw2, sb2), False),
        ("q_star cold", lambda: T.q_star("tanh", sw2, sb2), True),
        ("chi1 cold (solves q*)", lambda: T.chi1("tanh", sw2, sb2), True),
        ("chi1 warm (cached)", lambda: T.chi1("tanh", sw2, sb2), False),
        ("critical_sw2 cold", lambda: T.critical_sw2("tanh", sb2), True),
        ("c_star cold (chaotic, sw2 = 2.5)", lambda: T.c_star("tanh", 2.5, sb2), True),
        ("depth_scales cold", lambda: T.depth_scales("tanh", sw2, sb2), True),
    ]
    print(f"\nmean field, tanh (sw2 = {sw2}, sb2 = {sb2} unless noted):")
    times = {}
    for name, fn, cold in rows:
        times[name] = median_time(fn, repeat, cold=cold)
        print(f"  {name:34s} {fmt(times[name])}")

    peer = scipy_peer()
    if peer is None:
        print("  peer skipped: scipy is not installed")
        return
    n = max(3, repeat // 10)
    pairs = [
        ("q_star", lambda: T.q_star("tanh", sw2, sb2), lambda: peer["q_star"](sw2, sb2), times["q_star cold"]),
        ("chi1", lambda: T.chi1("tanh", sw2, sb2), lambda: peer["chi1"](sw2, sb2), times["chi1 cold (solves q*)"]),
        ("critical_sw2", lambda: T.critical_sw2("tanh", sb2), lambda: peer["critical"](sb2), times["critical_sw2 cold"]),
    ]
    print("  peer: scipy (integrate.quad + optimize.brentq), same quantities:")
    for name, ours, theirs, t_ours in pairs:
        T._clear_caches()
        a, b = ours(), theirs()
        t_peer = median_time(theirs, n)
        print(f"    {name:14s} initlab {a:.12f}  scipy {b:.12f}  |diff| {abs(a - b):.1e}   "
              f"scipy {fmt(t_peer)} -> initlab {t_peer / t_ours:.1f}x faster")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=50, help="timed runs per measurement (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the simulation peer")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    bench_recursion(args.repeat)
    bench_mean_field(args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
