"""The run directory: its layout, the lock, and committing and merging members' results.

Layout (``run_dir/``)::

    config.toml        the resolved experiment (experiment_to_toml); loading it gives the experiment back
    run.json           name, config fingerprint, status ("running", "interrupted", "complete"),
                       members done, diverged members, training seconds, the groups members train in
    metrics.csv        scenario, seed, step, split, metric, value (see initlab.lab.metrics)
    first_pass.csv     the probe table (initlab.probe) per scenario x seed x weight layer:
                       scenario, seed, scheme, then the probe's columns
    init.csv           the init reports' per-layer numbers (e.g. LSUV's iterations per layer), when a scheme
                       reports any: scenario, seed, source, index, layer, quantity, value
    layer_histograms.csv   fixed-bin histograms of activations and back-propagated gradients per hidden layer,
                       at step 0 and a few log steps (train.layer_stats): scenario, seed, step, quantity, layer,
                       lo, hi, count (initlab.lab.training.records)
    tb/<scenario>/seed<k>/   TensorBoard events of one member (initlab.lab.report.tensorboard)
    figures/*.png, report.html   (initlab.lab.report)
    parts/<scenario>/seed<k>/   a finished member's own results (metrics.csv, first_pass.csv,
                       values.npz with the first-pass arrays, histograms.json with the weight
                       histograms of its TensorBoard log, init.csv and layer_histograms.csv
                       when it has such rows, member.json)
    checkpoints/group-<hash>.pt   the training state of a group that has not finished (removed
                       when the run completes)
    run.lock           held (an OS file lock) while a process writes here

Completion is recorded per member: :func:`commit_member` writes ``parts/<scenario>/seed<k>/``
under a temporary name and renames it into place, so a member is either completely recorded or
not at all; :func:`merge` rebuilds metrics.csv, first_pass.csv (and init.csv,
layer_histograms.csv when any member has rows) from the parts, atomically,
in experiment order. :func:`check_out_dir` refuses a directory that holds another experiment
(or anything else) and :func:`check_out_path` one that cannot be written; :func:`lock` lets one
process write at a time. Every file is written atomically (:mod:`initlab.lab._io`), with the
mode the umask gives.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import shutil
import socket
import time
import uuid
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from .._errors import InitlabError
from .._probe import COLUMNS as PROBE_COLUMNS
from ._io import (TMP_PREFIX, _name_the_target, atomic_dir, atomic_write_bytes, atomic_write_text, csv_text, file_mode,
                  fsync_dir, new_tmp_dir, read_csv, replace_dir, slug)
from .config import config_fingerprint, experiment_to_dict, load_experiment
from .metrics import METRICS_COLUMNS
from .specs import Experiment, Scenario
from .training import GroupResult
from .training.records import HIST_COLUMNS, INIT_COLUMNS

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

__all__ = ["member_dir", "member_log_dir", "tb_dir", "read_run_meta", "config_differences", "check_out_dir", "lock",
           "check_out_path", "done_members", "first_pass_columns", "commit_member", "merge", "write_meta", "clear_results",
           "read_part_csv", "read_part_values", "read_part_histograms", "checkpoint_path", "save_checkpoint", "load_checkpoint",
           "drop_checkpoint", "DurableBatch", "staged_dir", "METRICS_COLUMNS", "FIRST_PASS_LEAD"]

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


def _read_json(p: Path) -> dict[str, Any]:
    """A JSON object from a file ({} when absent, unreadable or not an object)."""
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def read_run_meta(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of a run directory as a dict ({} when absent or unreadable)."""
    return _read_json(Path(run_dir) / "run.json")


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


def _not_writable(path: Path) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "is on a read-only file system"
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        pass
    return "is not writable (permission denied)"


