"""The lab under stress: exploding networks, the run lock, signals, OS errors, corrupt run
directories, unsafe names and file modes. Nothing is lost, nothing leaks, no raw traceback."""
from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from initlab.lab import _io
from initlab.lab.config import experiment_from_dict
from initlab.lab.run import read_run_meta, run_experiment


def tiny(**train) -> object:
    """A 2-scenario, 1-seed experiment on 300 digits that trains in well under a second."""
    d = {"name": "tiny", "data": {"name": "mnist", "limit": 300},
         "model": {"widths": [784, 16, 10]},
         "train": {"steps": 6, "log_every": 3, "seeds": [0], "first_pass_batch": 20, **train},
         "scenarios": [{"activation": "relu", "scheme": "he_normal"},
                       {"activation": "sigmoid", "scheme": "xavier_normal"}]}
    return experiment_from_dict(d)


# ----------------------------------------------------------------------------- exploding networks


def test_histograms_keep_values_beyond_tensorboards_buckets(tmp_path):
    """TensorBoard's default buckets end near 1e20: values beyond them used to be dropped, and a tensor
    of only such values raised "The histogram is empty"."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from initlab.lab.report.tensorboard import write_member_events

    values = {"input": np.zeros((4, 3), np.float32), "mat_mul_1": np.full((4, 5), 3e25, np.float32),
              "fc_out_1": np.array([[1e25, -3e30, math.inf, 2.0]], np.float32),
              "mat_mul_2": np.array([[1.0, -2.0, 5e21]], np.float32)}
    write_member_events(tmp_path / "x", values, [])
    acc = EventAccumulator(str(tmp_path / "x"), size_guidance={"histograms": 0})
    acc.Reload()
    (h1,) = acc.Histograms("mat_mul_hist_1")
    assert h1.histogram_value.num == 20 and sum(h1.histogram_value.bucket) == 20
    (f1,) = acc.Histograms("fc_out_1")
    assert f1.histogram_value.num == 3 and sum(f1.histogram_value.bucket) == 3  # the finite ones, all counted
    (h2,) = acc.Histograms("mat_mul_hist_2")
    assert sum(h2.histogram_value.bucket) == 3 and h2.histogram_value.max == pytest.approx(5e21, rel=1e-6)


def test_deep_normal_network_runs_to_a_report_naming_what_overflowed(tmp_path, capsys):
    """relu x N(0,1) at depth 30: the first pass overflows float32; the run must still finish and say so."""
    exp = experiment_from_dict({
        "name": "deep30", "data": {"name": "mnist", "limit": 300}, "model": {"widths": [784, 100, 10]},
        "train": {"steps": 4, "log_every": 2, "seeds": [0], "first_pass_batch": 20},
        "grid": {"activations": ["relu"], "schemes": ["normal", "he_normal"], "depths": [30]}})
    out = tmp_path / "deep"
    summary = run_experiment(exp, out)
    assert summary.complete and summary.report is not None
    html = (out / "report.html").read_text()
    assert "Overflowed at initialisation" in html and "relu-normal-d30 seed 0 from layer" in html
    assert "relu-he_normal-d30 seed 0 from layer" not in html
    assert "RuntimeWarning" not in capsys.readouterr().err
    # the re-run has nothing to do and does not fail either
    assert run_experiment(exp, out).members_run == 0


# ----------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_run_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        run_experiment(tiny(), tmp_path / "run")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert len(files) > 15
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    dirs = {oct(stat.S_IMODE(p.stat().st_mode)) for p in (tmp_path / "run").rglob("*") if p.is_dir()}
    assert dirs == {oct(0o777 & ~umask)}
    assert read_run_meta(tmp_path / "run")["status"] == "complete"



# ----------------------------------------------------------------------------- resuming bit for bit


def ensemble(steps: int = 30) -> object:
    """One group of 6 members (3 scenarios x 2 seeds) whose numbers depend on their ensemble's size."""
    return experiment_from_dict({
        "name": "ensemble", "data": {"name": "mnist", "limit": 400}, "model": {"widths": [784, 24, 10]},
        "train": {"steps": steps, "log_every": 10, "seeds": [0, 1], "first_pass_batch": 20},
        "scenarios": [{"activation": "sigmoid", "scheme": "normal"}, {"activation": "tanh", "scheme": "xavier_normal"},
                      {"activation": "relu", "scheme": "he_normal"}]})


