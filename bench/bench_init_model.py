"""Benchmark: whole-model initialisation with ``init_model``.

Two goals, each measured against its peer in the same process (best of ``--repeat`` runs,
interleaved so that both sides see the same machine load):

1. meta-device build + ``to_empty`` + ``init_model``  vs  the common "construct normally
   (PyTorch's default init), then re-initialise with ``init_model``". Goal: >= 1.5x faster.
2. ``init_model`` on an existing model  vs  the bare ``torch.nn.init`` calls that give the same
   distributions on the same tensors (kaiming_normal_ for layers followed by ReLU, normal_ with
   std 1/sqrt(fan_in) for the readout, zeros_ for the biases). Goal: overhead <= 1.1x.

The model is a stack of ``Linear(width, width)`` layers with ReLU in between; the default
6 x 4096 x 4096 is ~100.7M parameters (~400 MB in fp32).

    python bench/bench_init_model.py [--layers 6] [--width 4096] [--repeat 5]
"""
from __future__ import annotations

import argparse
import gc
import math
import time
from collections.abc import Callable

import torch
from torch import nn

import initlab
from initlab import _apply


def build(layers: int, width: int, device: str | None = None) -> nn.Sequential:
    mods: list[nn.Module] = []
    with torch.device(device or "cpu"):
        for i in range(layers):
            mods.append(nn.Linear(width, width))
            if i + 1 < layers:
                mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    del out
    gc.collect()
    return dt


def bare_init(model: nn.Sequential, generator: torch.Generator) -> None:
    """What a user would write by hand: the same distributions as ``auto`` on this model."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for i, lin in enumerate(linears):
            if i + 1 < len(linears):
                nn.init.kaiming_normal_(lin.weight, nonlinearity="relu", generator=generator)
            else:
                nn.init.normal_(lin.weight, 0.0, 1.0 / math.sqrt(lin.in_features), generator=generator)
            nn.init.zeros_(lin.bias)


def engine_init(model: nn.Sequential, generator: torch.Generator) -> None:
    """The same sampling through initlab's engine directly: isolates init_model's own overhead
    (tracing, fans, gains, report) from the sampler's speed."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for i, lin in enumerate(linears):
            initlab.variance_scaling_(lin.weight, 2.0 if i + 1 < len(linears) else 1.0, "fan_in", "normal",
                                      generator=generator)
            lin.bias.zero_()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    L, W = args.layers, args.width
    n_params = L * (W * W + W)
    print(f"model: {L} x Linear({W}, {W}) + ReLU, {n_params / 1e6:.1f}M parameters; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    # 1. meta build + to_empty + init_model vs construct (default init) + init_model
    def normal_path() -> nn.Module:
        m = build(L, W)
        initlab.init_model(m, generator=torch.Generator().manual_seed(0))
        return m

    def meta_path() -> nn.Module:
        m = build(L, W, "meta").to_empty(device="cpu")
        initlab.init_model(m, generator=torch.Generator().manual_seed(0))
        return m

    t_normal, t_meta = [], []
    for _ in range(args.repeat):
        t_normal.append(timed(normal_path))
        t_meta.append(timed(meta_path))
    a, b = min(t_normal), min(t_meta)
    print(f"\n[1] construct + re-init: {a * 1e3:8.1f} ms   meta + to_empty + init_model: {b * 1e3:8.1f} ms")
    print(f"    speed-up: {a / b:.2f}x   (goal >= 1.5x: {'met' if a / b >= 1.5 else 'NOT met'})")

    # 2. init_model vs the bare torch.nn.init calls on the same tensors
    model = build(L, W)
    g = torch.Generator()
    t_bare, t_ours, t_full, t_engine = [], [], [], []
    sample = _apply.STD_SAMPLE
    for _ in range(args.repeat):
        g.manual_seed(0)
        t_bare.append(timed(lambda: bare_init(model, g)))
        g.manual_seed(0)
        t_ours.append(timed(lambda: initlab.init_model(model, generator=g)))
        g.manual_seed(0)
        t_engine.append(timed(lambda: engine_init(model, g)))
        _apply.STD_SAMPLE = 1 << 62  # for information: measuring the std on whole tensors
        try:
            g.manual_seed(0)
            t_full.append(timed(lambda: initlab.init_model(model, generator=g)))
        finally:
            _apply.STD_SAMPLE = sample
    bare, ours, full, engine = min(t_bare), min(t_ours), min(t_full), min(t_engine)
    print(f"\n[2] bare torch.nn.init: {bare * 1e3:8.1f} ms   init_model: {ours * 1e3:8.1f} ms")
    print(f"    overhead: {ours / bare:.3f}x   (goal <= 1.1x: {'met' if ours / bare <= 1.1 else 'NOT met'})")
    print(f"    init_model vs the same variance_scaling_ calls made directly ({engine * 1e3:.1f} ms): "
          f"{ours / engine:.3f}x (tracing, fans, gains, report, realised std)")
    print(f"    (realised std on whole tensors instead of the first {sample} entries: "
          f"{full / bare:.3f}x)")

    # the two give the same distribution: same target std, realised within 5 standard errors
    report = initlab.init_model(model, generator=g)
    row = report.rows[0]
    se = row["target_std"] / math.sqrt(2 * min(W * W, sample))
    print(f"\nlayer 0: target std {row['target_std']:.6f}, realised {row['realised_std']:.6f} "
          f"({abs(row['realised_std'] - row['target_std']) / se:.1f} standard errors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
