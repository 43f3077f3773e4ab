"""Compare two run directories as the executors promise: metrics.csv, first_pass.csv (and claims.csv,
init.csv, layer_histograms.csv where present) byte for byte, and every TensorBoard event (tag, step, value, histogram) of every member."""
from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

CSV_FILES = ("metrics.csv", "first_pass.csv", "claims.csv", "init.csv", "layer_histograms.csv")


def tb_events(run_dir: Path) -> dict[str, Counter]:
    """member log dir -> multiset of (step, serialised summary value) over its event files (wall times left out)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    out: dict[str, Counter] = {}
    for f in sorted((run_dir / "tb").rglob("events.out.tfevents*")):
        c = out.setdefault(str(f.parent.relative_to(run_dir)), Counter())
        for raw in RawEventFileLoader(str(f)).Load():
            ev = event_pb2.Event.FromString(raw)
            for v in ev.summary.value:
                c[(ev.step, v.SerializeToString(deterministic=True))] += 1
    return out


def compare_run_dirs(a: Path, b: Path) -> tuple[int, list[str]]:
    """(files compared, differences): the CSV files byte for byte, then each member's TensorBoard events."""
    compared, diffs = 0, []
    for name in CSV_FILES:
        pa, pb = a / name, b / name
        if not pa.exists() and not pb.exists():
            continue
        compared += 1
        if not (pa.is_file() and pb.is_file() and pa.read_bytes() == pb.read_bytes()):
            diffs.append(name)
    ea, eb = tb_events(a), tb_events(b)
    for member in sorted(set(ea) | set(eb)):
        compared += 1
        if ea.get(member) != eb.get(member):
            diffs.append(f"{member} (TensorBoard events)")
    return compared, diffs


class KillOnce:
    """A progress callable that SIGKILLs the worker process (on this machine) of the first unit to reach ``at_step``."""

    def __init__(self, at_step: int = 10) -> None:
        self.at_step, self.workers, self.killed = at_step, {}, []

    def __call__(self, ev) -> None:
        if ev.event == "unit_start":
            self.workers[ev.unit] = ev.worker
        elif ev.event == "step" and ev.step >= self.at_step and not self.killed:
            pid = int(self.workers[ev.unit].split("@")[0])
            assert pid != os.getpid()
            os.kill(pid, signal.SIGKILL)
            self.killed.append(pid)


#: units of at most this many members for ``small()`` (5 members -> 3 units, so that two workers train at once)
SMALL_MAX_MEMBERS = 2


def small():
    """The smoke study, shortened: 5 members, 40 steps, a log step every 10."""
    from initlab.lab.config import load_experiment, with_overrides

    return with_overrides(load_experiment("smoke"), {"train.steps": 40, "train.log_every": 10})
