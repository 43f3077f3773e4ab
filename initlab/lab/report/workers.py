"""The report drawn by worker processes that start while the run trains.

The figures cost more than the page: matplotlib and pandas take about a second to import and each
figure a fraction of a second to draw, all in one thread. :class:`FigureWorkers` starts ``n``
processes (:data:`COMMAND`) before training; each imports the report's modules while the run trains
(at the lowest priority when the machine was otherwise idle: see :data:`IDLE_NICE`), then waits.
``initlab run`` starts them only where CPUs are idle beyond the training's threads
(:func:`initlab.lab.run.auto_figure_workers`). When the run is done,
:meth:`FigureWorkers.write_report` hands each worker its share of the figures (every n-th name of the
report's figure list; a worker draws those its data calls for, one by one), waits for them, and has
the first worker write ``report.html``.
Files are written atomically by the drawing functions themselves, as in :func:`write_report`.

Where no worker runs during training (``figure_workers=0``, and ``initlab run``'s default where the
training leaves no CPU idle), :func:`write_report_forked` draws the report once training is done, in the
run's process and one child forked from it, which inherits the imported modules and the loaded run
directory: on two cores the figures take about half the time.

Failures never hang the run nor lose it: a figure that raises is left out and the page says, under
*Figures*, which figure is missing and why (one line); an ``OSError`` (a full disk) is raised in the
run's process, as when the figures are drawn there. A worker that dies, or does not answer within
:data:`TIMEOUT_S` to draw one figure or write the page (:data:`START_TIMEOUT_S` to start; it is
then killed), leaves the figure it was drawing reported missing the same way, and the rest of its
share is drawn in this process; if no worker can be started, or none is left to write the page,
the page is written in this process. The figures' bytes are the same as
:func:`~initlab.lab.report.html.write_report`'s (the same code, in another process).
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from ..._errors import InitlabError
from .._io import clean_tmp
from .._threads import busy_now, idle_cpus
from .figures import grid_captions, grid_figures
from .html import prepare_page
from .html import write_report as _write_report
from .load import load_run
from .plots import figures, make_figures

__all__ = ["FigureWorkers", "write_report_forked", "TIMEOUT_S", "START_TIMEOUT_S", "COMMAND"]

#: seconds a worker may take to draw one figure or to write the page before it is killed
TIMEOUT_S = 300.0

#: seconds a worker may take to start (import the report's modules) before it is killed
START_TIMEOUT_S = 600.0

#: how a worker starts: it imports torch, initlab and the report's modules in a thread whose nice
#: value is ``INITLAB_FIGURE_WORKER_NICE`` (on Linux a nice value belongs to one thread), then
#: answers jobs in its main thread at the normal priority
_START = ("import os, sys, threading\n"
          "def imports():\n"
          "    try:\n"
          "        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),\n"
          "                       int(os.environ.get('INITLAB_FIGURE_WORKER_NICE', '0')))\n"
          "    except (AttributeError, OSError, ValueError):\n"
          "        pass\n"
          "    from initlab.lab.report import workers\n"
          "    workers.prepare()\n"
          "t = threading.Thread(target=imports)\n"
          "t.start()\n"
          "t.join()\n"
          "from initlab.lab.report import workers\n"
          "sys.exit(workers.main())\n")

#: the command that starts one worker (a list, as for ``subprocess.Popen``)
COMMAND = [sys.executable, "-c", _START]

#: the nice value of a worker's imports when the machine was idle as the run started: they then take
#: only the CPU time the run's training leaves (an OpenMP op waits for every one of its threads, so a
#: worker that takes a core from one of them for a time slice stalls the other as well). On a machine
#: that was busy they run at the normal priority, as other processes' work would starve them
IDLE_NICE = 19


def _names() -> list[str]:
    return [*figures(), *grid_captions()]


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class _Worker:
    """One worker process: its input pipe, its output lines (read by a thread into a queue, so that
    waiting for one has a deadline) and its error output (a temporary file, which never fills up)."""

    def __init__(self, command: Sequence[str], nice: int = 0) -> None:
        env = dict(os.environ)
        env["INITLAB_FIGURE_WORKER_NICE"] = str(nice)
        root = str(Path(__file__).resolve().parents[3])  # the folder holding the initlab package
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.err = tempfile.TemporaryFile()
        self.proc: Any = subprocess.Popen(list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=self.err, text=True, env=env)
        self._watch()

    def _watch(self) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.ready = False  # its modules imported
        self.reader = threading.Thread(target=self._read, name="initlab-figure-worker-reader", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self.lines.put(line)
        except (OSError, ValueError):
            pass
        self.lines.put(None)

    def send(self, job: dict[str, Any]) -> bool:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def answer(self, deadline: float) -> dict[str, Any] | str:
        """The worker's next answer (a dict), or why there is none (a string)."""
        try:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            self.kill()
            limit = TIMEOUT_S if self.ready else START_TIMEOUT_S
            return f"the figure worker did not {'finish' if self.ready else 'start'} within {limit:.0f} s"
        if line is None:
            self.lines.put(None)  # the end stays the end
            code = self.proc.wait()
            self.err.seek(0)
            err = self.err.read().decode("utf-8", "replace").strip().splitlines()
            return f"the figure worker stopped (exit code {code})" + (f": {err[-1]}" if err else "")
        return json.loads(line)

    def results(self, missing: dict[str, str]) -> tuple[set[str], str | None, str | None]:
        """Read the worker's lines until it is done (each within :data:`TIMEOUT_S`): ``(the names it
        finished, the one it was drawing, why it stopped)``, the last two None when it finished;
        figures that raised are added to ``missing``."""
        done: set[str] = set()
        current = None
        while True:
            answer = self.answer(time.monotonic() + (TIMEOUT_S if self.ready else START_TIMEOUT_S))
            if isinstance(answer, str):
                return done, current, answer
            if answer.get("done"):
                return done, None, None
            if answer.get("ready"):
                self.ready = True
                continue
            if "start" in answer:
                current = answer["start"]
                continue
            done.add(answer["name"])
            current = None
            if answer.get("oserror"):
                raise OSError(*answer["oserror"])
            if answer.get("error"):
                missing[answer["name"]] = answer["error"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        """Ask the worker to exit (end of its input), then wait; kill it if it does not."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
        self.reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.err.close()


class _Forked:
    """The parts of ``subprocess.Popen`` that :class:`_Worker` uses, for a child made by ``os.fork``."""

    def __init__(self, pid: int, stdout: IO[str]) -> None:
        self.pid, self.stdin, self.stdout = pid, None, stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"figure worker {self.pid}", timeout or 0.0)
            time.sleep(0.002)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class _ForkedWorker(_Worker):
    """A worker forked from this process when the run is done: it has every module this process imported
    (no start-up), draws ``names`` of ``run_dir`` and exits. Its answers are those of :func:`main`."""

    def __init__(self, run_dir: Path, names: Sequence[str], data: Any) -> None:
        self.err = tempfile.TemporaryFile()
        r, w = os.pipe()
        gc.freeze()  # the child's collections then skip what it inherits (fewer copy-on-write page copies)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child (coverage is not collected there)
                _child(r, w, self.err.fileno(), run_dir, names, data)
        except BaseException:
            for fd in (r, w):
                os.close(fd)
            self.err.close()
            raise
        finally:
            gc.unfreeze()
        os.close(w)
        self.proc = _Forked(pid, os.fdopen(r, "r"))
        self._watch()


def _child(r: int, w: int, err: int, run_dir: Path, names: Sequence[str], data: Any) -> None:  # pragma: no cover
    """The forked worker: draw ``names`` of ``data`` (the run directory as the parent loaded it), one JSON line
    per event into the pipe ``w``, then exit at once (no exit handlers of the run's process; a signal, e.g.
    Ctrl-C, ends it the same way)."""
    code = 1
    try:
        os.close(r)
        os.dup2(err, 2)
        with os.fdopen(w, "w") as out:
            prepare()
            out.write(json.dumps({"ready": True}) + "\n")
            out.flush()
            _draw(run_dir, names, out, data)
            out.write(json.dumps({"done": True}) + "\n")
        code = 0
    except BaseException:  # noqa: BLE001 - the parent reports the figure missing with the last line
        with contextlib.suppress(BaseException):
            os.write(2, traceback.format_exc().encode("utf-8", "replace"))
    finally:
        os._exit(code)


def write_report_forked(run_dir: str | os.PathLike[str]) -> Path:
    """The figures and the page of a finished run, drawn by this process and one child forked from it (every
    other figure of the report's list each; the child inherits the imported modules and the loaded run
    directory, so it starts at once), then the page written here: on two cores the figures take about half the time of :func:`write_report`
    in one process, with the same bytes. A figure that raises, or the child's failure, is handled as
    :class:`FigureWorkers` handles it (named missing on the page; the child's figures not drawn are drawn
    here). Not on Linux, or with fewer than 2 usable CPUs that other processes leave idle
    (:func:`~initlab.lab._threads.idle_cpus`; on 2 busy cores a fork saved no wall time and cost ~25% more CPU):
    :func:`write_report` in this process."""
    run_dir = Path(run_dir)
    if not (hasattr(os, "fork") and sys.platform.startswith("linux")) or idle_cpus() < 2:
        return _write_report(run_dir)  # macOS: a fork of a process with threads may crash in system libraries
    names = _names()
    theirs, mine = names[0::2], names[1::2]
    data = load_run(run_dir)
    prepare()  # imported once, before the fork
    try:
        child = _ForkedWorker(run_dir, theirs, data)
    except OSError:
        return _write_report(run_dir, data=data)
    finished = False
    try:
        missing = _draw(run_dir, mine, None, data)
        page = prepare_page(data)  # the tables and findings while the child draws
        done, current, why = child.results(missing)
        finished = why is None
        if not finished:
            if current is not None:
                missing[current] = why
                _drop(run_dir, current)
            left = [n for n in theirs if n not in done and n != current]
            missing.update(_draw(run_dir, left, None, data))
        return _write_report(run_dir, figures=False, missing=missing, data=data, page=page)
    finally:
        if not finished:  # stopped (an error here, Ctrl-C) or failed: no file of it is left half-written
            child.kill()
        child.close()
        if not finished:
            clean_tmp(run_dir / "figures")


class FigureWorkers:
    """``n`` report workers, started now (they import the report's modules while the run trains);
    :meth:`write_report` draws the figures and the page with them, :meth:`close` ends them."""

    def __init__(self, n: int = 2, command: Sequence[str] | None = None) -> None:
        self.workers: list[_Worker] = []
        busy = busy_now()
        nice = IDLE_NICE if busy is not None and busy < 0.5 else 0
        try:
            for _ in range(max(int(n), 1)):
                self.workers.append(_Worker(command or COMMAND, nice))
        except OSError:
            pass  # fewer workers (none: the report is written in this process)

    def write_report(self, run_dir: str | os.PathLike[str]) -> Path:
        """Draw the figures of ``run_dir`` in the workers, then write its report.html; return its path."""
        if not self.workers:
            return _write_report(run_dir)
        run_dir = Path(run_dir)
        names = _names()
        shares = [names[k::len(self.workers)] for k in range(len(self.workers))]
        sent = [w.send({"figures": share, "run_dir": str(run_dir)}) for w, share in zip(self.workers, shares)]
        missing: dict[str, str] = {}
        left: list[str] = []  # figures a failed worker did not get to: drawn here
        alive: list[_Worker] = []
        for w, share, ok in zip(self.workers, shares, sent):
            done, current, why = w.results(missing) if ok else (set(), None, "not reached")
            if why is None:
                alive.append(w)
                continue
            if current is not None:  # the figure it was drawing when it stopped
                missing[current] = why
                _drop(run_dir, current)
            left += [n for n in share if n not in done and n != current]
        if left:
            missing.update(_draw(run_dir, left, None))
        page = {"page": True, "run_dir": str(run_dir), "missing": missing}
        for w in alive[:1]:
            if w.send(page):
                answer = w.answer(time.monotonic() + TIMEOUT_S)
                if isinstance(answer, dict) and "page" in answer:
                    return Path(answer["page"])
                if isinstance(answer, dict) and "oserror" in answer:
                    raise OSError(*answer["oserror"])
                if isinstance(answer, dict) and "error" in answer:
                    raise _error(answer["error"])
        return _write_report(run_dir, figures=False, missing=missing)

    def close(self) -> None:
        for w in self.workers:
            w.close()
        self.workers = []

    def __enter__(self) -> FigureWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _os_error(e: OSError) -> list[Any]:
    return [e.errno, e.strerror or str(e), None if e.filename is None else str(e.filename)]


def _error(message: str) -> Exception:
    return InitlabError(f"writing report.html: {message}")


def _drop(run_dir: Path, name: str) -> None:
    """Remove a figure's file left by an earlier report: the page must not show an old figure as new."""
    path = run_dir / "figures" / name
    if path.is_file():
        path.unlink()


# ----------------------------------------------------------------------------- the worker side


def _draw(run_dir: Path, names: Sequence[str], out: IO[str] | None, data: Any = None) -> dict[str, str]:
    """Draw ``names`` (those the data calls for) one by one; a figure that raises is left out (its old
    file removed) and returned as name -> why. With ``out``, one JSON line per figure as it is done.
    ``data``: the run directory already loaded."""
    data = load_run(run_dir) if data is None else data
    if out is not None:  # a worker: the page of the same run, written next, reads the same files
        _LOADED[:] = [(run_dir, data)]
    fig_dir = data.run_dir / "figures"
    missing: dict[str, str] = {}
    for name in names:
        error = None
        if out is not None:
            out.write(json.dumps({"start": name}) + "\n")
            out.flush()
        try:
            make_figures(data.metrics, data.first_pass, data.values, data.scenarios, fig_dir, info=data.info,
                         models=data.models, only={name})
            grid_figures(data, fig_dir, only={name})
        except OSError as e:  # a full disk, a folder not writable: the run's error, as in one process
            if out is None:
                raise
            out.write(json.dumps({"name": name, "oserror": _os_error(e)}) + "\n")
            out.flush()
            continue
        except Exception as e:  # noqa: BLE001 - one figure's failure is reported on the page
            missing[name] = error = _one_line(e)
            _drop(run_dir, name)
        if out is not None:
            out.write(json.dumps({"name": name, "error": error}) + "\n")
            out.flush()
    return missing


#: (run directory, its RunData) as this worker last loaded it to draw figures
_LOADED: list[tuple[Path, Any]] = []


def _page(run_dir: Path, missing: dict[str, str]) -> dict[str, Any]:
    data = _LOADED[0][1] if _LOADED and _LOADED[0][0] == run_dir else None
    _LOADED.clear()
    try:
        return {"page": str(_write_report(run_dir, figures=False, missing=missing, data=data))}
    except OSError as e:
        return {"oserror": _os_error(e)}
    except Exception as e:  # noqa: BLE001 - sent back and raised in the run's process
        return {"error": _one_line(e)}


def prepare() -> None:
    """Import what drawing needs (done while the run trains)."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401
    import pandas  # noqa: F401


def main() -> int:
    """A worker: import the report's modules, then answer one JSON job per input line until it ends."""
    prepare()
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        job = json.loads(line)
        run_dir = Path(job["run_dir"])
        if job.get("page"):
            answer = _page(run_dir, job.get("missing", {}))
        else:
            _draw(run_dir, job["figures"], sys.stdout)
            answer = {"done": True}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
