"""Benchmark: ``init_model(model, "auto")`` on real architectures against the model's own
constructor initialisation, per architecture, in the same process (best of ``--repeat`` runs).

Columns: ``construct`` = building the model on the CPU (its library's own init);
``meta+init`` = building on the meta device, ``to_empty()`` and ``init_model`` (the README's
recipe); ``init_model`` = ``init_model`` alone on the built model; ratios against ``construct``.
Small models make the fixed costs show (tracing with torch.fx to find activations, the report);
on a shared machine the times vary with its load: compare ratios from one run.
The architectures are the harness's (``tests/test_real_models.py``: small configs).

    python bench/bench_real_models.py [--repeat 3] [--only gpt2,resnet]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import initlab

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated substrings of architecture names")
    args = ap.parse_args()
    from test_real_models import MODELS  # the harness's architectures

    gen = torch.Generator().manual_seed(0)
    print(f"{'architecture':34} {'params':>9} {'construct':>10} {'meta+init':>10} {'init_model':>10} "
          f"{'meta+init/construct':>20} {'init_model/construct':>21}")
    for name, (make, _) in MODELS.items():
        if args.only and not any(s in name for s in args.only.split(",")):
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

        t_con = best(make, args.repeat)
        t_meta = best(meta_init, args.repeat)
        t_init = best(lambda model=model: initlab.init_model(model, "auto", generator=gen), args.repeat)
        print(f"{name:34} {n:>9,} {t_con * 1e3:>8.1f}ms {t_meta * 1e3:>8.1f}ms {t_init * 1e3:>8.1f}ms "
              f"{t_meta / t_con:>19.2f}x {t_init / t_con:>20.2f}x")


if __name__ == "__main__":
    main()
