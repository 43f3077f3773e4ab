"""init.csv (the init report's per-layer numbers: LSUV's iterations) and layer_histograms.csv (activations and
back-propagated gradients per layer over training): what they hold, the same through every executor and after
an interruption, the claim quantity on them, and their figures."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from initlab.lab.claims import judge, measure
from initlab.lab.config import load_experiment
from initlab.lab.executors import ProcessPool
from initlab.lab.run import run_experiment
from initlab.lab.specs import Claim
from initlab.lab.training import plan_groups
from initlab.lab.training.plan import first_pass_indices, init_member_report
from initlab.lab.training.records import (HIST_BINS, histogram_edges, histogram_rows, histogram_steps,
                                          init_report_rows, nice_ceil)

from rundir_compare import KillOnce, compare_run_dirs

pytestmark = pytest.mark.usefixtures("fixed_threads")

MAX_MEMBERS = 2  # 4 members -> 2 units
WIDTH = 32
TOML = f"""
name = "records"
description = "tiny tanh MLP: LSUV vs xavier, per-layer statistics on"

[data]
name = "mnist"

[model]
kind = "mlp"
widths = [784, {WIDTH}, {WIDTH}, {WIDTH}, 10]

[train]
optimizer = "sgd"
lr = 0.05
batch_size = 20
steps = 40
log_every = 10
first_pass_batch = 100
seeds = [0, 1]
layer_stats = true

[[scenarios]]
name = "tanh-lsuv"
activation = "tanh"
scheme = "lsuv"

