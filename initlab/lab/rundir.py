"""The run directory: its layout, the lock, and committing and merging members' results.

Layout (``run_dir/``)::

    config.toml        the resolved experiment (experiment_to_toml); loading it gives the experiment back
    run.json           name, config fingerprint, status ("running", "interrupted", "complete"),
                       members done, diverged members, training seconds
    metrics.csv        scenario, seed, step, split, metric, value (see initlab.lab.metrics)
    first_pass.csv     the probe table (initlab.probe) per scenario x seed x weight layer:
                       scenario, seed, scheme, then the probe's columns
    tb/<scenario>/seed<k>/   TensorBoard events of one member (initlab.lab.report.tensorboard)
    figures/*.png, report.html   (initlab.lab.report)
    parts/<scenario>/seed<k>/   a finished member's own results (metrics.csv, first_pass.csv,
                       values.npz with the first-pass arrays, member.json)

Completion is recorded per member: :func:`commit_member` writes ``parts/<scenario>/seed<k>/``
under a temporary name and renames it into place, so a member is either completely recorded or
not at all; :func:`merge` rebuilds metrics.csv and first_pass.csv from the parts, atomically,
in experiment order. :func:`check_out_dir` refuses a directory that holds another experiment
(or anything else); :func:`lock` lets one process write at a time. Every file is written
atomically (:mod:`initlab.lab._io`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .._errors import InitlabError
from .._probe import COLUMNS as PROBE_COLUMNS
from ._io import TMP_PREFIX, atomic_dir, atomic_write_csv, atomic_write_text, csv_text, read_csv, slug
from .config import config_fingerprint, experiment_to_dict, load_experiment
from .metrics import METRICS_COLUMNS
from .specs import Experiment, Scenario
from .training import GroupResult

__all__ = ["member_dir", "member_log_dir", "tb_dir", "read_run_meta", "config_differences", "check_out_dir", "lock",
           "done_members", "first_pass_columns", "commit_member", "merge", "write_meta", "clear_results",
           "METRICS_COLUMNS", "FIRST_PASS_LEAD"]

FIRST_PASS_LEAD = ("scenario", "seed", "scheme")
_FORMAT = 1


# ----------------------------------------------------------------------------- layout


def member_dir(run_dir: str | Path, scenario: str, seed: int) -> Path:
    """``run_dir/parts/<scenario>/seed<k>``: where one finished member's results live."""
    return Path(run_dir) / "parts" / slug(scenario) / f"seed{int(seed)}"


def member_log_dir(tb_root: str | Path, scenario_dir: str, seed: int) -> Path:
    """``tb_root/<scenario_dir>/seed<seed>``: the TensorBoard log directory of one member."""
    return Path(tb_root) / scenario_dir / f"seed{int(seed)}"


def tb_dir(run_dir: Path, scenario: str, seed: int) -> Path:
    """``run_dir/tb/<scenario>/seed<k>``."""
    return member_log_dir(run_dir / "tb", slug(scenario), seed)


