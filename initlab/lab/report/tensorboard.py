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
``weights/<layer>``    histogram  weight layer's values at step 0 and every
                                  ``train.histograms_every`` log steps (and the last step)
=====================  =========  ======================================================

HParams: each member's log carries its hyperparameters (scenario, activation, scheme, depth,
width, seed, optimiser, learning rate, batch size, steps, scheme parameters) with ``test/acc``,
``test/loss``, ``acc`` and ``loss`` as the metrics, so TensorBoard's HParams tab shows the grid
as a table and parallel coordinates.

Live logs: during a run, :class:`MemberLog` writes a member's events as its unit trains (flushed
at each log step), from the events the unit reports (:mod:`initlab.lab.executors`), whichever
executor runs it. A member whose unit is (re)started has its live log written again from the start.
When the member is recorded, its live log is replaced by the canonical one, written by
:func:`write_member_events` from the recorded part (hyperparameters, first pass, histograms by step,
then the metrics rows sorted), so a finished member's log is the same file, wall times aside, however
its unit was interrupted, retried or resumed, and on any executor.

As in the study, ``loss`` and ``acc`` are the training-batch values; the held-out values sit
under ``test/``. :func:`write_member_events` (a member's log from its recorded part) builds the directory under a
temporary name and renames it into place (see :func:`initlab.lab._io.atomic_dir`).

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

__all__ = ["write_member_events", "member_log_dir", "first_pass_tags", "MemberLog", "HPARAM_METRICS"]

#: the scalar tags the HParams view shows beside each member's hyperparameters
HPARAM_METRICS = ("test/acc", "test/loss", "acc", "loss")


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


class MemberLog:
    """One member's TensorBoard log, written as the member trains: hyperparameters, the first pass,
    metrics rows and weight histograms, each flushed to disk by :meth:`flush`."""

    def __init__(self, log_dir: str | Path, hparams: Mapping[str, Any] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=3600, max_queue=1000)
        if hparams:
            self._hparams(hparams)

    def _hparams(self, hparams: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import summary as tb_summary

        clean = {str(k): v for k, v in hparams.items() if isinstance(v, (bool, int, float, str))}
        fw = self.writer._get_file_writer()
        for summary in tb_summary.hparams(clean, {tag: 0.0 for tag in HPARAM_METRICS}):
            fw.add_summary(summary)

    def first_pass(self, values: Mapping[str, np.ndarray]) -> None:
        writer = self.writer
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

    def rows(self, metrics: Iterable[Mapping[str, Any]]) -> None:
        """Metrics rows (keys step, split, metric, value); non-finite values (a diverged member) are skipped."""
        for row in sorted(metrics, key=lambda r: (int(r["step"]), str(r["split"]), str(r["metric"]))):
            value = float(row["value"])
            if math.isfinite(value):
                self.writer.add_scalar(tensorboard_tag(str(row["metric"]), str(row["split"])), value,
                                       global_step=int(row["step"]))

    def histograms(self, step: int, hists: Mapping[str, Mapping[str, Any]]) -> None:
        """Raw histograms (``{tag: initlab.lab.training.weight_histogram(...)}``) at ``step``."""
        for tag in sorted(hists):
            h = hists[tag]
            if int(h["num"]) > 0:
                self.writer.add_histogram_raw(tag, h["min"], h["max"], h["num"], h["sum"], h["sum_squares"],
                                              list(h["bucket_limit"]), list(h["bucket"]), global_step=int(step))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def write_member_events(log_dir: str | Path, values: Mapping[str, np.ndarray],
                        metrics: Iterable[Mapping[str, Any]], *, replace: bool = True,
                        histograms: Iterable[tuple[int, Mapping[str, Any]]] = (),
                        hparams: Mapping[str, Any] | None = None) -> Path:
    """Write one member's TensorBoard events into ``log_dir`` (created atomically).

    ``values``: first-pass arrays ``input``, ``mat_mul_<i>``, ``fc_out_<i>`` (as in
    ``GroupResult.first_pass_values``); ``metrics``: the member's rows of metrics.csv (keys
    step, split, metric, value). Non-finite metric values (a diverged member) are skipped.
    ``histograms``: (step, ``{tag: raw histogram}``) pairs; ``hparams``: the member's
    hyperparameters for the HParams view. With ``replace=True`` an existing directory is swapped
    for the new one.
    """
    log_dir = Path(log_dir)
    with atomic_dir(log_dir, replace=replace) as tmp:
        log = MemberLog(tmp, hparams)
        try:
            log.first_pass(values)
            for step, hists in histograms:
                log.histograms(step, hists)
            log.rows(metrics)
            log.flush()
        finally:
            log.close()
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
