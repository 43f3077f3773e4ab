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
from initlab import InitlabError
from initlab.lab.run import run_experiment

from rundir_compare import small

FAULTS = Path(__file__).with_name("figure_worker_faults.py")
FIGURES = {"layer1_histograms.png", "variance_per_layer.png", "accuracy.png", "loss.png"}
#: the workers' time limit per figure in these tests: each figure of this small run takes about a second to draw
TIMEOUT_S = 5.0


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


@pytest.mark.parametrize("kind, why", [("raise", "RuntimeError: injected fault"),
                                       ("exit", "the figure worker stopped (exit code 3)"),
                                       ("hang", f"the figure worker did not finish within {TIMEOUT_S:.0f} s")])
def test_a_failing_figure_is_named_missing(in_process, tmp_path, monkeypatch, kind, why):
    """The report of a finished run, rebuilt by workers one of which fails on variance_per_layer.png:
    the page names it missing and why, every other figure is drawn (the same bytes), and the figure's
    file from the earlier report is removed, not shown as new."""
    run = tmp_path / "run"
    shutil.copytree(in_process, run)
    assert (run / "figures" / "variance_per_layer.png").is_file()
    monkeypatch.setattr(workers, "COMMAND", [sys.executable, str(FAULTS), kind, "variance_per_layer"])
    monkeypatch.setattr(workers, "TIMEOUT_S", TIMEOUT_S)
    t0 = time.monotonic()
    with workers.FigureWorkers(2) as pool:
        page = pool.write_report(run).read_text()
    assert time.monotonic() - t0 < 300  # no hang: the stuck worker was killed
    got, want = _figures(run), _figures(in_process)
    assert set(got) == set(want) - {"variance_per_layer.png"}, page[page.find("Figures<"):][:600]
    assert all(got[n] == want[n] for n in got)
    assert "Figure missing:</strong> <code>figures/variance_per_layer.png</code>" in page and why in page
    assert page.count("<figure>") == len(want) - 1


def test_bad_figure_workers_argument(tmp_path):
    with pytest.raises(InitlabError, match="figure_workers: expected an integer in \\[0, 64\\], got int -1"):
        run_experiment(small(), tmp_path / "run", progress=False, figure_workers=-1)
    assert not (tmp_path / "run").exists()


def test_cli_figure_workers_flag_is_checked(capsys):
    from initlab.cli import main
    with pytest.raises(SystemExit) as e:
        main(["run", "smoke", "--figure-workers", "-1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--figure-workers" in err and "expected an integer in [0, 64], got -1" in err and len(err.splitlines()) == 1
