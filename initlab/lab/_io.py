"""Crash-safe file output for run directories.

Every file of a run directory is written atomically: the bytes go to a temporary file in the
same directory, are flushed and ``fsync``-ed, and the temporary file is renamed over the target
with ``os.replace`` (atomic on POSIX and on Windows for files on one volume), after which the
directory itself is ``fsync``-ed so that the rename survives a power cut. A reader, or a run that
is interrupted at any instant, therefore sees either the old file or the new one, never a
truncated mix.

Directories that must appear all at once (a finished unit of work, a TensorBoard log) are built
under a temporary name and renamed into place (:func:`atomic_dir`). Leftover temporaries of an
interrupted run carry the :data:`TMP_PREFIX` prefix and are removed by :func:`clean_tmp`.

Only the standard library is used here.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "TMP_PREFIX",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_csv",
    "read_csv",
    "atomic_dir",
    "replace_dir",
    "new_tmp_dir",
    "clean_tmp",
    "fsync_dir",
    "csv_text",
    "slug",
    "current_umask",
    "file_mode",
    "describe_os_error",
]

#: name prefix of every temporary file or directory created here
TMP_PREFIX = ".initlab-tmp-"


#: what to do about an OS error, by errno
_OS_HINTS: dict[int, str] = {
    errno.ENOSPC: "the disk is full: free some space, then re-run the same command (the finished work is kept)",
    errno.EDQUOT: "the disk quota is used up: free some space, then re-run the same command (the finished work is kept)",
    errno.EACCES: "permission denied: fix the permissions, or choose another --out directory",
    errno.EPERM: "operation not permitted: fix the permissions, or choose another --out directory",
    errno.EROFS: "read-only file system: choose another --out directory",
    errno.ENOTDIR: "a file is where a folder should be: remove it, or choose another --out directory",
    errno.EISDIR: "a folder is where a file should be: remove it, or choose another --out directory",
    errno.EEXIST: "something is in the way: remove it, or choose another --out directory",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter --out directory",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n), then re-run the same command",
    errno.EIO: "input/output error: check the disk or network file system, then re-run the same command",
}


def describe_os_error(e: OSError) -> str:
    """One line for an OS error: the cause, the path and what to do (``"No space left on device:
    'runs/x/metrics.csv'; the disk is full: free some space, ..."``)."""
    cause = e.strerror or str(e) or type(e).__name__
    path = f": {str(e.filename)!r}" if e.filename is not None else ""
    if e.filename2 is not None:
        path += f" -> {str(e.filename2)!r}"
    hint = _OS_HINTS.get(e.errno or -1, "fix the cause, then re-run the same command (the finished work is kept)")
    return f"{cause}{path}; {hint}"


def _name_the_target(e: BaseException, path: Path) -> None:
    """Give an OS error raised while writing ``path`` (e.g. ENOSPC from ``write``, which names no file) its target."""
    if isinstance(e, OSError) and (e.filename is None or TMP_PREFIX in str(e.filename)):
        e.filename = str(path)
        e.filename2 = None


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """``fsync`` a directory so that renames inside it are durable (a no-op where unsupported)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, so that no other thread sees it change)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from ``open()``: 0o666 less the umask (``mkstemp`` alone gives 0o600)."""
    return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory + ``os.replace``).

    Parent directories are created. On any error the temporary file is removed and ``path`` is
    left exactly as it was. The file's mode follows the umask, as a plain ``open()`` would give it.
    Returns ``path`` as a ``Path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".part", dir=path.parent)
    except OSError as e:
        _name_the_target(e, path)
        raise
    try:
        with contextlib.suppress(OSError):  # e.g. a file system without POSIX modes
            if hasattr(os, "fchmod"):
                os.fchmod(fd, file_mode())
            else:  # pragma: no cover - Windows before Python 3.13
                os.chmod(tmp, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _name_the_target(e, path)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` line ends) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _cell(value: Any) -> Any:
    """One CSV cell: floats in ``repr`` form (round-trips exactly), NaN as ``nan``, None as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(float(value))  # float(): np.float64 is a float
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _cell(value.item())
        except (TypeError, ValueError):
            pass
    return value


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Rows (mappings) as CSV text with a header of ``columns``; missing keys are empty cells."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def atomic_write_csv(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]],
                     columns: Sequence[str]) -> Path:
    """Write ``rows`` as a CSV file with header ``columns``, atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_text(path, csv_text(rows, columns))


def read_csv(path: str | os.PathLike[str]) -> tuple[list[str], list[dict[str, str]]]:
    """Read a CSV written by :func:`atomic_write_csv`: ``(columns, rows as dicts of strings)``."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def new_tmp_dir(target: Path) -> Path:
    """A new empty temporary directory beside ``target`` (its parents made), to be renamed to ``target``;
    an ``OSError`` names ``target``."""
    tmp = target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        _name_the_target(e, target)
        raise
    return tmp


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, replace: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it to ``path`` when the block succeeds.

    ``with atomic_dir(p) as tmp: (tmp / "a.csv").write_text(...)``: files written into ``tmp``
    appear at ``p`` together, or not at all when the block raises (the temporary is removed).
    ``path`` must not exist unless ``replace=True``, in which case the old directory is first
    renamed aside and then deleted (a crash in between leaves a temporary that
    :func:`clean_tmp` removes; ``path`` itself is then missing, i.e. "not done", never half done).
    """
    path = Path(path)
    tmp = new_tmp_dir(path)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        replace_dir(tmp, path, replace)
        fsync_dir(path.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _name_the_target(e, path)
        raise


def replace_dir(tmp: Path, path: Path, replace: bool) -> None:
    """Rename the directory ``tmp`` to ``path``; an existing ``path`` (only with ``replace``, else
    ``FileExistsError``) is renamed aside first, put back if the rename fails, then removed."""
    if not path.exists():
        os.replace(tmp, path)
        return
    if not replace:
        raise FileExistsError(f"{path} already exists")
    old = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if not path.exists():  # put the old directory back: nothing is lost by an interruption here
            with contextlib.suppress(OSError):
                os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def clean_tmp(root: str | os.PathLike[str]) -> int:
    """Remove the temporaries an interrupted write left anywhere under ``root``; return how many."""
    root = Path(root)
    if not root.is_dir():
        return 0
    found = sorted((p for p in root.rglob(f"{TMP_PREFIX}*")), key=lambda p: len(p.parts))
    n = 0
    for p in found:
        if not p.exists() and not p.is_symlink():
            continue  # inside a temporary directory removed above
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        n += 1
    return n


def slug(name: str) -> str:
    """A file-system-safe, injective name for ``name`` (a scenario name) to use as a directory.

    Names made of letters, digits, ``.``, ``_`` and ``-`` (not starting with ``.``) are kept as
    they are; any other name gets its unsafe characters replaced by ``_`` and a short hash of
    the original appended, so two different names never share a directory.
    """
    name = str(name)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".") or "_"
    if safe == name and len(safe) <= 100:
        return safe
    return f"{safe[:80]}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:8]}"
