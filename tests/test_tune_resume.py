"""``initlab tune`` interrupted and resumed: Ctrl-C mid-search stops the command cleanly (one line, exit
130, no Ray process left), keeps the finished trials, and the same command resumes the search to the
files of an uninterrupted search with the same seed; another search in the same directory is refused.

The search is designed so that ASHA's record matters: two trials, one at a time, in grid order;
the second (N(0, 30^2) weights, a saturated tanh net) is stopped at the first rung (step 10) by the
first one's record there. The interrupted command runs with the trials' test hook
(``initlab.lab.tune.trial.HOLD_ENV``): the second trial writes its marker and waits before it trains,
and the command is interrupted when that marker appears, so the Ctrl-C lands inside the second trial
however fast the (small) net trains. The resumed search must remember the first trial's record: the
negative control resumes a copy without ASHA's record, and its second trial trains to the end.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from initlab.cli import main
from initlab.lab.config import load_experiment
from initlab.lab.tune import _fingerprint, search_from_dict, search_table
from initlab.lab.tune.resume import asha_file, search_record
from initlab.lab.tune.trial import HOLD_ENV

ROOT = Path(__file__).resolve().parents[1]

TOML = """
name = "tiny-resume"
[data]
name = "mnist"
limit = 600
[model]
widths = [784, 64, 64, 10]
[train]
batch_size = 60
steps = 20
log_every = 10
seeds = [0]
[[scenarios]]
name = "tanh-normal"
activation = "tanh"
scheme = "normal"
[tune]
samples = 1
max_concurrent = 1
grace_period = 10
reduction_factor = 2
[tune.params]
"scheme.std" = "grid(0.5, 30)"
"""
RESUME_LINE = "initlab: interrupted; re-run the same command to resume"


@pytest.fixture
def toml(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TOML)
    return path


@pytest.fixture
def start():
    """``start(toml, out, *flags, hold=None)``: ``initlab tune`` in a subprocess (with ``hold``, a folder, the
    trials' test hook on); whatever a test leaves running is killed at its end."""
    procs = []
    base = {k: v for k, v in os.environ.items() if k != HOLD_ENV}
    base["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")

    def run(toml, out, *extra, hold=None):
        env = base if hold is None else {**base, HOLD_ENV: str(hold)}
        # a session of its own: Ctrl-C reaches the driver and the Ray processes it starts (one process
        # group), and whatever the command starts can be found afterwards by its session id
        procs.append(subprocess.Popen([sys.executable, "-m", "initlab.cli", "tune", str(toml), "--cpus", "1",
                                       "--out", str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, start_new_session=True))
        return procs[-1]

    yield run
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        for pid in session_left(proc.pid):
            os.kill(pid, signal.SIGKILL)


def session_left(sid):
    ps = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True, check=True).stdout
    return [int(p) for p, s, stat in (line.split()[:3] for line in ps.splitlines()) if int(s) == sid
            and not stat.startswith("Z")]


def finish(proc, timeout=240):
    """Wait for the command; then every process it started must be gone (killed here, and the test fails,
    if not)."""
    out, err = proc.communicate(timeout=timeout)  # on a timeout the fixture kills what is left
    deadline = time.monotonic() + 20
    while session_left(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = session_left(proc.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left by the command: {left}"
    return proc.returncode, out, err


def trial_dirs(out):
    return sorted(glob.glob(str(out / "ray" / "tanh-normal" / "trainable_*")), key=lambda p: Path(p).name.split("_")[2])


def rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "trial_id"} for r in csv.DictReader(f)]


def to_end(proc, out):
    rc, _, err = finish(proc)
    assert rc == 0, err[-3000:]
    return rows(out / "tune_results.csv")


@pytest.mark.ray
def test_ctrl_c_mid_search_then_the_same_command_resumes_to_the_uninterrupted_files(toml, tmp_path, start, capsys,
                                                                                   local_ray):
    a, hold = tmp_path / "a", tmp_path / "hold"
    hold.mkdir()
    proc = start(toml, a, hold=hold)
    deadline = time.monotonic() + 240
    # the held trial waits for ever: wait for its marker and for Ray's directory of it (made by the driver,
    # not in step with the trial's own start)
    while not ((hold / "trial-2").exists() and len(trial_dirs(a)) == 2) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (hold / "trial-2").exists() and len(trial_dirs(a)) == 2, "the second trial never started"
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
    rc, out, err = finish(proc)
    stop_s = time.monotonic() - t0
    assert rc == 130 and err.strip().splitlines()[-1] == RESUME_LINE and "Traceback" not in err + out, err[-3000:]
    assert stop_s < 30
    assert not (a / "tune_results.csv").exists() and not (a / "run").exists()  # no half result
    first = Path(trial_dirs(a)[0]) / "result.json"
    finished = first.read_bytes()
    assert finished.count(b"\n") == 2  # the first trial finished (steps 10 and 20) and is kept
    control, fresh = tmp_path / "control", tmp_path / "fresh"
    shutil.copytree(a, control)
    shutil.copytree(a, fresh)
    asha_file(control / "ray" / "tanh-normal").unlink()  # negative control: ASHA's record lost

    # at once: the same command again in a process of its own (it starts a Ray of its own), and meanwhile,
    # here, on this process's Ray (``local_ray``), the same search started over (--fresh), which is an
    # uninterrupted search, then the negative control resumed
    proc = start(toml, a)
    assert main(["tune", str(toml), "--cpus", "1", "--out", str(fresh), "--fresh"]) == 0
    reference = rows(fresh / "tune_results.csv")
    assert main(["tune", str(toml), "--cpus", "1", "--out", str(control)]) == 0
    lost = rows(control / "tune_results.csv")
    resumed = to_end(proc, a)
    assert {Path(d).name.split("_")[1] for d in trial_dirs(fresh)}.isdisjoint(
        {Path(d).name.split("_")[1] for d in trial_dirs(a)})  # new trial ids: nothing of the old state kept
    # the finished trial was not run again, the unfinished one was
    assert first.read_bytes() == finished and len(trial_dirs(a)) == 2
    assert [r["scheme.std"] for r in resumed] == ["0.5", "30.0"]
    assert [(r["step"], r["stopped_early"]) for r in resumed] == [("20", "false"), ("10", "true")]
    assert resumed == reference
    for name in ("metrics.csv", "first_pass.csv"):
        assert (a / "run" / name).read_bytes() == (fresh / "run" / name).read_bytes(), name
    assert (a / "tune_search.png").stat().st_size > 10_000 and (a / "run" / "report.html").is_file()

    assert lost != reference and [(r["step"], r["stopped_early"]) for r in lost] == [("20", "false")] * 2

    # another search on the same directory (the command, here: it is refused before Ray starts): one line,
    # nothing touched
    before = sorted(p.relative_to(a) for p in a.rglob("*"))
    capsys.readouterr()
    rc = main(["tune", str(toml), "--cpus", "1", "--out", str(a), "--param", "scheme.std=grid(0.5, 20)"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and "holds another search" in err
    assert "scheme.std grid(0.5, 30) -> grid(0.5, 20)" in err
    assert sorted(p.relative_to(a) for p in a.rglob("*")) == before


def test_another_search_in_the_directory_is_refused_even_with_fresh(toml, tmp_path, capsys):
    exp = load_experiment(str(toml))
    search = search_from_dict(search_table(str(toml)), exp)
    out = tmp_path / "o"
    out.mkdir()
    record = search_record(_fingerprint(exp, search), exp.name, search)
    (out / "tune.json").write_text(json.dumps(record))
    for extra in ([], ["--fresh"]):
        rc = main(["tune", str(toml), "--samples", "2", "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "holds another search" in err and "samples 1 -> 2" in err and "--out" in err
    assert sorted(p.name for p in out.iterdir()) == ["tune.json"]
