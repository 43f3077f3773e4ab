"""``initlab tune``: the search space and its errors, the missing-Ray path, and a tiny search on a
real local Ray (marked ``ray``) whose designed trial ASHA must stop."""
from __future__ import annotations

import csv
import math
import sys

import pytest

from initlab._errors import InitlabError
from initlab.cli import main
from initlab.lab.config import experiment_from_dict, load_experiment
from initlab.lab.tune import import_ray, parse_dist, parse_param, run_tune, search_from_dict, search_table
from initlab.lab.tune.results import critical_value, sigma_w2
from initlab.lab.tune.trial import objective


BASE = {
    "name": "tiny",
    "data": {"name": "mnist", "limit": 600},
    "model": {"widths": [784, 16, 16, 10]},
    "train": {"steps": 40, "log_every": 10, "batch_size": 32, "seeds": [0]},
    "scenarios": [{"name": "tanh-normal", "activation": "tanh", "scheme": "normal"}],
}


TINY_TOML = """
[data]
name = "mnist"
limit = 600
[model]
widths = [784, 16, 16, 10]
[train]
steps = 40
log_every = 10
seeds = [0]
[[scenarios]]
activation = "tanh"
scheme = "normal"
"""


def exp_of(**changes):
    return experiment_from_dict({**BASE, **changes})


# ----------------------------------------------------------------------------- the search space


def test_distributions_parse():
    assert parse_dist("loguniform(0.25, 4)", "k").args == (0.25, 4.0)
    assert parse_dist(" grid(1, 2,3) ", "k").kind == "grid"
    assert parse_param("scheme.std=uniform(0.1,2)") == ("scheme.std", parse_dist("uniform(0.1,2)", "k"))
    s = search_from_dict({"params": {"scheme.std": "loguniform(0.1, 3)"}, "samples": 4, "metric": "test_acc"}, exp_of())
    assert (s.samples, s.metric, s.mode, s.keys) == (4, "test_acc", "max", ("scheme.std",))
    assert search_from_dict({"params": {"train.lr": "loguniform(1e-4, 1e-2)"}}, exp_of()).mode == "min"


