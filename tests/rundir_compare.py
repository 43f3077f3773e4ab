"""Compare two run directories as the executors promise: metrics.csv, first_pass.csv (and claims.csv where
present) byte for byte, and every TensorBoard event (tag, step, value, histogram) of every member."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

CSV_FILES = ("metrics.csv", "first_pass.csv", "claims.csv")


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
