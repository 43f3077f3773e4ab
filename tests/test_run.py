"""The run directory: every file, TensorBoard tags, resuming, refusing another config, atomic writes."""
from __future__ import annotations

import hashlib
import json
import math
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from initlab._errors import InitlabError
from initlab.lab import _io
from initlab.lab.config import config_fingerprint, load_experiment, with_overrides
from initlab.lab.run import RunProgress, member_dir, read_run_meta, run_experiment

TAGS_SCALAR = {"input_var", "mat_mul_var_1", "mat_mul_var_2", "mat_mul_var_3", "loss", "acc", "test/loss", "test/acc"}
TAGS_HIST = {"mat_mul_hist_1", "mat_mul_hist_2", "mat_mul_hist_3", "fc_out_1", "fc_out_2", "fc_out_3"}
KEY = ["scenario", "seed", "step", "split", "metric"]


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def smoke():
    return load_experiment("smoke")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, smoke):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    summary = run_experiment(smoke, out)
    return out, summary


# ----------------------------------------------------------------------------- the run directory


def test_run_directory_has_every_file(smoke_run, smoke):
    out, summary = smoke_run
    assert summary.complete and summary.members_run == len(smoke.scenarios) * len(smoke.train.seeds)
    for name in ("config.toml", "run.json", "metrics.csv", "first_pass.csv", "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("layer1_histograms.png", "variance_per_layer.png", "accuracy.png", "loss.png"):
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for sc in smoke.scenarios:
        for seed in smoke.train.seeds:
            logdir = out / "tb" / sc.name / f"seed{seed}"
            assert any(p.name.startswith("events.out.tfevents") for p in logdir.iterdir()), logdir
    assert summary.report == out / "report.html"
    assert not list(out.rglob(f"{_io.TMP_PREFIX}*")) and not (out / "run.lock").exists()
    meta = read_run_meta(out)
    assert meta["status"] == "complete" and meta["fingerprint"] == config_fingerprint(smoke)
    assert meta["members_done"] == meta["members_total"] == 5


def test_config_toml_loads_back_to_the_same_experiment(smoke_run, smoke):
    out, _ = smoke_run
    again = load_experiment(out / "config.toml")
    assert config_fingerprint(again) == config_fingerprint(smoke)
    assert again.scenarios == smoke.scenarios and again.train == smoke.train


def test_metrics_csv_is_long_and_complete(smoke_run, smoke):
    out, _ = smoke_run
    m = pd.read_csv(out / "metrics.csv")
    assert list(m.columns) == ["scenario", "seed", "step", "split", "metric", "value"]
    assert not m.duplicated(KEY).any()
    steps, every = smoke.train.steps, smoke.train.log_every
    test_steps = sorted(set(range(0, steps + 1, every)) | {steps})
    train_steps = [s for s in test_steps if s > 0]
    expected = len(smoke.scenarios) * len(smoke.train.seeds) * 2 * (len(test_steps) + len(train_steps))
    assert len(m) == expected
    assert sorted(m[m.split == "test"].step.unique()) == test_steps
    assert sorted(m[m.split == "train"].step.unique()) == train_steps
    acc = m[m.metric == "acc"].value
    assert ((acc >= 0) & (acc <= 1)).all()
    # experiment order: scenarios as in the config
    assert list(dict.fromkeys(m.scenario)) == [s.name for s in smoke.scenarios]


def test_first_pass_csv_has_predicted_next_to_measured(smoke_run, smoke):
    out, _ = smoke_run
    fp = pd.read_csv(out / "first_pass.csv")
    assert list(fp.columns[:3]) == ["scenario", "seed", "scheme"]
    for col in ("index", "layer", "fan_in", "weight_var", "pre_var", "pre_sq_mean", "predicted_pre_sq_mean", "post_mean",
                "saturated_frac", "dead_frac"):
        assert col in fp.columns, col
    n_layers = len(smoke.model.widths) - 1
    assert len(fp) == len(smoke.scenarios) * len(smoke.train.seeds) * n_layers
    assert not fp.duplicated(["scenario", "seed", "index"]).any()
    l1 = fp[fp["index"] == 1]
    # layer 1: Var(W x) = fan_in Var(w) E[x^2] for zero-mean weights, to within sampling error
    ratio = l1.pre_sq_mean / l1.predicted_pre_sq_mean
    assert np.allclose(ratio, 1.0, atol=0.1), ratio.tolist()
    schemes = dict(zip(fp.scenario, fp.scheme))
    assert schemes == {s.name: s.scheme for s in smoke.scenarios}


def test_tensorboard_events_read_back_with_the_study_tags(smoke_run, smoke):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = smoke_run
    m = pd.read_csv(out / "metrics.csv")
    fp = pd.read_csv(out / "first_pass.csv")
    for sc in smoke.scenarios:
        acc = EventAccumulator(str(out / "tb" / sc.name / "seed0"), size_guidance={"scalars": 0, "histograms": 0})
        acc.Reload()
        tags = acc.Tags()
        assert TAGS_SCALAR <= set(tags["scalars"]), tags["scalars"]
        assert TAGS_HIST <= set(tags["histograms"]), tags["histograms"]
        # the scalars are the numbers of the CSV files
        mine = m[(m.scenario == sc.name) & (m.seed == 0)]
        for tag, split, metric in (("loss", "train", "loss"), ("acc", "train", "acc"), ("test/acc", "test", "acc")):
            ev = acc.Scalars(tag)
            want = mine[(mine.split == split) & (mine.metric == metric)].sort_values("step")
            assert [e.step for e in ev] == want.step.tolist()
            assert np.allclose([e.value for e in ev], want.value, rtol=1e-6)
        rows = fp[(fp.scenario == sc.name) & (fp.seed == 0)].set_index("index")
        (mm1,) = acc.Scalars("mat_mul_var_1")
        assert mm1.step == 0 and math.isclose(mm1.value, rows.loc[1, "pre_var"], rel_tol=1e-4)
        (iv,) = acc.Scalars("input_var")
        assert math.isclose(iv.value, rows.loc[1, "input_var"], rel_tol=1e-4)
        (h,) = acc.Histograms("mat_mul_hist_1")
        assert h.histogram_value.num == smoke.train.first_pass_batch * smoke.model.widths[1]


def test_tensorboard_check_can_fail(tmp_path):
    # negative control: an empty log directory has none of the tags
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from initlab.lab.report.tensorboard import write_member_events

    write_member_events(tmp_path / "x", {}, [])
    acc = EventAccumulator(str(tmp_path / "x"))
    acc.Reload()
    assert not TAGS_SCALAR & set(acc.Tags()["scalars"])


# ----------------------------------------------------------------------------- resuming


def test_rerun_skips_everything_and_changes_nothing(smoke_run, smoke):
    out, _ = smoke_run
    before = snapshot(out)
    summary = run_experiment(smoke, out)
    assert summary.members_run == 0 and summary.members_skipped == 5 and summary.units_run == 0
    after = snapshot(out)
    for name in ("metrics.csv", "first_pass.csv", "config.toml"):
        assert after[name] == before[name]
    assert {k for k in after if k.startswith(("parts", "tb"))} == {k for k in before if k.startswith(("parts", "tb"))}


class Interrupt(Exception):
    pass


def test_resume_after_interrupt_between_units(tmp_path, smoke, smoke_run):
    out = tmp_path / "run"
    events: list[RunProgress] = []

    def stop_after_first_unit(ev: RunProgress) -> None:
        events.append(ev)
        if ev.event == "unit_done":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(smoke, out, progress=stop_after_first_unit, max_members=2)
    assert [e.event for e in events if e.event != "step"] == ["plan", "unit_start", "unit_done"]
    first = events[-1].members
    assert len(first) == 2
    assert read_run_meta(out)["status"] == "interrupted"
    m = pd.read_csv(out / "metrics.csv")
    assert set(zip(m.scenario, m.seed)) == set(first)
    assert not list(out.rglob(f"{_io.TMP_PREFIX}*")) and not (out / "run.lock").exists()
    assert not (out / "report.html").exists()
    done_before = {k: (member_dir(out, *k) / "member.json").stat().st_mtime_ns for k in first}

    class Recorder:
        """An executor that runs items in process after a pickle round trip (as a remote worker would)."""

        def __init__(self) -> None:
            self.members: list[tuple[str, int]] = []

        def map(self, fn, items):
            for item in items:
                self.members.extend(item[0].keys)
                yield pickle.loads(pickle.dumps(fn(pickle.loads(pickle.dumps(item)))))

    ex = Recorder()
    summary = run_experiment(smoke, out, executor=ex, max_members=2)
    everyone = [(s.name, seed) for s in smoke.scenarios for seed in smoke.train.seeds]
    assert sorted(ex.members) == sorted(set(everyone) - set(first))  # finished members were not re-run
    assert summary.members_skipped == 2 and summary.members_run == 3 and summary.complete
    assert {k: (member_dir(out, *k) / "member.json").stat().st_mtime_ns for k in first} == done_before
    m = pd.read_csv(out / "metrics.csv")
    assert not m.duplicated(KEY).any()
    # the same numbers as the uninterrupted run (members train independently of their group)
    ref = pd.read_csv(smoke_run[0] / "metrics.csv")
    assert m[KEY].values.tolist() == ref[KEY].values.tolist()
    assert np.allclose(m.value, ref.value, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert read_run_meta(out)["status"] == "complete" and (out / "report.html").is_file()


def test_interrupt_inside_a_unit_records_nothing_half_done(tmp_path, smoke):
    exp = with_overrides(smoke, {"train.steps": 20, "train.log_every": 10})
    out = tmp_path / "run"

    def stop_mid_unit(ev: RunProgress) -> None:
        if ev.event == "step" and ev.step >= 10:
            raise Interrupt("simulated crash")

    with pytest.raises(Interrupt):
        run_experiment(exp, out, progress=stop_mid_unit)
    assert (out / "config.toml").is_file() and read_run_meta(out)["status"] == "interrupted"
    assert not (out / "parts").exists() or not any((out / "parts").rglob("member.json"))
    assert not list(out.rglob(f"{_io.TMP_PREFIX}*"))
    summary = run_experiment(exp, out, report=False)
    assert summary.members_run == 5 and summary.complete
    m = pd.read_csv(out / "metrics.csv")
    assert not m.duplicated(KEY).any() and set(m.step) == {0, 10, 20}


def test_resume_false_starts_over(tmp_path, smoke):
    exp = with_overrides(smoke, {"train.steps": 10, "train.log_every": 10, "train.seeds": [0]})
    out = tmp_path / "run"
    run_experiment(exp, out, report=False)
    stamp = (member_dir(out, exp.scenarios[0].name, 0) / "member.json").stat().st_mtime_ns
    summary = run_experiment(exp, out, resume=False, report=False)
    assert summary.members_run == 5 and summary.members_skipped == 0
    assert (member_dir(out, exp.scenarios[0].name, 0) / "member.json").stat().st_mtime_ns != stamp
    assert not pd.read_csv(out / "metrics.csv").duplicated(KEY).any()


# ----------------------------------------------------------------------------- refusing


def test_refuses_a_directory_with_another_config(smoke_run, smoke):
    out, _ = smoke_run
    other = with_overrides(smoke, {"train.steps": 30})
    before = snapshot(out)
    with pytest.raises(InitlabError) as e:
        run_experiment(other, out)
    msg = str(e.value)
    assert "holds another experiment" in msg and "train.steps: 60 -> 30" in msg
    assert config_fingerprint(smoke)[:12] in msg and config_fingerprint(other)[:12] in msg
    assert snapshot(out) == before
    # also with resume=False: a different experiment is never cleared
    with pytest.raises(InitlabError, match="holds another experiment"):
        run_experiment(other, out, resume=False)
    assert snapshot(out) == before


def test_same_config_under_another_name_resumes(smoke_run, smoke):
    # the fingerprint ignores labels: a renamed copy of the experiment is the same experiment
    out, _ = smoke_run
    renamed = with_overrides(smoke, {"name": "smoke-renamed"})
    summary = run_experiment(renamed, out, report=False)
    assert summary.members_run == 0
    run_experiment(smoke, out, report=False)  # restore the name in config.toml


def test_same_config_under_an_old_fingerprint_is_refused_clearly(smoke_run, smoke, tmp_path):
    # a run directory written when fingerprints were computed differently: same settings, other fingerprint
    out = tmp_path / "old"
    shutil.copytree(smoke_run[0], out)
    meta = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**meta, "fingerprint": "0" * 64}))
    with pytest.raises(InitlabError, match="holds the same experiment, recorded by an earlier initlab") as e:
        run_experiment(smoke, out, report=False)
    assert "000000000000" in str(e.value) and "another --out" in str(e.value)