@pytest.mark.parametrize("raw, needle", [
    ({"params": {"scheme.std": "logunifrm(1, 2)"}}, "unknown distribution 'logunifrm'; did you mean 'loguniform'"),
    ({"params": {"scheme.std": "loguniform(0, 2)"}}, "tune.params.scheme.std: loguniform(a, b) needs 0 < a"),
    ({"params": {"scheme.std": "uniform(3, 2)"}}, "needs a < b, got a = 3, b = 2"),
    ({"params": {"scheme.std": "uniform(1)"}}, "takes two numbers, got 1"),
    ({"params": {"scheme.std": "uniform(1, x)"}}, "expected a number, got 'x'"),
    ({"params": {"scheme.std": "randint(1.5, 4)"}}, "randint(a, b) needs integers"),
    ({"params": {"scheme.std": "choice()"}}, "choice(...) needs at least one value"),
    ({"params": {"scheme.std": 3}}, "expected a distribution such as 'loguniform(0.25, 4)', got int 3"),
    ({"params": {"scheme.factor": "uniform(1, 2)"}}, "scheme 'normal' has no parameter 'factor'; its parameters: std, mean"),
    ({"params": {"train.steps": "randint(1, 9)"}}, "unknown training setting to search 'steps'"),
    ({"params": {"model.width": "randint(1, 9)"}}, "expected 'scheme.<parameter>' or 'train.<setting>'"),
    ({"params": {}}, "tune.params: nothing to search"),
    ({"params": {"scheme.std": "uniform(1, 2)"}, "metric": "test_los"}, "unknown metric 'test_los'; did you mean 'test_loss'"),
    ({"params": {"scheme.std": "uniform(1, 2)"}, "samplez": 3}, "samplez"),
    ({"params": {"scheme.std": "uniform(1, 2)"}, "samples": 0}, "tune.samples"),
    ({"params": {"scheme.std": "uniform(1, 2)"}, "grace_period": 99}, "tune.grace_period: expected at most train.steps (40)"),
])
def test_bad_search_input_is_one_line(raw, needle):
    with pytest.raises(InitlabError) as e:
        search_from_dict(raw, exp_of())
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_param_is_one_line(capsys, tmp_path):
    rc = main(["tune", "smoke", "--param", "scheme.std=loguniform(0.1)", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "loguniform(a, b) takes two numbers, got 1" in err
    assert not (tmp_path / "o").exists()


def test_missing_ray_is_one_line(monkeypatch, capsys, tmp_path):
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(InitlabError, match=r"pip install 'initlab\[ray\]'"):
        import_ray()
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_TOML)
    rc = main(["tune", str(cfg), "--param", "scheme.std=loguniform(0.1,2)", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "pip install 'initlab[ray]'" in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_out_dir_holding_something_else_is_refused(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    table = {"params": {"scheme.std": "uniform(0.5, 1)"}}
    with pytest.raises(InitlabError, match="is not empty and holds no initlab search"):
        run_tune(exp_of(), table, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_the_edge_tanh_preset_searches_sigma_w2_around_the_critical_line():
    exp = load_experiment("edge_tanh")  # initlab run ignores the [tune] table
    search = search_from_dict(search_table("edge_tanh"), exp)
    sc = exp.scenarios[0]
    assert search.keys == ("scheme.factor",) and sc.model.depth == 50 and sc.activation == "tanh"
    lo, hi = dict(search.params)["scheme.factor"].bounds
    crit = critical_value(sc, "scheme.factor")
    assert crit == pytest.approx(1.0, rel=1e-6) and lo < crit < hi


# ----------------------------------------------------------------------------- objective and theory


def test_objective_mean_over_seeds_and_diverged_is_worst():
    rows = [dict(seed=s, step=10, split="test", metric="loss", value=v) for s, v in ((0, 1.0), (1, 3.0))]
    assert objective(rows, 10, "test_loss", [0, 1], "min") == 2.0
    rows[1]["value"] = math.nan
    assert objective(rows, 10, "test_loss", [0, 1], "min") == math.inf
    assert objective(rows, 10, "test_acc", [0, 1], "max") == -math.inf  # no acc rows: worst


def test_critical_value_maps_the_parameter_to_sigma_w2():
    exp = experiment_from_dict({**BASE, "scenarios": [
        {"name": "f", "activation": "tanh", "scheme": "tf1_variance_scaling", "params": {"uniform": True}},
        {"name": "g", "activation": "tanh", "scheme": "xavier_normal"},
        {"name": "r", "activation": "relu", "scheme": "normal"}]})
    f, g, r = exp.scenarios
    assert sigma_w2(f, "factor", 1.7) == pytest.approx(1.7, rel=1e-12)  # Var = factor / fan_in
    assert critical_value(f, "scheme.factor") == pytest.approx(1.0, rel=1e-6)  # tanh, sb2 = 0
    assert critical_value(g, "scheme.gain") == pytest.approx(1.0, rel=1e-6)  # square layers: sw2 = gain^2
    assert critical_value(r, "scheme.std") == pytest.approx(math.sqrt(2 / 16), rel=1e-6)  # std^2 * N = 2
    assert critical_value(f, "train.lr") is None


# ----------------------------------------------------------------------------- a real search


# ``local_ray`` (tests/conftest.py): Ray on 127.0.0.1 with one CPU in this process, shared with tests/test_tune_resume.py


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.ray
def test_tiny_search_end_to_end_and_asha_stops_the_bad_trial(local_ray, tmp_path):
    # designed case: trials run one at a time in grid order; the second (N(0, 30^2) weights, a saturated
    # tanh net with logits ~100) reaches the first rung (step 10) with a test loss far above the first's
    # (N(0, 0.5^2)), so ASHA (reduction factor 2: the cutoff is the first trial's value) stops it there.
    exp = exp_of()
    table = {"params": {"scheme.std": "grid(0.5, 30)"}, "samples": 1, "grace_period": 10, "reduction_factor": 2,
             "max_concurrent": 1}
    s = run_tune(exp, table, tmp_path / "t")
    rows = read_rows(s.table)
    assert [r["scheme.std"] for r in rows] == ["0.5", "30.0"]
    assert [r["stopped_early"] for r in rows] == ["false", "true"]
    assert [int(r["step"]) for r in rows] == [40, 10]
    assert float(rows[1]["objective"]) > 10 * float(rows[0]["objective"])
    assert s.best["tanh-normal"]["scheme.std"] == 0.5
    assert s.figure.stat().st_size > 10_000 and (tmp_path / "t" / "tune.json").is_file()
    metrics = read_rows(s.run_dir / "metrics.csv")
    last = {sc: max(int(r["step"]) for r in metrics if r["scenario"] == sc) for sc in {r["scenario"] for r in metrics}}
    assert last == {rows[0]["scenario"]: 40, rows[1]["scenario"]: 10}
    assert (s.run_dir / "first_pass.csv").is_file() and (s.run_dir / "report.html").is_file()
    # the same search again on the same directory: Tune restores the finished search, same table
    before = s.table.read_bytes()
    again = run_tune(exp, table, tmp_path / "t")
    assert again.table.read_bytes() == before
    # another search in that directory is refused
    with pytest.raises(InitlabError, match="holds another search"):
        run_tune(exp, {**table, "seed": 1}, tmp_path / "t")