[[scenarios]]
name = "tanh-xavier"
activation = "tanh"
scheme = "xavier_uniform"
"""


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "records.toml"
    path.write_text(TOML, encoding="utf-8")
    return load_experiment(path)


@pytest.fixture(scope="module")
def reference(exp, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    summary = run_experiment(exp, out, max_members=MAX_MEMBERS, report=False)
    assert summary.complete
    return out


def _frame(path: Path):
    import pandas as pd

    return pd.read_csv(path)


# ----------------------------------------------------------------------------- helpers


def test_histogram_steps_are_step_0_and_three_log_steps_with_the_last():
    assert histogram_steps(40, 10) == {0, 20, 30, 40}
    assert histogram_steps(100, 50) == {0, 50, 100}
    assert histogram_steps(1000, 100) == {0, 400, 700, 1000}
    assert histogram_steps(45, 10) == {0, 20, 40, 45}  # the last step is logged even off the grid
    assert histogram_steps(0, 10) == {0}


def test_bins_are_nice_and_cover_the_values():
    assert [nice_ceil(x) for x in (0.0, -1.0, 0.9999, 1.0, 1.01, 3e-4, 0.07)] == [0.0, 0.0, 1.0, 1.0, 2.0, 5e-4, 0.1]
    tanh = [np.tanh(np.random.default_rng(0).normal(size=1000) * 3)]
    edges = histogram_edges(tanh)
    assert edges[0] == -1.0 and edges[-1] == 1.0 and len(edges) == HIST_BINS + 1
    relu = [np.abs(np.random.default_rng(1).normal(size=100)) * 3]
    edges = histogram_edges(relu)
    assert edges[0] == 0.0 and edges[-1] >= relu[0].max()
    assert histogram_edges([np.zeros(3)])[[0, -1]].tolist() == [-1.0, 1.0]


def test_histogram_rows_count_every_finite_value_once():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(50, 8)), rng.normal(size=(50, 8)) * 0.1
    b[0, 0] = np.nan
    rows, tb = histogram_rows({"activation": [a, b], "gradient": [a * 1e-4]}, "s", 3, 7)
    by = {}
    for r in rows:
        by.setdefault((r["quantity"], r["layer"]), []).append(r)
    assert sorted(by) == [("activation", 1), ("activation", 2), ("gradient", 1)]
    assert sum(r["count"] for r in by[("activation", 1)]) == 400
    assert sum(r["count"] for r in by[("activation", 2)]) == 399  # the NaN is left out
    assert all(len(v) == HIST_BINS for v in by.values())
    # both layers of a quantity share their bins; TensorBoard gets the same counts
    assert [r["lo"] for r in by[("activation", 1)]] == [r["lo"] for r in by[("activation", 2)]]
    assert tb["activations/layer2"]["bucket"] == [r["count"] for r in by[("activation", 2)]]
    assert tb["gradients/layer1"]["num"] == 400 and rows[0]["scenario"] == "s" and rows[0]["step"] == 7


# ----------------------------------------------------------------------------- the run directory


def test_init_csv_holds_lsuvs_iterations_per_layer(exp, reference):
    init = _frame(reference / "init.csv")
    assert list(init.columns) == ["scenario", "seed", "source", "index", "layer", "quantity", "value"]
    assert set(init["scenario"]) == {"tanh-lsuv"}  # xavier reports nothing per layer
    assert set(init["source"]) == {"lsuv"}
    assert {"iterations", "variance", "converged"} <= set(init["quantity"])
    # the same numbers as the LSUV report of the member's own init on its first-pass batch
    from initlab.lab.data import load_dataset

    data = load_dataset(exp.data)
    for seed in (0, 1):
        mem = next(m for g in plan_groups(exp) for m in g.members if m.key == ("tanh-lsuv", seed))
        idx = first_pass_indices(seed, int(data.x_train.shape[0]), exp.train.first_pass_batch)
        _, report = init_member_report(mem.scenario, seed, batch=data.x_train.index_select(0, idx).float())
        want = [r["iterations"] for r in report.extra["lsuv"].rows]
        got = init[(init["seed"] == seed) & (init["quantity"] == "iterations")].sort_values("index")
        assert got["value"].tolist() == [float(w) for w in want] and len(want) == 4
        assert init_report_rows(report, "tanh-lsuv", seed)[0]["layer"] == str(got["layer"].iloc[0])


def test_layer_histograms_csv_has_every_member_step_quantity_and_hidden_layer(reference):
    h = _frame(reference / "layer_histograms.csv")
    assert list(h.columns) == ["scenario", "seed", "step", "quantity", "layer", "lo", "hi", "count"]
    sizes = h.groupby(["scenario", "seed", "step", "quantity", "layer"])["count"].agg(["size", "sum"])
    assert len(sizes) == 2 * 2 * 4 * 2 * 3  # scenarios x seeds x steps {0, 20, 30, 40} x quantities x hidden layers
    assert set(h["step"]) == {0, 20, 30, 40}
    assert (sizes["size"] == HIST_BINS).all()
    assert (sizes["sum"] == 100 * WIDTH).all()  # every value of the 100-example batch, once
    tanh = h[h["quantity"] == "activation"]
    assert tanh["lo"].min() >= -1.0 and tanh["hi"].max() <= 1.0


def test_process_pool_after_a_killed_worker_writes_the_same_records(exp, reference, tmp_path):
    kill = KillOnce(at_step=20)
    out = tmp_path / "pool"
    summary = run_experiment(exp, out, max_members=MAX_MEMBERS, report=False, progress=kill,
                             executor=ProcessPool(2), checkpoint_every=0)
    assert len(kill.killed) == 1 and summary.complete and not summary.failed
    compared, diffs = compare_run_dirs(reference, out)
    assert compared == 4 + 4 and diffs == []  # 4 CSV files (claims.csv: none) + 4 members' TensorBoard logs


class _StopAt:
    """Interrupts the run (as Ctrl-C does) once the second unit reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step, self.units = step, set()

    def __call__(self, ev) -> None:
        if ev.event == "unit_done":
            self.units.add(ev.unit)
        if ev.event == "step" and ev.step >= self.step and self.units:
            raise KeyboardInterrupt


def test_an_interrupted_run_resumes_to_the_same_records_and_tensorboard(exp, reference, tmp_path):
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, out, max_members=MAX_MEMBERS, report=False, progress=_StopAt(30), checkpoint_every=0)
    assert any((out / "checkpoints").glob("*.pt"))  # the second unit continues from step 30
    summary = run_experiment(exp, out, max_members=MAX_MEMBERS, report=False)
    assert summary.complete and summary.members_skipped == 2
    assert compare_run_dirs(reference, out) == (8, [])
    from tensorboard.compat.proto import summary_pb2

    from rundir_compare import tb_events

    for member, counter in tb_events(out).items():
        steps = {}
        for step, raw in counter:
            steps.setdefault(summary_pb2.Summary.Value.FromString(raw).tag, set()).add(step)
        assert steps["activations/layer1"] == steps["gradients/layer3"] == {0, 20, 30, 40}, member


def test_the_comparison_sees_a_changed_histogram(reference, tmp_path):
    """Negative control: one count moved from one bin to the next is a difference."""
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    h = _frame(copy / "layer_histograms.csv")
    i = int(np.flatnonzero(h["count"].to_numpy() > 0)[0])
    h.loc[i, "count"] -= 1
    h.loc[i + 1, "count"] += 1
    h.to_csv(copy / "layer_histograms.csv", index=False)
    assert compare_run_dirs(reference, copy)[1] == ["layer_histograms.csv"]