def test_refuses_a_non_run_directory(tmp_path, smoke):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "thesis.txt").write_text("precious")
    with pytest.raises(InitlabError, match="not an initlab run directory"):
        run_experiment(smoke, d)
    assert sorted(p.name for p in d.iterdir()) == ["thesis.txt"]
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InitlabError, match="not a directory"):
        run_experiment(smoke, f)


def test_bad_data_root_writes_nothing(tmp_path, smoke):
    exp = with_overrides(smoke, {"data.root": str(tmp_path / "no-such-mnist")})
    with pytest.raises(InitlabError):
        run_experiment(exp, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_live_lock_is_respected_and_a_stale_one_taken_over(tmp_path, smoke):
    import os
    import subprocess
    import sys

    exp = with_overrides(smoke, {"train.steps": 10, "train.log_every": 10, "train.seeds": [0]})
    out = tmp_path / "run"
    out.mkdir()
    holder = ("import sys, time; from pathlib import Path; from initlab.lab.rundir import lock\n"
              "with lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(InitlabError, match=f"pid {child.pid}"):
            run_experiment(exp, out, report=False)
    finally:
        child.kill()  # kill -9: the lock file stays behind, the OS lock goes with the process
        child.wait()
    assert (out / "run.lock").exists()
    summary = run_experiment(exp, out, report=False)
    assert summary.complete and not (out / "run.lock").exists()


# ----------------------------------------------------------------------------- executors


def test_thread_pool_executor_gives_the_same_results(tmp_path, smoke, smoke_run):
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path / "run"
    with ThreadPoolExecutor(max_workers=1) as ex:
        run_experiment(smoke, out, executor=ex, max_members=3, report=False)
    m = pd.read_csv(out / "metrics.csv")
    ref = pd.read_csv(smoke_run[0] / "metrics.csv")
    assert m[KEY].values.tolist() == ref[KEY].values.tolist()
    assert np.allclose(m.value, ref.value, rtol=1e-4, atol=1e-5, equal_nan=True)


# ----------------------------------------------------------------------------- atomic files


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    p = tmp_path / "a.csv"
    _io.atomic_write_csv(p, [{"x": 1, "y": 0.5}], ["x", "y"])
    assert p.read_text() == "x,y\n1,0.5\n"

    class Boom:
        def get(self, key):
            raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        _io.atomic_write_csv(p, [{"x": 2, "y": 1.0}, Boom()], ["x", "y"])
    assert p.read_text() == "x,y\n1,0.5\n"
    assert [q.name for q in tmp_path.iterdir()] == ["a.csv"]
    cols, rows = _io.read_csv(p)
    assert cols == ["x", "y"] and rows == [{"x": "1", "y": "0.5"}]


def test_csv_floats_round_trip_exactly(tmp_path):
    vals = [0.1, 1 / 3, 1e-300, float("nan"), 12345.678901234567]
    _io.atomic_write_csv(tmp_path / "f.csv", [{"v": v} for v in vals], ["v"])
    back = [float(r["v"]) for r in _io.read_csv(tmp_path / "f.csv")[1]]
    assert all((a == b) or (math.isnan(a) and math.isnan(b)) for a, b in zip(vals, back))


def test_atomic_dir_is_all_or_nothing(tmp_path):
    target = tmp_path / "unit"
    with pytest.raises(ValueError):
        with _io.atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise ValueError("interrupted")
    assert not target.exists() and not list(tmp_path.iterdir())
    with _io.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(FileExistsError):
        with _io.atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("two")
    with _io.atomic_dir(target, replace=True) as tmp:
        (tmp / "a.txt").write_text("two")
    assert (target / "a.txt").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["unit"]


def test_clean_tmp_removes_leftovers_only(tmp_path):
    (tmp_path / "keep.csv").write_text("x")
    (tmp_path / f"{_io.TMP_PREFIX}abc.part").write_text("half")
    (tmp_path / "sub" / f"{_io.TMP_PREFIX}dir").mkdir(parents=True)
    assert _io.clean_tmp(tmp_path) == 2
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["keep.csv", "sub"]


def test_slug_is_safe_and_injective():
    assert _io.slug("relu-he") == "relu-he"
    names = ["a/b", "a_b", "a b", "../x", ".hidden"]
    slugs = [_io.slug(n) for n in names]
    assert len(set(slugs)) == len(names)
    assert all("/" not in s and not s.startswith(".") for s in slugs)
    assert Counter(slugs).most_common(1)[0][1] == 1


@pytest.mark.parametrize("preset", ["classic", "he-cnn"])
def test_memory_estimate_is_the_same_from_a_cpu_pass_and_a_meta_pass(preset, monkeypatch):
    """Small models count their activations with a one-example CPU pass (the first meta-device pass
    costs about a second per process); the estimate equals the meta pass's."""
    from initlab.lab.training import plan
    from initlab.lab.training.plan import group_memory, plan_groups
    groups = plan_groups(load_experiment(preset))
    cpu = [group_memory(g) for g in groups]
    monkeypatch.setattr(plan, "_CPU_COUNT_BYTES", 0)
    meta = [group_memory(g) for g in groups]
    assert cpu == meta and all(v > 0 for v in cpu)
