"""The report drawn by worker processes (``run_experiment(..., figure_workers=N)``, ``initlab run``'s default):
the same figures, byte for byte, as drawn in the run's process; and a figure whose drawing raises, a
worker that dies and a worker that hangs each end with the run complete, every other figure drawn and
the page naming the missing figure and why, in bounded time."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

import initlab.lab.report.workers as workers
from initlab.lab import _threads
from initlab import InitlabError
from initlab.lab.run import run_experiment

from rundir_compare import small

FAULTS = Path(__file__).with_name("figure_worker_faults.py")
FIGURES = {"layer1_histograms.png", "variance_per_layer.png", "accuracy.png", "loss.png"}
#: the workers' time limit per figure in these tests: each figure of this small run takes about a second to draw
#: (at most 1.3 s on two busy cores), so a figure that is not done by then hangs
TIMEOUT_S = 8.0


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, fixed_threads):
    out = tmp_path_factory.mktemp("inproc") / "run"
    run_experiment(small(), out, progress=False, figure_workers=0)
    return out


def _figures(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (run / "figures").glob("*.png")}


def test_workers_draw_the_same_figures(in_process, tmp_path):
    run_experiment(small(), tmp_path / "run", progress=False, figure_workers=2)
    want = _figures(in_process)
    assert set(want) >= FIGURES
    assert _figures(tmp_path / "run") == want
    assert "Figure missing" not in (tmp_path / "run" / "report.html").read_text()


#: the faults injected at once, one per worker of three (each the first figure of its worker's share of the
#: report's figure list): figure -> (kind, what the page must say)
FAULTS_AT = {"layer1_histograms.png": ("raise", "RuntimeError: injected fault"),
             "variance_per_layer.png": ("exit", "the figure worker stopped (exit code 3)"),
             "accuracy.png": ("hang", f"the figure worker did not finish within {TIMEOUT_S:.0f} s")}


def test_failing_figures_are_named_missing(in_process, tmp_path, monkeypatch):
    """The report of a finished run, rebuilt by three workers: one whose figure raises (it goes on), one that
    dies and one that hangs, each at the first figure of its share: the page names each of the three figures
    missing and why, every other figure is drawn (the same bytes), and the failed figures' files from the
    earlier report are removed, not shown as new."""
    run = tmp_path / "run"
    shutil.copytree(in_process, run)
    assert all((run / "figures" / name).is_file() for name in FAULTS_AT)
    shares = [workers._names()[k::3] for k in range(3)]
    assert [share[0] for share in shares] == list(FAULTS_AT)  # one fault per worker, at its first figure
    monkeypatch.setattr(workers, "COMMAND", [sys.executable, str(FAULTS), *(f"{kind}={name}" for name, (kind, _)
                                                                            in FAULTS_AT.items())])
    monkeypatch.setattr(workers, "TIMEOUT_S", TIMEOUT_S)
    t0 = time.monotonic()
    with workers.FigureWorkers(3) as pool:
        page = pool.write_report(run).read_text()
    assert time.monotonic() - t0 < 300  # no hang: the stuck worker was killed
    got, want = _figures(run), _figures(in_process)
    assert set(got) == set(want) - set(FAULTS_AT), page[page.find("Figures<"):][:900]
    assert all(got[n] == want[n] for n in got)
    lines = [line for line in page.splitlines() if "Figure missing:</strong>" in line]
    for name, (_, why) in FAULTS_AT.items():
        assert [line for line in lines if f"<code>figures/{name}</code>" in line and why in line], (name, lines)
    assert len(lines) == len(FAULTS_AT) and page.count("<figure>") == len(want) - len(FAULTS_AT)


def test_bad_figure_workers_argument(tmp_path):
    with pytest.raises(InitlabError, match="figure_workers: expected an integer in \\[0, 64\\] or None, got int -1"):
        run_experiment(small(), tmp_path / "run", progress=False, figure_workers=-1)
    assert not (tmp_path / "run").exists()


def test_cli_figure_workers_flag_is_checked(capsys):
    from initlab.cli import main
    with pytest.raises(SystemExit) as e:
        main(["run", "smoke", "--figure-workers", "-1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--figure-workers" in err and "expected an integer in [0, 64], got -1" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("busy, nice", [(0.0, workers.IDLE_NICE), (1.2, 0), (None, 0)])
def test_workers_import_at_low_priority_only_on_an_idle_machine(busy, nice, monkeypatch):
    started = []
    monkeypatch.setattr(workers, "busy_now", lambda max_age=2.0: busy)
    monkeypatch.setattr(workers, "_Worker", lambda command, n: started.append(n))
    workers.FigureWorkers(2)
    assert started == [nice, nice]


def test_start_runs_the_imports_in_a_thread_with_the_given_nice_value():
    import os
    import subprocess

    probe = ("import os, threading\n"
             "import initlab.lab.report.workers as w\n"
             "w.prepare = lambda: print('nice', os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))\n"
             "w.main = lambda: print('main', os.getpriority(os.PRIO_PROCESS, threading.get_native_id())) or 0\n"
             "exec(w._START)\n")
    base = os.getpriority(os.PRIO_PROCESS, 0)
    for value in (7, 0):
        env = {**os.environ, "INITLAB_FIGURE_WORKER_NICE": str(value)}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["nice", str(max(base, value)), "main", str(base)]


def test_auto_figure_workers_only_on_cpus_training_leaves_idle(monkeypatch):
    import torch

    import initlab.lab.run as lab_run

    threads = torch.get_num_threads()
    for idle, expected in [(threads, 0), (threads + 1, 1), (threads + 2, 2), (threads + 9, 2), (1, 0)]:
        monkeypatch.setattr(lab_run, "idle_cpus", lambda load=None, n=idle: n)
        assert lab_run.auto_figure_workers() == expected, (idle, threads)


# ----------------------------------------------------------------------------- the fork after training


def _page(run: Path) -> str:
    import re

    text = (run / "report.html").read_text().replace(str(run), "RUN_DIR")  # the page names its own folder
    return re.sub(r"Generated by initlab on [^.]*\.", "", text)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks on Linux only")
def test_forked_report_is_the_in_process_report(in_process, tmp_path, monkeypatch):
    """``write_report_forked`` (what ``figure_workers=0`` runs after training): the same figures, byte for
    byte, and the same page as :func:`write_report` drawing every figure in this process; and the child
    really draws its share (every other figure of the list): the files it writes are not written here."""
    import os

    from initlab.lab.report import write_report

    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(in_process, one)
    shutil.copytree(in_process, two)
    shutil.rmtree(one / "figures")
    shutil.rmtree(two / "figures")
    write_report(one)
    here: list[str] = []
    real_save = workers.make_figures.__globals__["_save"]

    def save(fig, path):
        if os.getpid() == parent:
            here.append(Path(path).name)
        return real_save(fig, path)

    parent = os.getpid()
    monkeypatch.setitem(workers.make_figures.__globals__, "_save", save)
    monkeypatch.setattr(_threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(_threads, "busy_now", lambda: 0.0)  # two idle CPUs, whatever else runs now
    workers.write_report_forked(two)
    assert _figures(two) == _figures(one) and set(_figures(one)) >= FIGURES
    assert _page(two) == _page(one)
    names = workers._names()
    assert set(here) == FIGURES & set(names[1::2]) and not set(here) & set(names[0::2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks on Linux only")
@pytest.mark.parametrize("fault", ["raise", "exit"])
def test_forked_child_that_fails(in_process, tmp_path, monkeypatch, fault):
    """The forked child's first figure raises (it goes on with the next), or the child dies there: the page
    names that figure missing and why, every other figure is drawn (the dead child's other figures here), the
    run's earlier file of the failed figure is removed, and no temporary file is left."""
    import os

    run = tmp_path / "run"
    shutil.copytree(in_process, run)
    first = workers._names()[0]
    parent = os.getpid()
    real = workers.make_figures

    def make_figures(*args, only=None, **kwargs):
        if os.getpid() != parent and only == {first}:
            if fault == "exit":
                os._exit(5)
            raise RuntimeError("injected fault")
        return real(*args, only=only, **kwargs)

    monkeypatch.setattr(workers, "make_figures", make_figures)
    monkeypatch.setattr(_threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(_threads, "busy_now", lambda: 0.0)  # two idle CPUs, whatever else runs now
    page = workers.write_report_forked(run).read_text()
    want = _figures(in_process)
    got = _figures(run)
    assert set(got) == set(want) - {first} and all(got[n] == want[n] for n in got)
    why = "RuntimeError: injected fault" if fault == "raise" else "the figure worker stopped (exit code 5)"
    lines = [line for line in page.splitlines() if "Figure missing:</strong>" in line]
    assert len(lines) == 1 and f"<code>figures/{first}</code>" in lines[0] and why in lines[0], lines
    assert not list(run.rglob(".initlab-tmp-*"))


@pytest.mark.parametrize("usable, busy", [(1, 0.0), (2, 0.6), (4, 2.7)])
def test_forked_report_without_two_idle_cpus_is_drawn_here(in_process, tmp_path, monkeypatch, usable, busy):
    """One usable CPU, or other processes keeping all but one busy: the figures are drawn in this process
    alone (a fork would only take time slices from it). Negative control: with 2 idle CPUs it forks."""
    import os

    run = tmp_path / "run"
    shutil.copytree(in_process, run)
    monkeypatch.setattr(_threads, "usable_cpus", lambda: usable)
    monkeypatch.setattr(_threads, "busy_now", lambda: busy)
    assert _threads.idle_cpus() < 2
    monkeypatch.setattr(_threads, "busy_now", lambda: 0.0)  # the same CPUs idle: it forks where 2 are usable
    assert (_threads.idle_cpus() >= 2) == (usable >= 2)
    monkeypatch.setattr(_threads, "busy_now", lambda: busy)
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("forked without two idle CPUs"))
    workers.write_report_forked(run)
    assert _figures(run) == _figures(in_process)
