"""The driver's event path (initlab.lab.run): the state after a unit's last step is written only when
the unit's commit is interrupted (then the next run continues from it, to the same files), and
RunSummary.timings says where the time went."""
from __future__ import annotations

import pytest

import initlab.lab.run as lab_run
from initlab.lab.config import experiment_from_dict
from initlab.lab.rundir import load_checkpoint
from initlab.lab.run import run_experiment


def tiny():
    """One group of 2 members, 9 steps, a log step every 3 (checkpoints at 3, 6 and 9 with checkpoint_every=0)."""
    return experiment_from_dict({
        "name": "events", "data": {"name": "mnist", "limit": 300}, "model": {"widths": [784, 16, 10]},
        "train": {"steps": 9, "log_every": 3, "seeds": [0], "first_pass_batch": 20},
        "scenarios": [{"activation": "relu", "scheme": "he_normal"}, {"activation": "tanh", "scheme": "xavier_normal"}]})


@pytest.fixture
def saved(monkeypatch):
    """The steps of the checkpoints written, in order."""
    steps: list[int] = []
    real = lab_run.save_checkpoint

    def record(run_dir, fingerprint, keys, state):
        steps.append(int(state["step"]))
        return real(run_dir, fingerprint, keys, state)

    monkeypatch.setattr(lab_run, "save_checkpoint", record)
    return steps


def test_the_last_step_is_not_written_when_the_commit_succeeds(tmp_path, saved):
    summary = run_experiment(tiny(), tmp_path / "run", report=False, checkpoint_every=0)
    assert summary.complete and saved == [3, 6]  # 9 is the last step: its state is kept in memory
    assert not (tmp_path / "run" / "checkpoints").exists()
    t = summary.timings
    assert {"train", "events", "commit", "finish", "unit.init_first_pass"} <= set(t)
    assert 0 < t["events"] + t["commit"] < t["train"] <= summary.wall_s


def test_an_interrupted_commit_writes_the_last_step_and_resumes_from_it(tmp_path, monkeypatch, saved):
    ref = run_experiment(tiny(), tmp_path / "ref", report=False, checkpoint_every=0).run_dir
    saved.clear()
    real = lab_run.commit_member

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lab_run, "commit_member", die)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(tiny(), out, report=False, checkpoint_every=0)
    assert saved == [3, 6, 9]
    run = lab_run._Run(tiny(), out, True, None)
    run.plan()
    state = load_checkpoint(out, run.fingerprint, run.units[0].keys)
    assert state is not None and int(state["step"]) == 9
    monkeypatch.setattr(lab_run, "commit_member", real)
    steps: list[int] = []
    summary = run_experiment(tiny(), out, report=False, checkpoint_every=0,
                             progress=lambda ev: steps.append(ev.step) if ev.event == "step" else None)
    assert summary.complete and summary.members_run == 2
    assert max(steps, default=9) == 9 and len(steps) <= 1  # nothing trained again
    for name in ("metrics.csv", "first_pass.csv"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
