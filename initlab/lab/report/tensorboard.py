"""TensorBoard logs of a run: TensorBoard's Event protos, written as TFRecords by :class:`MemberLog`.

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

Writing. :class:`MemberLog` builds the same summaries as ``torch.utils.tensorboard.SummaryWriter``
(``simple_value`` scalars, ``HistogramProto`` histograms, the HParams plugin's three summaries) and
keeps them in memory until :meth:`MemberLog.flush`, which frames them as TFRecords (length and data,
each with its masked CRC-32C) and writes them with one ``write``: no writer thread, no queue, and the
CRCs of all the records of a flush computed together with numpy (:func:`crc32cs`; tensorboard's own
writer loops over every byte in Python). :func:`flush_logs` flushes the logs of a unit's members at
one log step together. A process killed between two flushes loses only the events since
the last one; a live log is replaced by the canonical one when its member is recorded.

tensorboard and torch.utils.tensorboard are imported inside the functions.
"""
from __future__ import annotations

import itertools
import math
import os
import socket
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..metrics import tensorboard_tag
from ..rundir import DurableBatch, member_log_dir, staged_dir

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


# ----------------------------------------------------------------------------- the events file

# An events file is a sequence of TFRecords: uint64 length, uint32 masked CRC-32C of the length,
# the serialised Event, uint32 masked CRC-32C of the Event (TensorBoard checks both). tensorboard's
# own writer computes the CRC one byte at a time in Python (~0.2 us a byte) in a background thread;
# here the CRCs of all the records of a flush (a log step of every member of a unit) are computed
# together in numpy over 32-byte lanes, combined pairwise, and each file gets one write() and a flush.

_CRC_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected
_LANE = 32  # bytes per lane of the vectorised CRC


def _crc_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> np.uint32(1)) ^ np.uint32(_CRC_POLY), t >> np.uint32(1)).astype(np.uint32)
    return t


_TABLE = _crc_table()
_TABLE_LIST = [int(v) for v in _TABLE]


def _zeros_operator(n: int) -> list[int]:
    """The register after feeding ``n`` zero bytes, as the images of the 32 basis registers (it is linear)."""
    image = []
    for i in range(32):
        r = 1 << i
        for _ in range(n):
            r = _TABLE_LIST[r & 0xFF] ^ (r >> 8)
        image.append(r)
    return image


def _compose(a: list[int], b: list[int]) -> list[int]:
    """The operator ``a`` after ``b`` (both as basis images)."""
    out = []
    for r in b:
        v = 0
        for i in range(32):
            if r >> i & 1:
                v ^= a[i]
        out.append(v)
    return out