def read_run_meta(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of a run directory as a dict ({} when absent or unreadable)."""
    p = Path(run_dir) / "run.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------- what a directory holds


def _dir_experiment(run_dir: Path) -> tuple[str, str, Experiment | None]:
    """(name, fingerprint, experiment or None) of what a run directory holds."""
    meta = read_run_meta(run_dir)
    cfg = run_dir / "config.toml"
    other = None
    if cfg.is_file():
        try:
            other = load_experiment(cfg)
        except InitlabError as e:
            if not meta.get("fingerprint"):
                raise InitlabError(f"output directory {str(run_dir)!r} holds a config.toml that cannot be loaded "
                                   f"({e}); choose another --out directory") from e
    if meta.get("fingerprint"):
        return str(meta.get("name", "?")), str(meta["fingerprint"]), other
    if other is None:
        raise InitlabError(f"{run_dir / 'run.json'}: not an initlab run record (no config fingerprint) and there is "
                           f"no config.toml beside it; remove the folder {str(run_dir)!r} or use another --out directory")
    return other.name, config_fingerprint(other), other


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flat(v, f"{prefix}[{i}]"))
        out[f"{prefix} (count)"] = len(d)
        return out
    return {prefix: d}


def config_differences(old: Experiment, new: Experiment, *, limit: int = 6) -> list[str]:
    """The settings that differ between two experiments, as ``"train.steps: 60 -> 20"`` (labels and device excluded)."""
    a, b = _flat(experiment_to_dict(old)), _flat(experiment_to_dict(new))
    skip = {"name", "description", "train.device"}
    keys = [k for k in dict.fromkeys(list(a) + list(b)) if k not in skip and a.get(k, "<none>") != b.get(k, "<none>")]
    out = [f"{k}: {a.get(k, '<none>')!r} -> {b.get(k, '<none>')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        out.append(f"... and {len(keys) - limit} more")
    return out


def check_out_dir(run_dir: Path, exp: Experiment, fingerprint: str) -> bool:
    """Whether ``run_dir`` already is a run directory of ``exp``; raise if it holds anything else."""
    if not run_dir.exists():
        return False
    if not run_dir.is_dir():
        raise InitlabError(f"output path {str(run_dir)!r} exists and is not a directory")
    entries = [p for p in run_dir.iterdir() if not p.name.startswith(TMP_PREFIX) and p.name != "run.lock"]
    if not entries:
        return False
    if not (run_dir / "config.toml").is_file() and not (run_dir / "run.json").is_file():
        raise InitlabError(f"output directory {str(run_dir)!r} is not empty and is not an initlab run directory "
                           f"(no config.toml); choose another --out directory")
    name, fp, other = _dir_experiment(run_dir)
    if fp != fingerprint:
        diff = config_differences(other, exp) if other is not None else []
        if other is not None and not diff and config_fingerprint(other) == fingerprint:
            raise InitlabError(
                f"output directory {str(run_dir)!r} holds the same experiment, recorded by an earlier initlab under "
                f"another config fingerprint ({fp[:12]}, now {fingerprint[:12]}), so its finished members cannot be "
                "matched: use another --out directory, or delete that one to start over")
        raise InitlabError(
            f"output directory {str(run_dir)!r} holds another experiment: {name!r} (config fingerprint {fp[:12]}), "
            f"not {exp.name!r} (config fingerprint {fingerprint[:12]})"
            + (f"; they differ in {'; '.join(diff)}" if diff else "")
            + ". Refusing to mix results: use another --out directory, or delete that one to start over")
    return True


# ----------------------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _lock_holder(path: Path) -> tuple[int, str | None]:
    """(pid, host) written in a lock file; pid -1 when unreadable."""
    try:
        other = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        other = {}
    pid = int(other.get("pid", -1)) if str(other.get("pid", "")).lstrip("-").isdigit() else -1
    return pid, other.get("host")


def _take_over(path: Path, run_dir: Path, me: dict[str, Any]) -> None:
    """Remove a stale lock (its process is gone); raise when a live process holds it."""
    pid, host = _lock_holder(path)
    same_host = host == me["host"]
    if pid > 0 and same_host and pid != os.getpid() and _pid_alive(pid):
        raise InitlabError(f"another initlab process (pid {pid}) is writing to {str(run_dir)!r}; "
                           f"wait for it to finish (or delete {path} if that process is gone)")
    if pid > 0 and not same_host:
        raise InitlabError(f"{str(run_dir)!r} is locked by pid {pid} on host {host!r}; "
                           f"delete {path} if that run is gone")
    with contextlib.suppress(OSError):
        path.unlink()


@contextlib.contextmanager
def lock(run_dir: Path) -> Iterator[None]:
    """``run_dir/run.lock`` (O_EXCL): one writer per run directory; a stale lock (dead pid) is taken over."""
    path = run_dir / "run.lock"
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over(path, run_dir, me)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:  # pragma: no cover - lost a race twice
        raise InitlabError(f"could not lock {str(run_dir)!r}: another process keeps taking {path}")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


# ----------------------------------------------------------------------------- members


def done_members(run_dir: Path, fingerprint: str) -> set[tuple[str, int]]:
    done = set()
    parts = run_dir / "parts"
    if not parts.is_dir():
        return done
    for mj in parts.glob("*/seed*/member.json"):
        try:
            meta = json.loads(mj.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if meta.get("fingerprint") != fingerprint:
            continue
        done.add((str(meta["scenario"]), int(meta["seed"])))
    return done


def first_pass_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    cols = list(FIRST_PASS_LEAD) + [c for c in PROBE_COLUMNS if c not in FIRST_PASS_LEAD]
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def commit_member(run_dir: Path, fingerprint: str, scenario: Scenario, seed: int, result: GroupResult,
                   unit_index: int) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Write one member's results as ``parts/<scenario>/seed<k>/`` (atomically, all files at once).

    Returns the member's first-pass arrays and metrics rows (for its TensorBoard log)."""
    key = (scenario.name, int(seed))
    metrics = [{c: r[c] for c in METRICS_COLUMNS} for r in result.metrics
               if (r["scenario"], int(r["seed"])) == key]
    first_pass = [{**r, "scenario": scenario.name, "seed": int(seed), "scheme": str(scenario.scheme)}
                  for r in result.first_pass if (r.get("scenario"), int(r.get("seed", -1))) == key]
    values = {k: np.asarray(v) for k, v in result.first_pass_values.get(key, {}).items()}
    diverged = [d for d in result.diverged if (d["scenario"], int(d["seed"])) == key]
    meta = {
        "scenario": scenario.name, "seed": int(seed), "scheme": str(scenario.scheme),
        "activation": str(scenario.activation), "fingerprint": fingerprint,
        "diverged_step": int(diverged[0]["step"]) if diverged else None,
        "unit": unit_index, "unit_wall_s": float(result.wall_s),
        "engine": str(getattr(result, "engine", "")), "device": str(getattr(result, "device", "")),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    target = member_dir(run_dir, scenario.name, seed)
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "metrics.csv").write_text(csv_text(metrics, METRICS_COLUMNS), encoding="utf-8")
        (tmp / "first_pass.csv").write_text(csv_text(first_pass, first_pass_columns(first_pass)), encoding="utf-8")
        with open(tmp / "values.npz", "wb") as f:
            np.savez_compressed(f, **values)
        (tmp / "member.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return values, metrics


def merge(run_dir: Path, members: Sequence[tuple[str, int]]) -> tuple[int, int]:
    """Rebuild metrics.csv and first_pass.csv from the finished members' parts, in ``members`` order."""
    metrics: list[dict[str, str]] = []
    fp_rows: list[dict[str, str]] = []
    fp_cols: list[str] = []
    for sc, seed in members:
        part = member_dir(run_dir, sc, seed)
        if not (part / "member.json").is_file():
            continue
        _, rows = read_csv(part / "metrics.csv")
        metrics.extend(rows)
        cols, rows = read_csv(part / "first_pass.csv")
        for c in cols:
            if c not in fp_cols:
                fp_cols.append(c)
        fp_rows.extend(rows)
    atomic_write_csv(run_dir / "metrics.csv", metrics, METRICS_COLUMNS)
    atomic_write_csv(run_dir / "first_pass.csv", fp_rows, fp_cols or list(FIRST_PASS_LEAD))
    return len(metrics), len(fp_rows)


def write_meta(run_dir: Path, exp: Experiment, fingerprint: str, status: str, members: Sequence[tuple[str, int]],
                wall_s: float) -> dict[str, Any]:
    old = read_run_meta(run_dir)
    diverged, done = [], 0
    for sc, seed in members:
        mj = member_dir(run_dir, sc, seed) / "member.json"
        if not mj.is_file():
            continue
        m = json.loads(mj.read_text(encoding="utf-8"))
        done += 1
        if m.get("diverged_step") is not None:
            diverged.append({"scenario": sc, "seed": seed, "step": m["diverged_step"]})
    meta = {
        "format": _FORMAT, "name": exp.name, "fingerprint": fingerprint, "initlab": __version__,
        "created": old.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S"),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "status": status, "members_total": len(members), "members_done": done,
        "diverged": diverged, "wall_s": float(old.get("wall_s", 0.0)) + wall_s,
    }
    atomic_write_text(run_dir / "run.json", json.dumps(meta, indent=1) + "\n")
    return meta


def clear_results(run_dir: Path) -> None:
    """Remove what a previous run of the same experiment wrote (``resume=False``)."""
    for name in ("parts", "tb", "figures"):
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
    for name in ("metrics.csv", "first_pass.csv", "report.html", "run.json"):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()
