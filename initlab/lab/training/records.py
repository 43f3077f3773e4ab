"""Per-layer records a unit keeps beside its metrics: the init report's per-layer rows, and fixed-bin
histograms of the activations and back-propagated gradients over training.

**Init rows** (``init.csv``; :func:`init_report_rows`). A data-dependent scheme reports what it did
per layer in ``init_model``'s report (``InitReport.extra[<scheme>]`` with ``rows``): for LSUV
(Mishkin & Matas 2016) each layer's ``iterations`` (rescaling steps W <- W sqrt(1 / Var(W x + b))
taken), the final output ``variance`` and ``mean`` on the batch, the total ``scale`` and whether it
``converged`` (1/0). One tidy row per (member, layer, number): scenario, seed, source (the report's
key, e.g. "lsuv"), index (1 = the first layer in forward order), layer (module name), quantity,
value. Schemes without per-layer data give no rows.

**Layer histograms** (``layer_histograms.csv``; :func:`histogram_rows`). With ``train.layer_stats``
on a stacked MLP, on the fixed held-out batch the per-layer statistics use, for every hidden layer
l = 1..L-1: the activation h_l = phi(z_l) and the back-propagated gradient dC/dz_l (C: the batch's
mean cross-entropy), as in Glorot & Bengio (2010), Figs. 6-7. Recorded at step 0 (the
initialisation) and at :data:`HIST_SNAPSHOTS` - 1 log steps spread over training, the last step
included (:func:`histogram_steps`: fixed by ``steps`` and ``log_every``, so the file does not depend
on TensorBoard settings). Each (member, step, quantity) has :data:`HIST_BINS` equal bins over
[-a, b] shared by its layers, a and b the smallest of 1, 2, 5 x 10^k covering the values
(:func:`nice_ceil`; a tanh layer gets [-1, 1]); non-finite values are left out. Rows: scenario,
seed, step, quantity ("activation" or "gradient"), layer (1 = first hidden layer), lo, hi, count
(every bin, empty ones included). Density = count / (sum of counts x (hi - lo)).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["INIT_COLUMNS", "HIST_COLUMNS", "HIST_BINS", "HIST_QUANTITIES", "HIST_SNAPSHOTS", "init_report_rows",
           "histogram_steps", "nice_ceil", "histogram_edges", "histogram_rows"]

INIT_COLUMNS = ("scenario", "seed", "source", "index", "layer", "quantity", "value")
HIST_COLUMNS = ("scenario", "seed", "step", "quantity", "layer", "lo", "hi", "count")
HIST_BINS = 50
HIST_QUANTITIES = ("activation", "gradient")
HIST_SNAPSHOTS = 4  # step 0 and three log steps (the last one included)


def init_report_rows(report: Any, scenario: str, seed: int) -> list[dict[str, Any]]:
    """The numbers of every per-layer table in ``report.extra`` (see the module docstring) as tidy rows."""
    out: list[dict[str, Any]] = []
    for source, part in (getattr(report, "extra", None) or {}).items():
        rows = getattr(part, "rows", None)
        if not isinstance(rows, list):
            continue
        for i, r in enumerate(rows, start=1):
            if not isinstance(r, Mapping) or "layer" not in r:
                continue
            for k, v in r.items():
                if k in ("layer", "index") or v is None or not isinstance(v, (bool, int, float, np.number)):
                    continue
                out.append({"scenario": scenario, "seed": int(seed), "source": str(source), "index": i,
                            "layer": str(r["layer"]), "quantity": str(k), "value": float(v)})
    return out


def histogram_steps(steps: int, log_every: int, snapshots: int = HIST_SNAPSHOTS) -> set[int]:
    """Step 0 and ``snapshots - 1`` log steps spread evenly over training, the last step included."""
    steps, log_every = int(steps), max(1, int(log_every))
    logs = list(range(log_every, steps + 1, log_every))
    if steps > 0 and (not logs or logs[-1] != steps):
        logs.append(steps)
    n = max(1, int(snapshots) - 1)
    picked = {0}
    if logs:
        picked |= {logs[max(0, math.ceil(k * len(logs) / n) - 1)] for k in range(1, n + 1)}
    return picked


def nice_ceil(x: float) -> float:
    """The smallest of 1, 2, 5 x 10^k that is >= x (0 for x <= 0)."""
    if not x > 0 or not math.isfinite(x):
        return 0.0
    e = math.floor(math.log10(x))
    for m in (1.0, 2.0, 5.0, 10.0):
        if m * 10.0 ** e >= x:
            return m * 10.0 ** e
    return 10.0 ** (e + 1)  # pragma: no cover - rounding at the edge of a decade


def histogram_edges(arrays: Sequence[np.ndarray], bins: int = HIST_BINS) -> np.ndarray:
    """``bins`` equal bins over [-nice_ceil(-min), nice_ceil(max)] of the finite values of ``arrays``
    (0 stays inside; [-1, 1] when every value is 0 or there is none)."""
    vals = [a for a in arrays if a.size]
    lo_raw = min((float(a.min()) for a in vals), default=0.0)
    hi_raw = max((float(a.max()) for a in vals), default=0.0)
    lo, hi = -nice_ceil(-lo_raw), nice_ceil(hi_raw)
    if lo == hi:
        lo, hi = -1.0, 1.0
    return np.linspace(lo, hi, int(bins) + 1)


def tb_histogram(a: np.ndarray, edges: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
    """TensorBoard's raw histogram fields (min, max, num, sum, sum_squares, ``bucket_limit``: the bins'
    upper edges, ``bucket``: their counts) of the finite float64 values ``a`` on the bins ``edges``."""
    if not a.size:
        return {"min": 0.0, "max": 0.0, "num": 0, "sum": 0.0, "sum_squares": 0.0, "bucket_limit": [0.0], "bucket": [0]}
    return {"min": float(a.min()), "max": float(a.max()), "num": int(a.size), "sum": float(a.sum()),
            "sum_squares": float(np.square(a).sum()), "bucket_limit": [float(x) for x in edges[1:]],
            "bucket": [int(c) for c in counts]}


def histogram_rows(values: Mapping[str, Sequence[np.ndarray]], scenario: str, seed: int, step: int
                   ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """(rows of ``layer_histograms.csv``, TensorBoard histograms ``{"activations/layer<l>": ...,
    "gradients/layer<l>": ...}``) of one member at one step; ``values``: quantity -> one array per
    hidden layer. Computed in float64 by numpy alone, so any executor gives the same counts."""
    rows: list[dict[str, Any]] = []
    tb: dict[str, dict[str, Any]] = {}
    for quantity in HIST_QUANTITIES:
        arrays = [np.asarray(a, dtype=np.float64).ravel() for a in values.get(quantity, ())]
        arrays = [a[np.isfinite(a)] for a in arrays]
        if not arrays:
            continue
        edges = histogram_edges(arrays)
        for layer, a in enumerate(arrays, start=1):
            counts, _ = np.histogram(a, bins=edges)
            tb[f"{quantity}s/layer{layer}"] = tb_histogram(a, edges, counts)
            for b, c in enumerate(counts):
                rows.append({"scenario": scenario, "seed": int(seed), "step": int(step), "quantity": quantity,
                             "layer": layer, "lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(c)})
    return rows, tb