# ----------------------------------------------------------------------------- the claim quantity


class _Data:
    def __init__(self, init):
        self.init = init


def _init_frame(iterations_by_seed):
    import pandas as pd

    rows = [{"scenario": "a", "seed": s, "source": "lsuv", "index": i, "layer": f"l{i}", "quantity": "iterations",
             "value": float(v)} for s, its in iterations_by_seed.items() for i, v in enumerate(its, start=1)]
    return pd.DataFrame(rows)


CLAIM = Claim(id="few", source="Mishkin & Matas 2016", claim="at most 2 iterations per layer", quantity="init_max",
              args=(("scenario", "a"), ("quantity", "iterations")), expect="below", value=2.5, test="every_seed")


def test_init_max_reproduces_when_every_layer_needs_at_most_two():
    values = measure(CLAIM, _Data(_init_frame({0: [2, 1, 1], 1: [1, 1, 2], 2: [0, 1, 1]})))
    assert values == {0: 2.0, 1: 2.0, 2: 1.0}
    assert judge([values[s] for s in sorted(values)], CLAIM)[0] == "reproduced"


def test_init_max_negative_control_one_slow_layer_fails_the_claim():
    values = measure(CLAIM, _Data(_init_frame({0: [1, 5, 1], 1: [1, 1, 4], 2: [3, 1, 1]})))
    assert values == {0: 5.0, 1: 4.0, 2: 3.0}
    assert judge([values[s] for s in sorted(values)], CLAIM)[0] == "not reproduced"
    # the layer range is honoured: without the first layer seed 2's max is 1
    first2 = replace(CLAIM, args=(("scenario", "a"), ("quantity", "iterations"), ("first", 2)))
    assert measure(first2, _Data(_init_frame({2: [3, 1, 1]}))) == {2: 1.0}


def test_init_max_on_a_run_without_init_csv_is_inconclusive_not_a_crash():
    from initlab.lab.claims import evaluate_claims

    (row,) = evaluate_claims([CLAIM], _Data(None))
    assert row["verdict"] == "inconclusive" and "init.csv" in row["measured"]


def test_init_max_on_the_run_matches_the_recorded_iterations(reference):
    from initlab.lab.report import load_run

    data = load_run(reference)
    claim = replace(CLAIM, args=(("scenario", "tanh-lsuv"), ("quantity", "iterations")))
    got = measure(claim, data)
    init = _frame(reference / "init.csv")
    its = init[init["quantity"] == "iterations"]
    assert got == {s: float(d["value"].max()) for s, d in its.groupby("seed")}


# ----------------------------------------------------------------------------- figures


def test_density_figures_have_one_panel_per_scenario_and_moment(reference, tmp_path, monkeypatch):
    from initlab.lab.report import figures as F
    from initlab.lab.report import load_run

    drawn = {}
    real_save = F._save

    def save(fig, path):
        drawn[Path(path).name] = len(fig.axes)
        return real_save(fig, path)

    monkeypatch.setattr(F, "_save", save)
    data = load_run(reference)
    out = F.grid_figures(data, tmp_path)
    assert {"activation_densities.png", "gradient_densities.png", "init_iterations.png"} <= set(out)
    for name in ("activation_densities.png", "gradient_densities.png", "init_iterations.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn["activation_densities.png"] == drawn["gradient_densities.png"] == 2 * 2  # 2 scenarios x (init, end)
    assert drawn["init_iterations.png"] == 1
    captions = F.grid_captions()
    assert "Glorot & Bengio 2010, Fig. 7" in captions["gradient_densities.png"]


def test_pooled_density_integrates_to_one_even_when_seeds_bin_differently():
    import pandas as pd

    from initlab.lab.report.figures import pooled_densities

    rows = []
    for seed, (lo, hi) in enumerate([(-1.0, 1.0), (-2.0, 2.0)]):
        edges = np.linspace(lo, hi, 11)
        counts = np.random.default_rng(seed).integers(0, 20, size=10)
        rows += [{"seed": seed, "layer": 1, "lo": a, "hi": b, "count": int(c)}
                 for a, b, c in zip(edges[:-1], edges[1:], counts)]
    dens, n = pooled_densities(pd.DataFrame(rows))
    edges, d = dens[1]
    assert n == 2 and abs(float((d * np.diff(edges)).sum()) - 1.0) < 1e-12
    assert torch.tensor(d).ge(0).all()
