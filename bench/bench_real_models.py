"""Benchmark: ``init_model`` on real architectures against the model's own initialisation, in the
same process (median of ``--repeat`` runs; on a shared machine the times vary with its load:
compare ratios from one run).

Part 1 (``--full``, issue #12's first two goals), on full-size torchvision models built with
``initlab._zoo.build`` (no weights downloaded): mobilenet_v3_small, efficientnet_b0, resnet50,
vit_b_16. Columns: ``construct`` = the model's constructor (allocation and its own init);
``auto`` = ``init_model(model, "auto")`` on the built model; ``he`` = ``init_model(model,
"he_normal")``; ``bare`` = a plain ``torch.nn.init`` loop over the same layers (``kaiming_normal_``
on every weight layer, zero biases, norms 1/0). Goals: auto/construct <= 1.5, he/bare <= 1.1.
``he_normal`` does not choose by activation, so it writes without tracing the model and its report
finds the activation column when first read; ``he+read`` also reads ``report.rows`` (the trace),
for what a caller who prints the report waits.

``--parts`` (with ``--full``) splits ``he`` and ``bare`` in the same rounds: ``sample`` = the time
``init_model`` spends in the sampler (``initlab._engine._fill_all``: Philox words, inverse CDF, the
report's sums taken while the values are in cache) against ``normal_`` = the same tensors filled
by ``Tensor.normal_`` alone (what ``bare`` spends in torch's sampler); ``own`` = the rest, each
side's Python (``init_model``: checks, plan, keys, report rows; ``bare``: its loop). The ratio is
bounded below by ``sample / normal_`` where the Python parts are equal.

Part 2 (default), on the harness's small architectures (``tests/test_real_models.py``): per
architecture ``construct``, ``meta+init`` = building on the meta device, ``to_empty()`` and
``init_model(model, "auto")`` (the README's recipe) and ``init_model`` alone. Small models make the
fixed costs show (tracing with torch.fx to find activations, the report).

``--threads N`` sets ``torch.set_num_threads(N)`` first: on a loaded machine the engine's worker
threads and torch's intra-op threads oversubscribe the cores (seen: mobilenet_v3_small's
``init_model`` 0.4-0.7 s with 1 thread, 6-8 s with 2, on 2 busy cores), so give the thread count
with the figures. ``--clock cpu`` times with the process's CPU time instead of the wall clock: on a
shared machine it does not count the time other processes hold the cores (with one thread it is
the work done; with more it sums the threads' work). Part 1 interleaves its contenders: each of
``--repeat`` rounds runs every column once, in turn, and each figure is the median over the rounds.

    python bench/bench_real_models.py [--repeat 5] [--only gpt2,resnet] [--full [--parts]] [--threads 1] [--clock cpu]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import initlab
from initlab._layers import init_biases, is_norm, is_weight_layer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

FULL = ("mobilenet_v3_small", "efficientnet_b0", "resnet50", "vit_b_16")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def once(fn) -> float:
    gc.collect()
    t0 = clock()
    fn()
    return clock() - t0


def median_time(fn, repeat: int) -> float:
    return statistics.median(once(fn) for _ in range(repeat))


def interleaved(fns: dict[str, object], repeat: int) -> dict[str, float]:
    """Each function's median time over ``repeat`` rounds; every round runs each function once, in turn,
    so that all of them see the same machine load."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            times[k].append(once(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def bare_init(model: nn.Module, generator: torch.Generator) -> None:
    """What a user would write by hand: torch.nn.init over the layers init_model(he_normal) covers."""
    with torch.no_grad():
        for m in model.modules():
            if is_weight_layer(m):
                for name, p in m.named_parameters(recurse=False):
                    if name.endswith("weight") and p.dim() >= 2:
                        nn.init.kaiming_normal_(p, nonlinearity="relu", generator=generator)
                for b in init_biases(m):
                    nn.init.zeros_(b)
            elif is_norm(m):
                w, b = getattr(m, "weight", None), getattr(m, "bias", None)
                if isinstance(w, torch.Tensor):
                    nn.init.ones_(w)
                if isinstance(b, torch.Tensor):
                    nn.init.zeros_(b)


def _sampler_timer() -> list[float]:
    """Wrap the sampler's batch fill (``initlab._engine._fill_all``) so that the returned list
    accumulates the time spent in it."""
    from initlab import _engine

    spent = [0.0]
    inner = _engine._fill_all

    def timed_fill(*args: object, **kwargs: object) -> None:
        t0 = clock()
        try:
            inner(*args, **kwargs)
        finally:
            spent[0] += clock() - t0
    _engine._fill_all = timed_fill
    return spent


