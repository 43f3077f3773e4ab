"""The lab under stress: exploding networks, the run lock, signals, OS errors, corrupt run
directories, unsafe names and file modes. Nothing is lost, nothing leaks, no raw traceback."""
from __future__ import annotations

import math
import os
import stat

import numpy as np
import pytest

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

