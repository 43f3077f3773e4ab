"""Benchmarks of the diagnostics, each measured against its peer in the same process.

1. ``initlab.probe`` with moments only vs a plain forward + backward of the same model and batch
   (issue #12's goal: ratio <= 1.5 on the study MLP 784-100-100-10, batch 256; see the README
   benchmark table). On the MLPs a third, bare variant runs the same reductions from the same
   hooks, written inline for a Linear/ReLU chain with none of the probe's bookkeeping (plan,
   layer records, checks, fans, the table's inputs): the floor the probe's own code sits on.
   The probe's statistics run on one thread (the model's forward and backward on all), so with
   more threads on a busy machine the ratio also measures how fast the OS wakes the idle worker
   thread for the model's next matrix product; ``--threads 1 --clock cpu`` measures the code.
2. ``initlab.lsuv_`` vs the PyPI package ``lsuv`` (0.3.0, ``lsuv_with_singlebatch``) on the same
   model, initial weights and batch, an MLP and a small CNN: both must leave every layer in the
   same variance band, and initlab should be >= 2x faster. Skipped, with a message, when ``lsuv``
   is not installed (``pip install --no-deps lsuv==0.3.0``).

Run: ``python bench/bench_probe_lsuv.py [--repeat N] [--quick] [--study] [--threads N] [--clock wall|cpu]
[--only probe|lsuv]`` (``--study``: only the study MLP, the issue's goal rows). Timings are medians of
interleaved runs (A, B, A, B, ...) after warm-up, on the current torch thread count.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import initlab
from initlab._orthogonal import orthogonal_many_

COVERED = (nn.Linear, nn.Conv2d)


def mlp(widths: list[int], inplace: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU(inplace=inplace))
    return nn.Sequential(*layers)


def cnn(inplace: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(inplace=inplace),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=inplace),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 256), nn.ReLU(inplace=inplace), nn.Linear(256, 10),
    )


CLOCK = time.perf_counter


def interleaved(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 2) -> dict[str, float]:
    """Median time (s) of each function, runs interleaved to share the machine's drift."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = CLOCK()
            f()
            times[k].append(CLOCK() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_probe(repeat: int, quick: bool, study: bool = False) -> None:
    print("== probe (moments only) vs plain forward + backward ==")
    g = torch.Generator().manual_seed(0)
    cases = [
        ("MLP 784-1024x3-10, batch 512", mlp([784, 1024, 1024, 1024, 10]), torch.randn(512, 784, generator=g)),
        ("CNN 4 conv + 2 fc, 32x32, batch 64", cnn(), torch.randn(64, 3, 32, 32, generator=g)),
    ]
    if not quick:
        cases.append(("MLP 784-100-100-10 (the study), batch 256", mlp([784, 100, 100, 10]),
                      torch.rand(256, 784, generator=g)))
    if study:
        cases = [c for c in cases if "study" in c[0]]
    for name, model, x in cases:
        y = torch.randint(0, 10, (x.shape[0],), generator=g)

        def plain(model: nn.Module = model, x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        def probed(model: nn.Module = model, x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            initlab.probe(model, x, target=y)

        def tabled(model: nn.Module = model, x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            len(initlab.probe(model, x, target=y).rows)  # the table (statistics, predictions) is built on first use

        def bare(model: nn.Module = model, x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            bare_probe(model, x, y)

        fns = {"plain": plain, "probe": probed, "table": tabled}
        if all(isinstance(m, (nn.Linear, nn.ReLU)) for m in model):
            fns["bare"] = bare
        t = interleaved(fns, repeat)
        goal = " (goal <= 1.5x)" if "study" in name else ""
        print(f"{name:45s} plain {1e3 * t['plain']:8.2f} ms   probe {1e3 * t['probe']:8.2f} ms   "
              f"ratio {t['probe'] / t['plain']:.2f}x{goal} (probe overhead "
              f"{1e3 * (t['probe'] - t['plain']):.2f} ms per call)")
        print(f"{'':45s} probe and its table (rows, predictions) {1e3 * t['table']:8.2f} ms "
              f"({t['table'] / t['plain']:.2f}x)")
        if "bare" in t:
            print(f"{'':45s} the same reductions and hooks, bare {1e3 * t['bare']:8.2f} ms "
                  f"({t['bare'] / t['plain']:.2f}x: the floor under the probe's bookkeeping)")
        with_hist = interleaved({"hist": lambda model=model, x=x, y=y: initlab.probe(model, x, target=y, bins=64)}, max(3, repeat // 3))
        print(f"{'':45s} with 64-bin histograms {1e3 * with_hist['hist']:8.2f} ms "
              f"({with_hist['hist'] / t['plain']:.2f}x)")


def bare_probe(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> object:
    """The probe's reductions on a Linear/ReLU chain without its bookkeeping: per layer the channel
    sums and squared deviations of the output, the post-activation's sum, squared deviations and
    unit maxima, the output gradient's sum and sum of squares; the batch's sum and per-example
    norms; the weights' and weight gradients' sums and sums of squares, the biases; one transfer."""
    scalars: list[torch.Tensor] = []
    vectors: list[torch.Tensor] = []

    def on_grad(g: torch.Tensor) -> None:
        f = g.reshape(-1)
        scalars.extend((f.sum(), torch.dot(f, f)))

    def on_layer(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        h = out.detach()
        s = h.sum(dim=0)
        d = torch.sub(h, s, alpha=s.shape[0] / h.numel()).reshape(-1)
        vectors.append(s)
        scalars.append(torch.dot(d, d))
        out.register_hook(on_grad)

    def on_act(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        p = out.detach()
        f = p.reshape(-1)
        s = f.sum()
        d = torch.sub(f, s, alpha=1.0 / f.numel())
        scalars.extend((s, torch.dot(d, d)))
        vectors.append(p.amax(dim=0))

    layers = [m for m in model if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(on_layer if isinstance(m, nn.Linear) else on_act) for m in model]
    try:
        vectors.append(torch.linalg.vector_norm(x, dim=1))
        scalars.append(x.reshape(-1).sum())
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, [m.weight for m in layers])
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for m, g in zip(layers, grads):
            for t in (m.weight.reshape(-1), g.reshape(-1)):
                scalars.extend((t.sum(), torch.dot(t, t)))
            vectors.append(m.bias)
        scalars.append(loss.detach())
        return torch.cat(vectors + [torch.stack(scalars)]).numpy()


def output_variances(model: nn.Module, x: torch.Tensor) -> list[float]:
    got: list[float] = []
    hs = [m.register_forward_hook(lambda m, i, o: got.append(o.detach().var(unbiased=False).item()))
          for m in model.modules() if isinstance(m, COVERED)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hs:
            h.remove()
    return got


def bench_lsuv(repeat: int, quick: bool, study: bool = False) -> None:
    print("\n== initlab.lsuv_ vs PyPI lsuv 0.3.0 (lsuv_with_singlebatch) ==")
    try:
        from lsuv import lsuv_with_singlebatch
    except ImportError:
        print("the PyPI package `lsuv` is not installed; skipping the comparison "
              "(pip install --no-deps lsuv==0.3.0 to run it)")
        return
    g = torch.Generator().manual_seed(1)
    # out-of-place ReLUs: the peer reads the layer output after the activation has overwritten it
    # when the activation is in place (see the note printed below), which would not be a fair race
    cases = [
        ("MLP 784-100-100-10 (the study), batch 256", mlp([784, 100, 100, 10], False),
         torch.rand(256, 784, generator=g)),
        ("MLP 784-256x6-10, batch 1024", mlp([784] + [256] * 6 + [10], False), torch.rand(1024, 784, generator=g)),
        ("MLP 784-512x4-10, batch 256", mlp([784, 512, 512, 512, 512, 10], False), torch.rand(256, 784, generator=g)),
        ("CNN 4 conv + 2 fc, 32x32, batch 64", cnn(False), torch.randn(64, 3, 32, 32, generator=g)),
    ]
    if quick:
        cases = cases[1:2] + cases[3:]
    if study:
        cases = cases[:1]
    for name, base, x in cases:
        base.eval()  # the peer runs in eval mode; so do we here, for identical statistics

        def ours(base: nn.Module = base, x: torch.Tensor = x) -> nn.Module:
            m = copy.deepcopy(base)
            initlab.lsuv_(m, x, generator=torch.Generator().manual_seed(0))
            return m

        def peer(base: nn.Module = base, x: torch.Tensor = x) -> nn.Module:
            m = copy.deepcopy(base)
            with contextlib.redirect_stdout(io.StringIO()):
                lsuv_with_singlebatch(m, x, verbose=False)
            return m

        def copy_only(base: nn.Module = base) -> nn.Module:
            return copy.deepcopy(base)

        layers = [m for m in base.modules() if isinstance(m, COVERED)]

        def ours_orth(layers: list = layers) -> None:  # initlab's pre-init alone, as lsuv_ runs it
            with torch.no_grad():
                orthogonal_many_([m.weight.detach().clone() for m in layers],
                                 generator=torch.Generator().manual_seed(0))

        def peer_orth(layers: list = layers) -> None:  # the peer's pre-init alone (torch.nn.init.orthogonal_)
            with torch.no_grad():
                for m in layers:
                    nn.init.orthogonal_(m.weight.detach().clone())

        t = interleaved({"ours": ours, "peer": peer, "copy": copy_only, "ours_orth": ours_orth,
                         "peer_orth": peer_orth}, repeat, warmup=1)
        v_ours, v_peer = output_variances(ours(), x), output_variances(peer(), x)
        t_ours, t_peer = t["ours"] - t["copy"], t["peer"] - t["copy"]
        print(f"{name:40s} initlab {1e3 * t_ours:8.2f} ms   lsuv {1e3 * t_peer:8.2f} ms   "
              f"speed-up {t_peer / t_ours:.1f}x (goal >= 2x)")
        f_ours, f_peer = t_ours - t["ours_orth"], t_peer - t["peer_orth"]
        print(f"{'':40s} of which the orthogonal pre-init: initlab {1e3 * t['ours_orth']:.2f} ms, lsuv "
              f"(torch.nn.init.orthogonal_) {1e3 * t['peer_orth']:.2f} ms ({t['peer_orth'] / t['ours_orth']:.2f}x, "
              f"goal >= 1); the fitting after it: initlab {1e3 * f_ours:.2f} ms, lsuv "
              f"{1e3 * f_peer:.2f} ms ({f_peer / max(f_ours, 1e-9):.1f}x)")
        band = lambda v: f"[{min(v):.3f}, {max(v):.3f}]"  # noqa: E731
        print(f"{'':40s} output variances after init: initlab {band(v_ours)} (tol: 1 +- 0.1), "
              f"lsuv {band(v_peer)} (its tol: std 1 +- 0.1, i.e. variance 0.81..1.21)")


def inplace_note() -> None:
    """The peer on in-place ReLUs: what variance does it leave the pre-activations at?"""
    try:
        from lsuv import lsuv_with_singlebatch
    except ImportError:
        return
    g = torch.Generator().manual_seed(2)
    x = torch.rand(256, 784, generator=g)
    m = mlp([784, 256, 256, 10], True).eval()
    with contextlib.redirect_stdout(io.StringIO()):
        lsuv_with_singlebatch(m, x, verbose=False)
    v = output_variances(m, x)
    m2 = mlp([784, 256, 256, 10], True).eval()
    initlab.lsuv_(m2, x)
    print(f"note: with ReLU(inplace=True) the peer leaves layer-output variances {[round(a, 2) for a in v]} "
          f"(it measures the activation's output); initlab: {[round(a, 2) for a in output_variances(m2, x)]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="fewer cases and repeats")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--only", choices=("probe", "lsuv"), default=None, help="run one of the two benches")
    ap.add_argument("--study", action="store_true", help="only the study MLP 784-100-100-10 (issue #12's goals)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or this process's CPU time (robust on a shared machine with --threads 1)")
    args = ap.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK = time.process_time
    repeat = 5 if args.quick else args.repeat
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"initlab {initlab.__version__}\n")
    if args.only != "lsuv":
        bench_probe(repeat, args.quick, args.study)
    if args.only != "probe":
        bench_lsuv(repeat, args.quick, args.study)
        if not args.study:
            inplace_note()


if __name__ == "__main__":
    main()
