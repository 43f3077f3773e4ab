"""Executors: a local process pool gives the in-process run directory, survives a killed worker, reports a
unit that keeps failing while the others complete, and resumes after the driver itself is killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from initlab._errors import InitlabError
from initlab.lab.config import with_overrides
from initlab.lab.executors import InProcess, ProcessPool, RayExecutor, make_executor
from initlab.lab.metrics import Metric, register_metric, unregister_metric
from initlab.lab.run import read_run_meta, run_experiment

from rundir_compare import SMALL_MAX_MEMBERS, KillOnce, compare_run_dirs, small, tb_events

pytestmark = pytest.mark.usefixtures("fixed_threads")

ROOT = Path(__file__).resolve().parents[1]
MAX_MEMBERS = SMALL_MAX_MEMBERS  # 5 members -> 3 units, so that two workers train at once


@pytest.fixture(scope="module")
def reference(small_reference):
    """The uninterrupted in-process run (conftest.py: computed once, shared with tests/test_ray_cluster.py)."""
    return small_reference


def test_process_pool_gives_the_in_process_run_directory_after_a_killed_worker(tmp_path, reference):
    kill = KillOnce()
    out = tmp_path / "pool"
    summary = run_experiment(small(), out, max_members=MAX_MEMBERS, report=False, progress=kill,
                             executor=ProcessPool(2), checkpoint_every=0)
    assert len(kill.killed) == 1 and summary.retries >= 1, (kill.killed, summary.retries)
    assert summary.complete and not summary.failed and summary.members_run == 5
    compared, diffs = compare_run_dirs(reference, out)
    assert compared == 2 + 5 and diffs == []
    assert not (out / "checkpoints").exists()


def test_live_tensorboard_has_weight_histograms_and_hparams_at_every_log_step(reference):
    events = tb_events(reference)
    assert len(events) == 5
    from tensorboard.compat.proto import summary_pb2

    for member, counter in events.items():
        tags: dict[str, set[int]] = {}
        for step, raw in counter:
            v = summary_pb2.Summary.Value.FromString(raw)
            tags.setdefault(v.tag, set()).add(step)
        assert tags["weights/1"] == tags["weights/3"] == {0, 10, 20, 30, 40}, member
        assert tags["test/acc"] == {0, 10, 20, 30, 40} and tags["acc"] == {10, 20, 30, 40}
        assert "_hparams_/session_start_info" in tags and "_hparams_/experiment" in tags


def test_the_comparison_sees_a_changed_event(tmp_path, reference):
    """Negative control: one histogram fewer is a difference."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    run_experiment(with_overrides(small(), {"train.histograms_every": 2}), copy / "other", report=False,
                   max_members=MAX_MEMBERS)
    shutil.rmtree(copy / "tb")
    shutil.copytree(copy / "other" / "tb", copy / "tb")
    compared, diffs = compare_run_dirs(reference, copy)
    assert diffs == [f"tb/{sc}/seed0 (TensorBoard events)" for sc in
                     sorted(p.name for p in (reference / "tb").iterdir())]


def _fail_relu_normal(view):
    """A metric that raises in the unit holding relu-normal (and records nothing elsewhere: K = 0 values)."""
    if any(k[0] == "relu-normal" for k in view.members):
        raise RuntimeError("injected failure in relu-normal")
    return torch.zeros(len(view.members), 0)


def test_a_unit_that_keeps_failing_is_reported_and_the_others_complete(tmp_path, reference):
    out = tmp_path / "fail"
    register_metric(Metric("failing", "failing", compute=_fail_relu_normal))
    try:
        summary = run_experiment(small(), out, max_members=MAX_MEMBERS, report=False,
                                 executor=ProcessPool(2), retries=1)
    finally:
        unregister_metric("failing")
    assert len(summary.failed) == 1 and summary.failed[0]["attempts"] == 2
    assert "injected failure in relu-normal" in summary.failed[0]["error"]
    assert ["relu-normal", 0] in summary.failed[0]["members"]
    assert summary.members_run == 3 and not summary.complete
    meta = read_run_meta(out)
    assert meta["status"] == "failed" and meta["failed"] == summary.failed
    # the one unit left, run again (in this process: resuming on a pool is test_driver_killed_mid_run_...)
    again = run_experiment(small(), out, max_members=MAX_MEMBERS, report=False)
    assert again.complete and again.members_skipped == 3 and again.members_run == 2 and again.units_run == 1
    assert compare_run_dirs(reference, out)[1] == []


def _run_cli(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys; from initlab.lab.config import load_experiment, with_overrides; "
            "from initlab.lab.run import run_experiment; from initlab.lab.executors import ProcessPool; "
            "exp = with_overrides(load_experiment('smoke'), {'train.steps': 40, 'train.log_every': 10}); "
            f"run_experiment(exp, sys.argv[1], max_members={MAX_MEMBERS}, report=False, checkpoint_every=0, "
            "executor=ProcessPool(2))")
    return subprocess.Popen([sys.executable, "-c", code, str(out), *extra], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_driver_killed_mid_run_resumes_only_the_unfinished_units(tmp_path, reference):
    out = tmp_path / "driver"
    proc = _run_cli(out)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any((out / "checkpoints").glob("*.pt")) if (out / "checkpoints").is_dir() else False:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its workers and its manager: a machine that went down
    proc.wait()
    assert read_run_meta(out)["status"] == "running"
    done_before = len(list((out / "parts").glob("*/seed*/member.json"))) if (out / "parts").is_dir() else 0
    summary = run_experiment(small(), out, max_members=MAX_MEMBERS, report=False, executor=ProcessPool(2))
    assert summary.complete and summary.members_skipped == done_before and summary.members_run == 5 - done_before
    assert compare_run_dirs(reference, out)[1] == []


def test_executor_choices_and_errors():
    assert isinstance(make_executor(None), InProcess)
    pool = make_executor("process", workers=3)
    assert isinstance(pool, ProcessPool) and pool.workers == 3
    with pytest.raises(InitlabError, match="unknown executor 'rya'; did you mean 'ray'"):
        make_executor("rya")
    with pytest.raises(InitlabError, match="--workers: only with --executor process"):
        make_executor("ray", workers=2)
    with pytest.raises(InitlabError, match="--address: only with --executor ray"):
        make_executor("process", address="auto")
    with pytest.raises(InitlabError, match="positive number of worker processes"):
        ProcessPool(0)
    assert RayExecutor("ray://h:1").address == "ray://h:1"


def test_missing_ray_gives_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(InitlabError, match=r"^the Ray executor needs Ray: pip install 'initlab\[ray\]'$"):
        make_executor("ray")