def check_out_path(run_dir: Path) -> None:
    """Fail early, naming the path and what to do, when ``run_dir`` cannot become a run directory:
    a file where a folder should be, a folder that cannot be written, a read-only file system."""
    text = str(run_dir)
    if not text or "\x00" in text:
        raise InitlabError(f"output path {text!r}: expected a folder name (no NUL characters); choose another --out")
    try:
        if run_dir.exists():
            if not run_dir.is_dir():
                raise InitlabError(f"output path {text!r} exists and is not a directory; choose another --out directory")
            if not os.access(run_dir, os.W_OK | os.X_OK):
                raise InitlabError(f"output directory {text!r} {_not_writable(run_dir)}; fix its permissions or "
                                   "choose another --out directory")
            return
        above = run_dir.absolute().parent
        while not above.exists() and above != above.parent:
            above = above.parent
        if not above.is_dir():
            raise InitlabError(f"output path {text!r}: {str(above)!r} is a file, not a folder; remove it or choose "
                               "another --out directory")
        if not os.access(above, os.W_OK | os.X_OK):
            raise InitlabError(f"output path {text!r}: cannot create it, {str(above)!r} {_not_writable(above)}; "
                               "choose another --out directory")
    except OSError as e:
        raise InitlabError(f"output path {text!r}: {e.strerror or e}; choose another --out directory") from None


def check_out_dir(run_dir: Path, exp: Experiment, fingerprint: str) -> bool:
    """Whether ``run_dir`` already is a run directory of ``exp``; raise if it holds anything else."""
    if not run_dir.exists():
        return False
    if not run_dir.is_dir():
        raise InitlabError(f"output path {str(run_dir)!r} exists and is not a directory; choose another --out directory")
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