def _byte_tables(image: list[int]) -> np.ndarray:
    """(4, 256) tables: the operator applied to a register is the XOR of one entry per register byte."""
    bits = (np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1  # (256, 8)
    out = np.zeros((4, 256), dtype=np.uint32)
    for k in range(4):
        cols = np.array(image[8 * k:8 * k + 8], dtype=np.uint32)
        out[k] = np.bitwise_xor.reduce(np.where(bits.astype(bool), cols[None, :], np.uint32(0)), axis=1)
    return out


_SHIFT_IMAGES: list[list[int]] = []  # level k: the operator "feed _LANE * 2**k zero bytes"
_SHIFTS: list[np.ndarray] = []  # the same operators as byte tables


def _shift_tables(level: int) -> np.ndarray:
    while len(_SHIFTS) <= level:
        img = _compose(_SHIFT_IMAGES[-1], _SHIFT_IMAGES[-1]) if _SHIFT_IMAGES else _zeros_operator(_LANE)
        _SHIFT_IMAGES.append(img)
        _SHIFTS.append(_byte_tables(img))
    return _SHIFTS[level]


def _raw_crcs(rows: np.ndarray) -> np.ndarray:
    """The CRC-32C registers of the rows of ``rows`` (uint8, (R, lanes * 32), lanes a power of two) fed into
    a zero register: each row cut into lanes of 32 bytes, every lane's register at once, then the lanes
    combined pairwise (the left one shifted by the length of the right one, XOR the right one)."""
    n_rows, width = rows.shape
    lanes = width // _LANE
    cols = rows.reshape(n_rows * lanes, _LANE).T.astype(np.uint32)
    r = np.zeros(n_rows * lanes, dtype=np.uint32)
    low, eight = np.uint32(0xFF), np.uint32(8)
    for col in cols:
        r = _TABLE[(r ^ col) & low] ^ (r >> eight)
    r = r.reshape(n_rows, lanes)
    level = 0
    while r.shape[1] > 1:
        t = _shift_tables(level)
        left, right = r[:, 0::2], r[:, 1::2]
        r = (t[0][left & 0xFF] ^ t[1][(left >> 8) & 0xFF] ^ t[2][(left >> 16) & 0xFF] ^ t[3][left >> 24]) ^ right
        level += 1
    return r[:, 0]


def _crc_loop(data: bytes) -> int:
    crc, t = 0xFFFFFFFF, _TABLE_LIST
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32cs(datas: Sequence[bytes]) -> list[int]:
    """CRC-32C (Castagnoli) of each byte string, as TensorBoard's records carry it (before masking).

    Computed together: the strings are grouped by their number of 32-byte lanes (rounded up to a power
    of two), each group as one array, zeros in front (they leave a zero register at zero); the register's
    start value 0xFFFFFFFF is the zero register with the first 4 bytes inverted."""
    out = [0] * len(datas)
    groups: dict[int, list[int]] = {}
    for i, d in enumerate(datas):
        if len(d) < 4:
            out[i] = _crc_loop(d)
        else:
            groups.setdefault(1 << (-(-len(d) // _LANE) - 1).bit_length(), []).append(i)
    for lanes, idx in groups.items():
        width = lanes * _LANE
        rows = np.zeros((len(idx), width), dtype=np.uint8)
        starts = np.empty(len(idx), dtype=np.intp)
        for k, i in enumerate(idx):
            starts[k] = width - len(datas[i])
            rows[k, starts[k]:] = np.frombuffer(datas[i], dtype=np.uint8)
        rows[np.arange(len(idx))[:, None], starts[:, None] + np.arange(4)] ^= 0xFF
        for i, c in zip(idx, _raw_crcs(rows).tolist()):
            out[i] = c ^ 0xFFFFFFFF
    return out


def crc32c(data: bytes) -> int:
    """CRC-32C of one byte string (see :func:`crc32cs`)."""
    return crc32cs([data])[0]


def _masked(crc: int) -> bytes:
    return struct.pack("<I", ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF)


def _framed(records: Sequence[bytes]) -> bytes:
    """TFRecords: each record's length, the masked CRC of the length, the record, the masked CRC of the record."""
    heads = [struct.pack("<Q", len(r)) for r in records]
    crcs = crc32cs(heads + list(records))
    n = len(records)
    return b"".join(h + _masked(crcs[k]) + r + _masked(crcs[n + k]) for k, (h, r) in enumerate(zip(heads, records)))


_UID = itertools.count()


class _EventFile:
    """One ``events.out.tfevents.*`` file: events are kept in memory and written, framed, by :meth:`flush`
    (one ``write`` and a flush to the OS per call; a process killed in between loses the events since the
    last flush, never the file's earlier records)."""

    def __init__(self, log_dir: Path) -> None:
        from tensorboard.compat.proto import event_pb2

        log_dir.mkdir(parents=True, exist_ok=True)
        self.Event = event_pb2.Event
        self.path = log_dir / (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                               f"{os.getpid()}.{next(_UID)}")
        self.file: Any = open(self.path, "wb")  # noqa: SIM115 - open until close()
        self.pending: list[bytes] = []
        self.add(self.Event(wall_time=time.time(), file_version="brain.Event:2",
                            source_metadata=event_pb2.SourceMetadata(writer="initlab")))
        self.flush()

    def add(self, event: Any) -> None:
        self.pending.append(event.SerializeToString())

    def summary(self, summary: Any, step: int | None) -> None:
        event = self.Event(wall_time=time.time(), summary=summary)
        if step is not None:
            event.step = int(step)
        self.add(event)

    def flush(self) -> None:
        flush_files([self])

    def write(self, framed: bytes) -> None:
        if framed:
            self.file.write(framed)
        self.pending.clear()
        self.file.flush()

    def close(self) -> None:
        if not self.file.closed:
            try:
                self.flush()
            finally:
                self.file.close()


def flush_files(files: Sequence[_EventFile]) -> None:
    """Write the pending events of several files, their CRCs computed together (one numpy pass per size class)."""
    framed = _framed([p for f in files for p in f.pending])
    at = 0
    for f in files:
        size = sum(16 + len(p) for p in f.pending)  # length 8, its CRC 4, the record, its CRC 4
        f.write(framed[at:at + size])
        at += size


def flush_logs(logs: Iterable[MemberLog]) -> None:
    """:meth:`MemberLog.flush` of several logs at once (a log step of every member of a unit)."""
    flush_files([log.events for log in logs])


def _default_bins() -> list[float]:
    """TensorBoard's exponential buckets (as ``SummaryWriter.default_bins``): +-1e-12 * 1.1**k up to 1e20, and 0."""
    v, pos = 1e-12, []
    while v < 1e20:
        pos.append(v)
        v *= 1.1
    return [-x for x in reversed(pos)] + [0] + pos


_BINS: list[list[float]] = []


class MemberLog:
    """One member's TensorBoard log, written as the member trains: hyperparameters, the first pass,
    metrics rows and weight histograms, written to disk by :meth:`flush` (one write per call)."""

    def __init__(self, log_dir: str | Path, hparams: Mapping[str, Any] | None = None) -> None:
        from tensorboard.compat.proto import summary_pb2

        self.Summary, self.Histogram = summary_pb2.Summary, summary_pb2.HistogramProto
        self.events = _EventFile(Path(log_dir))
        if hparams:
            self._hparams(hparams)

    def _hparams(self, hparams: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import summary as tb_summary

        from tensorboard.plugins.hparams import plugin_data_pb2

        clean = {str(k): v for k, v in hparams.items() if isinstance(v, (bool, int, float, str))}
        for summary in tb_summary.hparams(clean, {tag: 0.0 for tag in HPARAM_METRICS}):
            for value in summary.value:  # the hparams map in key order: the same bytes in every process
                data = value.metadata.plugin_data
                data.content = plugin_data_pb2.HParamsPluginData.FromString(data.content).SerializeToString(
                    deterministic=True)
            self.add(summary, None)

    def add(self, summary: Any, step: int | None) -> None:
        """One Summary proto as an event at ``step`` (None: no step)."""
        self.events.summary(summary, step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.add(self.Summary(value=[self.Summary.Value(tag=tag, simple_value=float(value))]), step)

    def first_pass(self, values: Mapping[str, np.ndarray]) -> None:
        if "input" in values:
            self.scalar("input_var", _pop_var(values["input"]), 0)
        for i in _layer_numbers(values):
            mm = values.get(f"mat_mul_{i}")
            if mm is not None:
                self.scalar(f"mat_mul_var_{i}", _pop_var(mm), 0)
                self._histogram(f"mat_mul_hist_{i}", mm)
            fc = values.get(f"fc_out_{i}")
            if fc is not None:
                self._histogram(f"fc_out_{i}", fc)

    def _histogram(self, tag: str, values: np.ndarray) -> None:
        """A histogram of the finite values at step 0: TensorBoard's exponential buckets when they hold every
        value (|x| up to about 1e20), else 30 equal bins over [min, max] (an exploding first pass, e.g. a deep
        N(0, 1) network, reaches 1e25 and more; TensorBoard's buckets would drop those values)."""
        from torch.utils.tensorboard import summary as tb_summary

        a = np.asarray(values, dtype=np.float64).ravel()
        a = a[np.isfinite(a)]
        if not a.size:
            return
        if not _BINS:
            _BINS.append(_default_bins())
        limits = _BINS[0]
        bins: Any = limits if limits[0] <= a.min() and a.max() <= limits[-1] else _linear_edges(a)
        self.add(tb_summary.histogram(tag, a, bins), 0)

    def rows(self, metrics: Iterable[Mapping[str, Any]]) -> None:
        """Metrics rows (keys step, split, metric, value); non-finite values (a diverged member) are skipped."""
        for row in sorted(metrics, key=lambda r: (int(r["step"]), str(r["split"]), str(r["metric"]))):
            value = float(row["value"])
            if math.isfinite(value):
                self.scalar(tensorboard_tag(str(row["metric"]), str(row["split"])), value, int(row["step"]))

    def histograms(self, step: int, hists: Mapping[str, Mapping[str, Any]]) -> None:
        """Raw histograms (``{tag: initlab.lab.training.weight_histogram(...)}``) at ``step``."""
        for tag in sorted(hists):
            h = hists[tag]
            if int(h["num"]) > 0:
                histo = self.Histogram(min=h["min"], max=h["max"], num=h["num"], sum=h["sum"],
                                       sum_squares=h["sum_squares"], bucket_limit=list(h["bucket_limit"]),
                                       bucket=list(h["bucket"]))
                self.add(self.Summary(value=[self.Summary.Value(tag=tag, histo=histo)]), int(step))

    def flush(self) -> None:
        self.events.flush()

    def close(self) -> None:
        self.events.close()


def write_member_events(log_dir: str | Path, values: Mapping[str, np.ndarray],
                        metrics: Iterable[Mapping[str, Any]], *, replace: bool = True,
                        histograms: Iterable[tuple[int, Mapping[str, Any]]] = (),
                        hparams: Mapping[str, Any] | None = None, batch: DurableBatch | None = None) -> Path:
    """Write one member's TensorBoard events into ``log_dir`` (created atomically).

    ``values``: first-pass arrays ``input``, ``mat_mul_<i>``, ``fc_out_<i>`` (as in
    ``GroupResult.first_pass_values``); ``metrics``: the member's rows of metrics.csv (keys
    step, split, metric, value). Non-finite metric values (a diverged member) are skipped.
    ``histograms``: (step, ``{tag: raw histogram}``) pairs; ``hparams``: the member's
    hyperparameters for the HParams view. With ``replace=True`` an existing directory is swapped
    for the new one. ``batch``: the directory is put in place when the batch commits (with the other
    members' logs and parts, :class:`~initlab.lab.rundir.DurableBatch`), else now.
    """
    log_dir = Path(log_dir)
    with staged_dir(log_dir, replace=replace, batch=batch) as tmp:
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
