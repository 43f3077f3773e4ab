"""Benchmark: a lab member's TensorBoard log written by initlab's events file against torch's SummaryWriter.

Both sides write the same summaries for one member of the classic study (784-100-100-10, first-pass
batch 100, 1000 steps logged every 50): the hyperparameters, the first pass (4 scalars and 6
histograms on TensorBoard's exponential buckets, ~10 kB each), 21 log steps of 3 weight histograms
(30 buckets) and the metrics rows (train and test loss and accuracy), in two patterns:

- **live**: as a unit trains, one flush per log step (``_Live.log``: initlab flushes the log step of
  every member together, :func:`initlab.lab.report.tensorboard.flush_logs`; here ``--members`` logs);
- **canonical**: a member's whole log at once, as when it is recorded (:func:`write_member_events`).

The peer is ``torch.utils.tensorboard.SummaryWriter`` as the lab used it (``add_scalar``,
``add_histogram(bins="tensorflow")``, ``add_histogram_raw``, the HParams summaries, ``flush()`` per log
step): its writer thread computes each record's CRC-32C a byte at a time in Python. Both run in this
process, interleaved; times are process CPU seconds (the writer thread included) and wall seconds,
medians over ``--rounds``. Run from the repository root: ``python bench/bench_tensorboard.py``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def member_data(seed: int = 0) -> tuple[dict[str, np.ndarray], list[dict[str, Any]], list[tuple[int, dict[str, Any]]]]:
    """First-pass arrays, metrics rows and weight histograms of one classic member (synthetic values)."""
    import torch

    from initlab.lab.training.group import weight_histogram

    rng = np.random.default_rng(seed)
    x = rng.random((100, 784), dtype=np.float32)
    values = {"input": x}
    h = x
    for i, (a, b) in enumerate(((784, 100), (100, 100), (100, 10)), start=1):
        z = h @ rng.standard_normal((a, b)).astype(np.float32) / np.sqrt(a)
        values[f"mat_mul_{i}"], h = z, np.maximum(z, 0)
        values[f"fc_out_{i}"] = h
    steps = [0, *range(50, 1001, 50)]
    rows = [{"step": s, "split": sp, "metric": m, "value": float(rng.random())}
            for s in steps for sp in ("train", "test") for m in ("acc", "loss") if s or sp == "test"]
    hists = [(s, {f"weights/{k}": weight_histogram(torch.from_numpy(rng.standard_normal((100, 100)))) for k in (1, 3, 5)})
             for s in steps]
    return values, rows, hists


HPARAMS = {"scenario": "relu-he", "activation": "relu", "scheme": "he_normal", "depth": 2, "width": 100, "seed": 0,
           "optimizer": "adam", "lr": 1e-3, "batch_size": 30, "steps": 1000}


class PeerLog:
    """The same log through torch's SummaryWriter (the lab's writer before its own events file)."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard import summary as tb_summary

        self.w = SummaryWriter(log_dir=str(log_dir), flush_secs=3600, max_queue=1000)
        fw = self.w._get_file_writer()
        for s in tb_summary.hparams(HPARAMS, {t: 0.0 for t in ("test/acc", "test/loss", "acc", "loss")}):
            fw.add_summary(s)

    def first_pass(self, values: dict[str, np.ndarray]) -> None:
        self.w.add_scalar("input_var", float(values["input"].astype(np.float64).var()), global_step=0)
        for i in (1, 2, 3):
            mm = values[f"mat_mul_{i}"].astype(np.float64).ravel()
            self.w.add_scalar(f"mat_mul_var_{i}", float(mm.var()), global_step=0)
            self.w.add_histogram(f"mat_mul_hist_{i}", mm, global_step=0, bins="tensorflow")
            self.w.add_histogram(f"fc_out_{i}", values[f"fc_out_{i}"].astype(np.float64).ravel(), global_step=0,
                                 bins="tensorflow")

    def histograms(self, step: int, hists: dict[str, dict[str, Any]]) -> None:
        for tag in sorted(hists):
            h = hists[tag]
            self.w.add_histogram_raw(tag, h["min"], h["max"], h["num"], h["sum"], h["sum_squares"],
                                     list(h["bucket_limit"]), list(h["bucket"]), global_step=step)

    def rows(self, rows: list[dict[str, Any]]) -> None:
        for r in sorted(rows, key=lambda r: (r["step"], r["split"], r["metric"])):
            self.w.add_scalar(("test/" if r["split"] == "test" else "") + r["metric"], r["value"], global_step=r["step"])

    def flush(self) -> None:
        self.w.flush()

    def close(self) -> None:
        self.w.close()


def live(make: Any, flush_all: Any, root: Path, members: int, data: tuple) -> None:
    """``members`` logs written as a unit trains: per log step, each member's records, then the flush."""
    values, rows, hists = data
    logs = [make(root / f"m{k}") for k in range(members)]
    by_step: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r)
    for step, h in hists:
        for log in logs:
            if step == 0:
                log.first_pass(values)
            log.histograms(step, h)
            log.rows(by_step.get(step, []))
        flush_all(logs)
    for log in logs:
        log.close()


def canonical(make: Any, root: Path, members: int, data: tuple) -> None:
    """``members`` whole logs, each written at once."""
    values, rows, hists = data
    for k in range(members):
        log = make(root / f"c{k}")
        log.first_pass(values)
        for step, h in hists:
            log.histograms(step, h)
        log.rows(rows)
        log.close()


def _timed(fn: Any, *args: Any) -> tuple[float, float]:
    c, w = time.process_time(), time.perf_counter()
    fn(*args)
    return time.process_time() - c, time.perf_counter() - w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=15, help="member logs per pattern (classic: 15)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)

    from initlab.lab.report.tensorboard import MemberLog, flush_logs

    data = member_data()
    sides = {
        "initlab": (lambda d: MemberLog(d, HPARAMS), flush_logs),
        "SummaryWriter": (PeerLog, lambda logs: [log.flush() for log in logs]),
    }
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds + 1):  # round 0 warms up (imports, bucket tables)
            for name, (make, flush_all) in sides.items():
                root = Path(tmp) / f"{name}{r}"
                t_live = _timed(live, make, flush_all, root, args.members, data)
                t_can = _timed(canonical, make, root, args.members, data)
                if r:
                    times.setdefault((name, "live"), []).append(t_live)
                    times.setdefault((name, "canonical"), []).append(t_can)
    load = os.getloadavg()
    print(f"TensorBoard logs of {args.members} classic members, median of {args.rounds} interleaved rounds "
          f"(load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cpus)")
    for pattern in ("live", "canonical"):
        med = {n: (statistics.median(c for c, _ in times[(n, pattern)]), statistics.median(w for _, w in times[(n, pattern)]))
               for n in sides}
        (ic, iw), (pc, pw) = med["initlab"], med["SummaryWriter"]
        print(f"  {pattern:>9}: initlab {ic:.3f} s CPU / {iw:.3f} s wall, SummaryWriter {pc:.3f} s CPU / {pw:.3f} s "
              f"wall: {pc / ic:.1f}x less CPU, {pw / iw:.1f}x less wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