@pytest.fixture(scope="module")
def ensemble_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble") / "ref"
    run_experiment(ensemble(), out, report=False)
    return out


def test_kill_between_member_commits_resumes_bit_identical(tmp_path, monkeypatch, ensemble_reference):
    """Interrupted after 2 of the group's 6 members are recorded: the other 4 used to be trained again as an
    ensemble of 4, whose last bits differ from the ensemble of 6."""
    import initlab.lab.run as lab_run

    real, done = lab_run.commit_member, []

    def commit_then_die(*args, **kwargs):
        result = real(*args, **kwargs)
        done.append(1)
        if len(done) == 2:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(lab_run, "commit_member", commit_then_die)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(ensemble(), out, report=False)
    monkeypatch.undo()
    summary = run_experiment(ensemble(), out, report=False)
    assert summary.members_run == 4 and summary.members_skipped == 2
    for name in ("metrics.csv", "first_pass.csv"):
        assert (out / name).read_bytes() == (ensemble_reference / name).read_bytes(), name


def test_ctrl_c_inside_a_group_resumes_from_its_checkpoint(tmp_path, monkeypatch, ensemble_reference):
    """Ctrl-C at step 25 of 30: the group continues from its checkpoint at step 20 (not from 0), and ends
    bit-identical to the uninterrupted run."""
    from initlab.lab.training.loop import TrainLoop

    real = TrainLoop._step

    def step(self, n):
        if n == 25:
            raise KeyboardInterrupt
        return real(self, n)

    monkeypatch.setattr(TrainLoop, "_step", step)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(ensemble(), out, report=False, checkpoint_every=0)
    monkeypatch.undo()
    assert read_run_meta(out)["status"] == "interrupted" and not (out / "run.lock").exists()
    assert list((out / "checkpoints").glob("*.pt"))
    steps = []
    run_experiment(ensemble(), out, report=False, checkpoint_every=0,
                   progress=lambda ev: steps.append(ev.step) if ev.event == "step" else None)
    assert steps[0] == 20 and steps[-1] == 30
    for name in ("metrics.csv", "first_pass.csv"):
        assert (out / name).read_bytes() == (ensemble_reference / name).read_bytes(), name
    assert not (out / "checkpoints").exists()


# ----------------------------------------------------------------------------- the lock and signals


def _contender(run_dir, barrier, inside, worst, outcomes) -> None:
    from initlab._errors import InitlabError
    from initlab.lab.rundir import lock

    barrier.wait()
    try:
        with lock(run_dir):
            with inside.get_lock():
                inside.value += 1
                worst.value = max(worst.value, inside.value)
            time.sleep(0.03)
            with inside.get_lock():
                inside.value -= 1
        outcomes.put("took")
    except InitlabError as e:
        outcomes.put("refused" if "another initlab process" in str(e) else f"error: {e}")


