"""TensorBoard logs of a run, written with ``torch.utils.tensorboard.SummaryWriter``.

Layout: one log directory per member, ``tb/<scenario>/seed<k>/``, so that
``tensorboard --logdir RUN_DIR/tb`` lists every scenario and seed as its own run
(``sigmoid-normal/seed0``, ...) and TensorBoard's run filter (a regex such as ``relu-``) picks
comparisons out. Tags follow the classic study:

=====================  =========  ======================================================
tag                    kind       value (step)
=====================  =========  ======================================================
``input_var``          scalar     Var(x) of the first-pass batch, all entries (step 0)
``mat_mul_var_<i>``    scalar     Var(W_i x) of weight layer i, no bias (step 0), i from 1
``mat_mul_hist_<i>``   histogram  the values of W_i x on the first-pass batch (step 0)
``fc_out_<i>``         histogram  layer i's output after its activation (step 0)
``loss``, ``acc``      scalar     training minibatch loss / accuracy, mean over the steps
                                  since the previous log (steps log_every, 2 log_every, ...)
``test/loss``,         scalar     loss / accuracy on the whole held-out test split
``test/acc``                      (step 0 = before training, then every log_every steps)
``<tag>``              scalar     any other metric of :mod:`initlab.lab.metrics` (its ``tag``;
                                  ``test/<tag>`` for held-out rows, ``<tag>_<k>`` per component)
=====================  =========  ======================================================

As in the study, ``loss`` and ``acc`` are the training-batch values; the held-out values sit
under ``test/``. A member's directory is built under a temporary name and renamed into place
(see :func:`initlab.lab._io.atomic_dir`), so an interrupted run never leaves a log with
duplicated or missing events: the directory exists completely or not at all.

tensorboard and torch.utils.tensorboard are imported inside the functions.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_dir
from ..metrics import tensorboard_tag
from ..rundir import member_log_dir

__all__ = ["write_member_events", "member_log_dir", "first_pass_tags"]


def _layer_numbers(values: Mapping[str, np.ndarray]) -> list[int]:
    nums = set()
    for key in values:
        for prefix in ("mat_mul_", "fc_out_"):
            if key.startswith(prefix) and key[len(prefix):].isdigit():
                nums.add(int(key[len(prefix):]))
    return sorted(nums)


def first_pass_tags(values: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
    """The tags :func:`write_member_events` writes for these first-pass arrays (for checks)."""
    scalars, hists = [], []
    if "input" in values:
        scalars.append("input_var")
    for i in _layer_numbers(values):
        if f"mat_mul_{i}" in values:
            scalars.append(f"mat_mul_var_{i}")
            hists.append(f"mat_mul_hist_{i}")
        if f"fc_out_{i}" in values:
            hists.append(f"fc_out_{i}")
    return {"scalars": scalars, "histograms": hists}


def _pop_var(a: np.ndarray) -> float:
    """Population variance over every entry, in float64 (as ``torch.var(correction=0)``)."""
    a = np.asarray(a, dtype=np.float64)
    return float(a.var()) if a.size else math.nan


def write_member_events(log_dir: str | Path, values: Mapping[str, np.ndarray],
                        metrics: Iterable[Mapping[str, Any]], *, replace: bool = True) -> Path:
    """Write one member's TensorBoard events into ``log_dir`` (created atomically).

    ``values``: first-pass arrays ``input``, ``mat_mul_<i>``, ``fc_out_<i>`` (as in
    ``GroupResult.first_pass_values``); ``metrics``: the member's rows of metrics.csv (keys
    step, split, metric, value). Non-finite metric values (a diverged member) are skipped.
    With ``replace=True`` an existing directory is swapped for the new one.
    """
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(log_dir)
    with atomic_dir(log_dir, replace=replace) as tmp:
        writer = SummaryWriter(log_dir=str(tmp), flush_secs=3600)
        try:
            if "input" in values:
                writer.add_scalar("input_var", _pop_var(values["input"]), global_step=0)
            for i in _layer_numbers(values):
                mm = values.get(f"mat_mul_{i}")
                if mm is not None:
                    writer.add_scalar(f"mat_mul_var_{i}", _pop_var(mm), global_step=0)
                    _histogram(writer, f"mat_mul_hist_{i}", mm)
                fc = values.get(f"fc_out_{i}")
                if fc is not None:
                    _histogram(writer, f"fc_out_{i}", fc)
            for row in sorted(metrics, key=lambda r: (int(r["step"]), str(r["split"]), str(r["metric"]))):
                value = float(row["value"])
                if not math.isfinite(value):
                    continue
                tag = tensorboard_tag(str(row["metric"]), str(row["split"]))
                writer.add_scalar(tag, value, global_step=int(row["step"]))
            writer.flush()
        finally:
            writer.close()
    return log_dir


def _linear_edges(a: np.ndarray) -> np.ndarray:
    """30 equal bins from the smallest to the largest value (strictly increasing edges, also when all are equal)."""
    lo, hi = float(a.min()), float(a.max())
    edges = np.unique(np.linspace(lo, hi, 31)) if hi > lo else np.array([lo])
    if edges.size < 2:
        edges = np.array([np.nextafter(lo, -np.inf), np.nextafter(hi, np.inf)])
    return edges


def _histogram(writer: Any, tag: str, values: np.ndarray) -> None:
    """A histogram of the finite values: TensorBoard's exponential buckets when they hold every value
    (|x| up to about 1e20), else 30 equal bins over [min, max] (an exploding first pass, e.g. a deep
    N(0, 1) network, reaches 1e25 and more; TensorBoard's buckets would drop those values)."""
    a = np.asarray(values, dtype=np.float64).ravel()
    a = a[np.isfinite(a)]
    if not a.size:
        return
    limits = writer.default_bins
    bins: Any = "tensorflow" if limits[0] <= a.min() and a.max() <= limits[-1] else _linear_edges(a)
    writer.add_histogram(tag, a, global_step=0, bins=bins)