def _lock_fd(fd: int) -> bool:
    """Take the OS lock on an open file without waiting: True when taken, False when another process holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except (BlockingIOError, PermissionError):
        return False
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EDEADLK):
            return False
        raise
    return True


def _lock_holder(fd: int) -> tuple[int, str | None]:
    """(pid, host) the holder wrote into the lock file; pid -1 when unreadable."""
    try:
        other = json.loads(os.pread(fd, 4096, 0).decode("utf-8")) if hasattr(os, "pread") else {}
    except (OSError, ValueError):
        other = {}
    if not isinstance(other, dict):
        other = {}
    pid = int(other["pid"]) if str(other.get("pid", "")).isdigit() else -1
    return pid, other.get("host")


def _busy(run_dir: Path, fd: int) -> InitlabError:
    pid, host = _lock_holder(fd)
    who = f"another initlab process (pid {pid}{'' if host in (None, socket.gethostname()) else f' on {host}'})" \
        if pid > 0 else "another initlab process"
    return InitlabError(f"{who} is writing to {str(run_dir)!r}; wait for it to finish (or stop it), then re-run "
                        "the same command to resume")


def _open_locked(path: Path, run_dir: Path) -> int:
    """A descriptor of ``path`` holding its OS lock, or InitlabError when another process holds it."""
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if not _lock_fd(fd):
                raise _busy(run_dir, fd)
            try:  # the holder before us may have removed the file as it let go: lock the file the path names
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(os.fstat(fd), current):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise InitlabError(f"could not lock {str(run_dir)!r}: {path} keeps being replaced")  # pragma: no cover


@contextlib.contextmanager
def lock(run_dir: Path) -> Iterator[None]:
    """One writer per run directory: ``run_dir/run.lock``, held with the operating system's file lock
    (``flock`` on POSIX, ``msvcrt.locking`` on Windows) for as long as the block runs.

    The kernel holds the lock, not the file: it is released when the process ends in any way
    (``kill -9`` included), so a lock file left behind is never "stale", and two processes can never
    both hold it (no check-then-take race). Taking it locks the open file and then checks that the
    path still names that file (the previous holder removes the file as it lets go). The file holds
    the holder's pid and host, for the error message of the process that finds it locked.
    """
    path = run_dir / "run.lock"
    fd = _open_locked(path, run_dir)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode("utf-8"))
        yield
    finally:
        with contextlib.suppress(OSError):  # still holding the lock: nobody else can be using the file
            os.unlink(path)
        os.close(fd)


# ----------------------------------------------------------------------------- durable writes, together


def _in_parallel(fn: Any, items: Sequence[Any]) -> None:
    """``fn(item)`` for every item, from up to 16 threads (``fsync`` releases the GIL); the first error is raised."""
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=min(16, len(items)), thread_name_prefix="initlab-fsync") as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()


def _fsync_file(item: tuple[Path, Path]) -> None:
    path, target = item
    try:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    except BaseException as e:
        _name_the_target(e, target)
        raise


class DurableBatch:
    """Directories and files written under temporary names, then made durable and put in place together.

    :func:`~initlab.lab._io.atomic_dir` and :func:`~initlab.lab._io.atomic_write_bytes` flush each file
    to disk (``fsync``) one after the other, then the directory: on a journalling file system each
    flush waits for a journal commit (about 4 ms here), so a unit of 15 members (6 files each, and a
    TensorBoard log) spent ~0.4 s waiting. A batch writes everything first (:meth:`dir`,
    :meth:`file`), then on :meth:`commit` flushes every file at once from a few threads (the file
    system joins them into one or two journal commits), renames each directory or file into place in
    the order they were added, and flushes the parent directories at once. The guarantees are those of
    ``atomic_dir``: a path is either left as it was or replaced by its complete new content (a crash
    between two renames leaves the earlier ones done, the later ones not). Used as ``with DurableBatch()
    as batch:``, the batch commits when the block ends, also when it raises: what was complete by then
    (each :meth:`dir` block that ended, each :meth:`file`) is put in place, as it would have been when
    written one by one, and the rest removed (:func:`~initlab.lab._io.clean_tmp` removes what a
    ``kill -9`` leaves).
    """

    def __init__(self) -> None:
        self._items: list[tuple[Path, Path, bool]] = []  # (temporary, target, replace)

    @contextlib.contextmanager
    def dir(self, target: str | os.PathLike[str], *, replace: bool = False) -> Iterator[Path]:
        """``with batch.dir(target) as tmp:`` a new empty temporary directory, to fill in the block, that becomes
        ``target`` when the batch commits (``replace``: an existing ``target`` is swapped for it, else an
        existing ``target`` is an error then); a block that raises leaves nothing behind."""
        target = Path(target)
        tmp = new_tmp_dir(target)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._items.append((tmp, target, replace))

    def file(self, target: str | os.PathLike[str], data: bytes) -> None:
        """``data`` becomes the file ``target`` on :meth:`commit` (replacing it), with the mode the umask gives."""
        target = Path(target)
        tmp = target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}.part"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._items.append((tmp, target, True))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except BaseException as e:
            _name_the_target(e, target)
            raise

    def commit(self) -> None:
        """Flush every file, rename everything into place (in order), flush the parent directories."""
        files = []
        for tmp, target, _ in self._items:
            if tmp.is_dir():
                files += [(f, target) for f in sorted(tmp.rglob("*")) if f.is_file()]
            else:
                files.append((tmp, target))
        _in_parallel(_fsync_file, files)
        parents: dict[Path, None] = {}
        while self._items:
            tmp, target, replace = self._items[0]
            try:
                _put_in_place(tmp, target, replace)
            except BaseException as e:
                _name_the_target(e, target)
                raise
            self._items.pop(0)
            parents[target.parent] = None
        _in_parallel(fsync_dir, list(parents))

    def discard(self) -> None:
        """Remove the temporaries not renamed yet."""
        for tmp, _, _ in self._items:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        self._items = []

    def __enter__(self) -> DurableBatch:
        return self

    def __exit__(self, kind: Any, *rest: object) -> None:
        """Commit; also when the block raised: what was complete by then is kept (as it would have been,
        written one by one), and the error is raised."""
        try:
            if kind is None:
                self.commit()
            else:
                with contextlib.suppress(Exception):
                    self.commit()
        finally:
            self.discard()


def staged_dir(target: str | os.PathLike[str], *, replace: bool = False,
               batch: DurableBatch | None = None) -> contextlib.AbstractContextManager[Path]:
    """``with staged_dir(target) as tmp:`` a temporary directory that becomes ``target``: when ``batch``
    commits (:meth:`DurableBatch.dir`), or else when the block ends (:func:`~initlab.lab._io.atomic_dir`)."""
    return batch.dir(target, replace=replace) if batch is not None else atomic_dir(target, replace=replace)


def _put_in_place(tmp: Path, target: Path, replace: bool) -> None:
    """Rename ``tmp`` to ``target``: a directory as :func:`~initlab.lab._io.atomic_dir` does
    (:func:`~initlab.lab._io.replace_dir`), a file by one ``os.replace``."""
    if tmp.is_dir():
        replace_dir(tmp, target, replace)
    else:
        os.replace(tmp, target)


# ----------------------------------------------------------------------------- members


def done_members(run_dir: Path, fingerprint: str) -> set[tuple[str, int]]:
    done = set()
    parts = run_dir / "parts"
    if not parts.is_dir():
        return done
    for mj in parts.glob("*/seed*/member.json"):
        meta = _read_json(mj)  # an unreadable record is a member to train again (with the same result)
        if meta.get("fingerprint") != fingerprint or not str(meta.get("seed", "")).isdigit():
            continue
        if mj.parent != member_dir(run_dir, str(meta.get("scenario")), int(meta["seed"])):
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
                   unit_index: int, histograms: Sequence[tuple[int, dict[str, Any]]] = (),
                   batch: DurableBatch | None = None) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Write one member's results as ``parts/<scenario>/seed<k>/`` (atomically, all files at once).

    ``unit_index``: the member's group in the run's plan (as run.json lists the groups);
    ``histograms``: (step, {tag: raw histogram}) pairs of its TensorBoard log; ``batch``: the folder is put
    in place when the batch commits (with the other members of the unit), else now.
    Returns the member's first-pass arrays and metrics rows (for its TensorBoard log)."""
    key = (scenario.name, int(seed))
    metrics = [{c: r[c] for c in METRICS_COLUMNS} for r in result.metrics
               if (r["scenario"], int(r["seed"])) == key]
    first_pass = [{**r, "scenario": scenario.name, "seed": int(seed), "scheme": str(scenario.scheme)}
                  for r in result.first_pass if (r.get("scenario"), int(r.get("seed", -1))) == key]
    values = {k: np.asarray(v) for k, v in result.first_pass_values.get(key, {}).items()}
    diverged = [d for d in result.diverged if (d["scenario"], int(d["seed"])) == key]
    records = {name: ([r for r in rows if (r["scenario"], int(r["seed"])) == key], cols)
               for name, rows, cols in (("init.csv", getattr(result, "init", None) or [], INIT_COLUMNS),
                                        ("layer_histograms.csv", getattr(result, "layer_histograms", None) or [],
                                         HIST_COLUMNS))}
    meta = {
        "scenario": scenario.name, "seed": int(seed), "scheme": str(scenario.scheme),
        "activation": str(scenario.activation), "fingerprint": fingerprint,
        "diverged_step": int(diverged[0]["step"]) if diverged else None,
        "unit": unit_index, "unit_wall_s": float(result.wall_s),
        "engine": str(getattr(result, "engine", "")), "device": str(getattr(result, "device", "")),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    target = member_dir(run_dir, scenario.name, seed)
    with staged_dir(target, replace=True, batch=batch) as tmp:
        (tmp / "metrics.csv").write_text(csv_text(metrics, METRICS_COLUMNS), encoding="utf-8")
        (tmp / "first_pass.csv").write_text(csv_text(first_pass, first_pass_columns(first_pass)), encoding="utf-8")
        _write_npz(tmp / "values.npz", values)
        (tmp / "histograms.json").write_text(json.dumps([[int(st), h] for st, h in histograms]), encoding="utf-8")
        for name, (rows, cols) in records.items():
            if rows:
                (tmp / name).write_text(csv_text(rows, cols), encoding="utf-8")
        (tmp / "member.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return values, metrics


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``arrays`` as an ``.npz`` archive (one ``<name>.npy`` per array, as ``np.savez`` writes it), stored
    without compression: first-pass arrays are noise in their low bits (deflate saves ~7% on them, ~10x
    only on the sparse input batch), and deflating a classic run's 15 members cost ~0.15 s when written
    and ~0.07 s when the report reads them back, for 2.6 MB instead of 7.3 MB on disk."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, a in arrays.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)


def _corrupt(path: Path, part: Path, e: BaseException) -> InitlabError:
    why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    why = why if len(why) <= 100 else why[:97] + "..."
    return InitlabError(f"{path}: cannot be read ({why}); delete the folder {part} and re-run the same "
                        "command to train that member again")


def read_part_csv(part: Path, name: str) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a member's CSV file; InitlabError naming the file and what to do when it is corrupt."""
    try:
        return read_csv(part / name)
    except (OSError, ValueError, csv.Error) as e:
        raise _corrupt(part / name, part, e) from None


def read_part_values(part: Path) -> dict[str, np.ndarray]:
    """A member's first-pass arrays (``values.npz``); InitlabError naming the file and what to do when it is corrupt."""
    path = part / "values.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise _corrupt(path, part, e) from None


def read_part_histograms(part: Path) -> list[tuple[int, dict[str, Any]]]:
    """A member's weight histograms (``histograms.json``; none for a part written without it)."""
    path = part / "histograms.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise _corrupt(path, part, e) from None
    return [(int(st), h) for st, h in raw]


def _write_if_changed(path: Path, text: str, batch: DurableBatch | None = None) -> None:
    """Write ``text`` atomically (now, or when ``batch`` commits) unless the file already holds exactly that
    (a re-run leaves it untouched)."""
    data = text.encode("utf-8")
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    if batch is not None:
        batch.file(path, data)
    else:
        atomic_write_bytes(path, data)


_RECORDS = (("init.csv", INIT_COLUMNS), ("layer_histograms.csv", HIST_COLUMNS))


def _part_text(part: Path, name: str) -> str:
    path = part / name
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, ValueError) as e:
        raise _corrupt(path, part, e) from None


def _plain_rows(text: str, n_columns: int) -> str | None:
    """The rows of a part's CSV text (after its header) when every line is ``n_columns`` plain fields (no
    quotes, no carriage returns): then they are the lines :func:`csv_text` would write again from the
    parsed rows, and the merge can copy them. None when the text needs parsing."""
    if '"' in text or "\r" in text or "\x00" in text or not text.endswith("\n"):
        return None
    body = text.split("\n", 1)[1]
    if any(line.count(",") != n_columns - 1 for line in body.splitlines()):
        return None
    return body


def _merged(parts: Sequence[Path], name: str, columns: Sequence[str] | None, default: Sequence[str]) -> str:
    """The CSV text of every part's file ``name``, rows in order, under one header: ``columns``, or (None) the
    union of the parts' columns in order of appearance (``default`` when there are none). The rows are
    copied as they are where that gives the bytes that parsing and writing them again would
    (:func:`_plain_rows`), else parsed and written again."""
    texts = [_part_text(part, name) for part in parts]
    heads = {t.split("\n", 1)[0] for t in texts}
    head = csv_text([], columns if columns is not None else default).rstrip("\n")
    if columns is None and len(heads) == 1:
        head = next(iter(heads))
    if heads <= {head} and '"' not in head:
        n = head.count(",") + 1
        bodies = [_plain_rows(t, n) for t in texts]
        if all(b is not None for b in bodies):
            return head + "\n" + "".join(bodies)  # type: ignore[arg-type]
    rows: list[dict[str, str]] = []
    cols = list(columns) if columns is not None else []
    for part in parts:
        found, part_rows = read_part_csv(part, name)
        if columns is None:
            cols += [c for c in found if c not in cols]
        rows.extend(part_rows)
    return csv_text(rows, cols or list(default))


def merge(run_dir: Path, members: Sequence[tuple[str, int]]) -> None:
    """Rebuild metrics.csv and first_pass.csv from the finished members' parts, in ``members`` order
    (each file rewritten only when its content changes; those that change are written together, see
    :class:`DurableBatch`), and init.csv and layer_histograms.csv when some member has such rows."""
    parts = [member_dir(run_dir, sc, seed) for sc, seed in members]
    parts = [p for p in parts if (p / "member.json").is_file()]
    texts = {"metrics.csv": _merged(parts, "metrics.csv", METRICS_COLUMNS, METRICS_COLUMNS),
             "first_pass.csv": _merged(parts, "first_pass.csv", None, FIRST_PASS_LEAD)}
    for name, cols in _RECORDS:
        have = [p for p in parts if (p / name).is_file()]
        if have:
            texts[name] = _merged(have, name, cols, cols)
    with DurableBatch() as batch:
        for name, text in texts.items():
            _write_if_changed(run_dir / name, text, batch)


def checkpoint_path(run_dir: Path, keys: Sequence[tuple[str, int]]) -> Path:
    """``run_dir/checkpoints/<hash of the group's members>.pt``: where a group's training state is kept."""
    text = json.dumps([[str(k), int(s)] for k, s in keys])
    return run_dir / "checkpoints" / f"group-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}.pt"


def save_checkpoint(run_dir: Path, fingerprint: str, keys: Sequence[tuple[str, int]], state: dict[str, Any]) -> Path:
    """Write a group's training state (:meth:`initlab.lab.training.TrainLoop.state`) atomically."""
    buf = io.BytesIO()
    torch.save({"format": _FORMAT, "fingerprint": fingerprint, "members": [[str(k), int(s)] for k, s in keys],
                "state": state}, buf)
    return atomic_write_bytes(checkpoint_path(run_dir, keys), buf.getvalue())


def load_checkpoint(run_dir: Path, fingerprint: str, keys: Sequence[tuple[str, int]]) -> dict[str, Any] | None:
    """The group's saved training state, or None when there is none that fits (absent, unreadable, or of
    another experiment or group): the group then trains from step 0, to the same result."""
    path = checkpoint_path(run_dir, keys)
    try:
        blob = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - any unreadable checkpoint only costs the training since step 0
        return None
    if not isinstance(blob, dict) or blob.get("fingerprint") != fingerprint or blob.get("format") != _FORMAT \
            or blob.get("members") != [[str(k), int(s)] for k, s in keys] or not isinstance(blob.get("state"), dict):
        return None
    return blob["state"]


def drop_checkpoint(run_dir: Path, keys: Sequence[tuple[str, int]] | None = None) -> None:
    """Remove a group's checkpoint (every checkpoint when ``keys`` is None)."""
    if keys is None:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        checkpoint_path(run_dir, keys).unlink()


def write_meta(run_dir: Path, exp: Experiment, fingerprint: str, status: str, members: Sequence[tuple[str, int]],
                wall_s: float, groups: Sequence[Sequence[tuple[str, int]]] | None = None,
                failed: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Write ``run.json``: the run's status, members done and diverged, training time, the groups
    its members train in (``groups``, kept from the previous run.json when None) and the units that
    failed in this call (``failed``: members, attempts, error; only when there are any)."""
    old = read_run_meta(run_dir)
    diverged, done = [], 0
    for sc, seed in members:
        mj = member_dir(run_dir, sc, seed) / "member.json"
        if not mj.is_file():
            continue
        m = _read_json(mj)
        if not m:
            continue
        done += 1
        if m.get("diverged_step") is not None:
            diverged.append({"scenario": sc, "seed": seed, "step": m["diverged_step"]})
    meta = {
        "format": _FORMAT, "name": exp.name, "fingerprint": fingerprint, "initlab": __version__,
        "created": old.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S"),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "status": status, "members_total": len(members), "members_done": done,
        "diverged": diverged, "wall_s": float(old.get("wall_s", 0.0)) + wall_s,
        "groups": [[list(k) for k in g] for g in groups] if groups is not None else old.get("groups"),
    }
    if meta["groups"] is None:
        del meta["groups"]
    if failed:
        meta["failed"] = [dict(f) for f in failed]
    atomic_write_text(run_dir / "run.json", json.dumps(meta, indent=1) + "\n")
    return meta


def clear_results(run_dir: Path) -> None:
    """Remove what a previous run of the same experiment wrote (``resume=False``)."""
    for name in ("parts", "tb", "figures", "checkpoints"):
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
    for name in ("metrics.csv", "first_pass.csv", "init.csv", "layer_histograms.csv", "report.html", "run.json"):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()