def test_a_stale_lock_is_taken_by_one_run_at_a_time(tmp_path):
    """A lock file left by a killed process, and two runs starting at the same instant, 40 times: never
    both inside (the old pid-file lock let both in 2 times in 40)."""
    import multiprocessing
    import socket
    import subprocess

    ctx = multiprocessing.get_context("fork")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    inside, worst, outcomes = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Queue()
    seen = []
    for trial in range(40):
        d = tmp_path / f"t{trial}"
        d.mkdir()
        (d / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
        barrier = ctx.Barrier(2)
        procs = [ctx.Process(target=_contender, args=(d, barrier, inside, worst, outcomes)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        seen += sorted(outcomes.get(timeout=10) for _ in procs)
    assert worst.value == 1, "two runs held the lock at once"
    assert set(seen) <= {"took", "refused"} and seen.count("took") >= 40, Counter(seen)


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path):
    """SIGTERM used to end the process at once (exit -15, run.lock left, status "running"): now one line,
    exit 143, the lock released, the run marked interrupted and resumable."""
    import subprocess

    from initlab.lab.config import experiment_to_toml

    exp = ensemble(steps=3000)
    cfg = tmp_path / "e.toml"
    cfg.write_text(experiment_to_toml(exp))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "initlab", "run", str(cfg), "--out", str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "run.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # into the training steps
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, (proc.returncode, stderr)
    assert stderr.count("\n") == 1 and stderr.startswith("initlab: terminated") and "resume" in stderr, stderr
    assert not (out / "run.lock").exists() and read_run_meta(out)["status"] == "interrupted"
    assert not (out / "parts").exists() or not any((out / "parts").rglob("member.json"))


# ----------------------------------------------------------------------------- OS errors, corrupt files, memory


def cli_fails(argv: list[str], capsys, *needles: str) -> str:
    """``initlab ARGV`` in this process: exit 2 and exactly one line ``initlab: error: ...`` naming ``needles``."""
    from initlab.cli import main

    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("initlab: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def tiny_toml(tmp_path: Path, **top) -> Path:
    from initlab.lab.config import experiment_to_dict

    import tomli_w

    d = experiment_to_dict(tiny())
    d.update(top)
    p = tmp_path / "tiny.toml"
    p.write_text(tomli_w.dumps(d))
    return p


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "ref"
    run_experiment(tiny(), out)
    return out


@contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False):
    """A small tmpfs at ``path`` (a real full or read-only disk); skips where mounting is not allowed."""
    path.mkdir()
    opts = f"size={size}" + (",ro" if read_only else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full_is_one_line_and_resumable(tmp_path, capsys, monkeypatch, tiny_reference):
    """ENOSPC at the 4th fsync (simulated: any disk): one line naming the file and what to do; then the same
    command completes the run, identical to an uninterrupted one."""
    import errno

    cfg = tiny_toml(tmp_path)
    out = tmp_path / "run"
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    # the figures drawn in this process (--figure-workers 0): the workers are not what is checked here
    cli_fails(["run", str(cfg), "--out", str(out), "--no-progress", "--figure-workers", "0"], capsys,
              "No space left on device", str(out), "free some space", "re-run the same command")
    monkeypatch.undo()
    from initlab.cli import main

    assert main(["run", str(cfg), "--out", str(out), "--no-progress", "--figure-workers", "0"]) == 0
    for name in ("metrics.csv", "first_pass.csv"):
        assert (out / name).read_bytes() == (tiny_reference / name).read_bytes()


@pytest.mark.parametrize("size", ["64k", "400k"])
def test_a_really_full_disk_is_one_line(tmp_path, capsys, size, tiny_reference):
    """A real full file system (a tiny tmpfs): during the members' files (64k; the figure workers, not reached,
    left out) or the report (400k; drawn by the figure workers, ``initlab run``'s default)."""
    import shutil

    cfg = tiny_toml(tmp_path)
    workers = ["--figure-workers", "0"] if size == "64k" else []
    with tmpfs(tmp_path / "disk", size) as disk:
        cli_fails(["run", str(cfg), "--out", str(disk / "run"), "--no-progress", *workers], capsys,
                  "No space left on device", "free some space")
        assert not list((disk / "run").rglob(f"{_io.TMP_PREFIX}*"))
        shutil.copytree(disk / "run", tmp_path / "moved")
    summary = run_experiment(tiny(), tmp_path / "moved")
    assert summary.complete
    assert (tmp_path / "moved" / "metrics.csv").read_bytes() == (tiny_reference / "metrics.csv").read_bytes()


def test_out_is_a_file_or_under_a_file(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("precious")
    cfg = tiny_toml(tmp_path)
    cli_fails(["run", str(cfg), "--out", str(f)], capsys, str(f), "not a directory", "another --out")
    cli_fails(["run", str(cfg), "--out", str(f / "run")], capsys, str(f), "is a file, not a folder")
    assert f.read_text() == "precious"


def test_out_not_writable(tmp_path, capsys, monkeypatch):
    """Permission denied, found before training (simulated for root, who may write anywhere); and met while
    writing (a real one when not root)."""
    cfg = tiny_toml(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.geteuid() == 0:
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real(p, mode, **kw))
        cli_fails(["run", str(cfg), "--out", str(locked / "run")], capsys, str(locked), "not writable",
                  "another --out")
    finally:
        locked.chmod(0o755)
    monkeypatch.undo()
    import errno
    import tempfile

    def denied(suffix=None, prefix=None, dir=None, text=False):  # as mkstemp names the file it tried
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, f"{prefix}x1y2z3{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    cli_fails(["run", str(cfg), "--out", str(tmp_path / "run")], capsys, "Permission denied",
              str(tmp_path / "run" / "config.toml"), "fix the permissions")


def test_read_only_file_system(tmp_path, capsys):
    cfg = tiny_toml(tmp_path)
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        cli_fails(["run", str(cfg), "--out", str(ro / "run")], capsys, str(ro), "read-only file system")


def test_corrupt_files_in_the_run_directory(tmp_path, capsys, tiny_reference):
    import shutil

    from initlab.cli import main

    cfg = tiny_toml(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(tiny_reference, run)
    (run / "config.toml").write_bytes(b"\xff\xfe garbage")
    cli_fails(["report", str(run)], capsys, str(run / "config.toml"), "not UTF-8", "initlab run")
    (run / "config.toml").write_text("[[[")
    cli_fails(["report", str(run)], capsys, str(run / "config.toml"), "TOML", "initlab run")
    assert main(["run", str(cfg), "--out", str(run), "--no-progress"]) == 0  # the same experiment writes it again
    capsys.readouterr()
    assert (run / "config.toml").read_text() == (tiny_reference / "config.toml").read_text()
    part = next((run / "parts").glob("*/seed0"))
    (part / "values.npz").write_bytes(b"PK\x03\x04 not a zip")
    cli_fails(["report", str(run)], capsys, str(part / "values.npz"), "delete the folder", str(part))
    shutil.rmtree(run / "tb")
    cli_fails(["run", str(cfg), "--out", str(run), "--no-progress"], capsys, str(part / "values.npz"))
    shutil.rmtree(part)
    assert main(["run", str(cfg), "--out", str(run), "--no-progress", "--figure-workers", "0"]) == 0  # trained again
    assert (run / "metrics.csv").read_bytes() == (tiny_reference / "metrics.csv").read_bytes()
    (run / "metrics.csv").write_bytes(b"\x00\x01garbage")
    cli_fails(["report", str(run)], capsys, str(run / "metrics.csv"), "rebuild it")


def test_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    cfg = tiny_toml(tmp_path, model={"kind": "mlp", "widths": [784, 10 ** 9, 10], "bias": True})
    cli_fails(["run", str(cfg), "--out", str(tmp_path / "huge")], capsys, "model.widths", "GiB", "smaller widths")
    assert not (tmp_path / "huge").exists()
    import initlab.lab.executors as lab_executors

    for error in (MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                                              "allocate memory: you tried to allocate 400000000000 bytes")):
        def boom(*args, _e=error, **kwargs):
            raise _e

        monkeypatch.setattr(lab_executors, "run_group", boom)
        cli_fails(["run", str(tiny_toml(tmp_path)), "--out", str(tmp_path / "o"), "--no-progress", "--figure-workers",
                   "0"], capsys, "out of memory", "smaller models")
        assert not (tmp_path / "o" / "run.lock").exists()


@pytest.mark.parametrize("name", ["../escaped", "ABSOLUTE", "a/b", "..", ".", " padded"])
def test_run_name_cannot_leave_runs(tmp_path, capsys, monkeypatch, name):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    name = str(tmp_path / "absolute") if name == "ABSOLUTE" else name
    cfg = tiny_toml(tmp_path, name=name)
    cli_fails(["run", str(cfg)], capsys, f"name: {name!r}", "runs/<name>", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml", "work"] and not any(work.iterdir())