def parts(name: str, model: nn.Module, gen: torch.Generator, repeat: int) -> None:
    """``--parts``: he and bare split into sampling and the rest, interleaved rounds."""
    spent = _sampler_timer()
    weights = [p for m in model.modules() if is_weight_layer(m)
               for n, p in m.named_parameters(recurse=False) if n.endswith("weight") and p.dim() >= 2]

    def normal_only() -> None:
        with torch.no_grad():
            for p in weights:
                p.normal_(0.0, 0.01, generator=gen)

    rows: dict[str, list[float]] = {k: [] for k in ("he", "sample", "bare", "normal_")}
    for _ in range(repeat):
        spent[0] = 0.0
        rows["he"].append(once(lambda: initlab.init_model(model, "he_normal", generator=gen)))
        rows["sample"].append(spent[0])
        rows["bare"].append(once(lambda: bare_init(model, gen)))
        rows["normal_"].append(once(normal_only))
    t = {k: statistics.median(v) * 1e3 for k, v in rows.items()}
    print(f"{name:20} he {t['he']:6.1f}ms = sample {t['sample']:6.1f} + own {t['he'] - t['sample']:5.1f}   "
          f"bare {t['bare']:6.1f}ms = normal_ {t['normal_']:6.1f} + own {t['bare'] - t['normal_']:5.1f}   "
          f"sample/normal_ {t['sample'] / t['normal_']:.2f}x  he/bare {t['he'] / t['bare']:.2f}x  "
          f"({sum(p.numel() for p in weights):,} sampled entries in {len(weights)} tensors)")


def full(repeat: int, only: str, split: bool = False) -> None:
    from initlab._compat import ensure_torchvision
    from initlab._zoo import build

    ensure_torchvision()
    gen = torch.Generator().manual_seed(0)
    if not split:
        print(f"{'model':20} {'params':>11} {'construct':>10} {'auto':>9} {'he':>9} {'bare':>9} "
              f"{'auto/construct':>15} {'he/bare':>8} {'he+read':>9} {'he+read/bare':>13}")
    for name in FULL:
        if only and not any(s in name for s in only.split(",")):
            continue

        def make(name=name):
            return build(f"torchvision:{name}")
        model = make()
        n = sum(p.numel() for p in model.parameters())
        if split:
            initlab.init_model(model, "he_normal", generator=gen)  # warm-up
            bare_init(model, gen)
            parts(name, model, gen, repeat)
            continue
        initlab.init_model(model, "auto", generator=gen)  # warm-up (imports, caches)
        _ = initlab.init_model(model, "he_normal", generator=gen).rows
        bare_init(model, gen)
        t = interleaved({
            "construct": make,
            "auto": lambda model=model: initlab.init_model(model, "auto", generator=gen),
            "he": lambda model=model: initlab.init_model(model, "he_normal", generator=gen),
            "bare": lambda model=model: bare_init(model, gen),
            "read": lambda model=model: initlab.init_model(model, "he_normal", generator=gen).rows,
        }, repeat)
        t_con, t_auto, t_he, t_bare, t_read = (t[k] for k in ("construct", "auto", "he", "bare", "read"))
        print(f"{name:20} {n:>11,} {t_con * 1e3:>8.0f}ms {t_auto * 1e3:>7.0f}ms {t_he * 1e3:>7.0f}ms "
              f"{t_bare * 1e3:>7.0f}ms {t_auto / t_con:>14.2f}x {t_he / t_bare:>7.2f}x {t_read * 1e3:>7.0f}ms "
              f"{t_read / t_bare:>12.2f}x")


def harness(repeat: int, only: str) -> None:
    from test_real_models import MODELS  # the harness's architectures

    gen = torch.Generator().manual_seed(0)
    print(f"{'architecture':34} {'params':>9} {'construct':>10} {'meta+init':>10} {'init_model':>10} "
          f"{'meta+init/construct':>20} {'init_model/construct':>21}")
    for name, (make, _) in MODELS.items():
        if only and not any(s in name for s in only.split(",")):
            continue
        model = make()
        n = sum(p.numel() for p in model.parameters())

        def meta_init(make=make):
            with torch.device("meta"):
                m = make()
            m = m.to_empty(device="cpu")
            if callable(getattr(m, "tie_weights", None)):
                m.tie_weights()
            initlab.init_model(m, "auto", generator=gen, strict=False)

        t_con = median_time(make, repeat)
        t_meta = median_time(meta_init, repeat)
        t_init = median_time(lambda model=model: initlab.init_model(model, "auto", generator=gen), repeat)
        print(f"{name:34} {n:>9,} {t_con * 1e3:>8.1f}ms {t_meta * 1e3:>8.1f}ms {t_init * 1e3:>8.1f}ms "
              f"{t_meta / t_con:>19.2f}x {t_init / t_con:>20.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated substrings of architecture names")
    ap.add_argument("--full", action="store_true", help="the full-size torchvision models (part 1)")
    ap.add_argument("--parts", action="store_true", help="with --full: he and bare split into sampling and the rest")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads first (0: torch's default)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall: time.perf_counter; cpu: time.process_time (this process's CPU time)")
    args = ap.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}; {args.clock} clock; median of {args.repeat}"
          + (" interleaved rounds" if args.full else ""))
    if args.full:
        full(args.repeat, args.only, args.parts)
    else:
        harness(args.repeat, args.only)


if __name__ == "__main__":
    main()
