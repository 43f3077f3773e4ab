"""The claims machinery: claims as data in the experiment, quantities, verdicts across seeds, claims.csv and the
report's claims table, `initlab presets` with claims, `--set` overrides and the generated schema."""
from __future__ import annotations

import csv
import math
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from initlab._errors import InitlabError
from initlab.lab import claims as C
from initlab.lab.config import (_MEANINGS, _KEYS_OF, experiment_from_dict, experiment_to_dict, config_fingerprint,
                                parse_set, schema_markdown, with_overrides, load_experiment)
from initlab.lab.specs import Claim, DataSpec, ModelSpec, TrainSpec

ROOT = Path(__file__).resolve().parents[1]


def claim(**kw):
    base = dict(id="c", source="s", claim="text", quantity="final", expect="approx", value=1.0, tolerance=0.1)
    base.update(kw)
    return Claim(**base)


# ----------------------------------------------------------------------------- verdicts


def test_t95_reproduced_not_reproduced_inconclusive():
    c = claim(value=1.0, tolerance=0.1)
    assert C.judge([1.0, 1.01, 0.99], c)[0] == "reproduced"
    assert C.judge([2.0, 2.01, 1.99], c)[0] == "not reproduced"     # negative control: far outside the band
    assert C.judge([0.8, 1.2, 1.0], c)[0] == "inconclusive"          # the interval crosses the band's edge
    assert C.judge([1.0], c)[0] == "inconclusive"                    # one seed: no interval


def test_t95_interval_uses_student_t():
    # mean 1.08, sd 0.02, n = 3: half-width 4.303 * 0.02 / sqrt(3) = 0.0497 -> [1.030, 1.130] crosses 1.1
    assert C.judge([1.06, 1.08, 1.10], claim(value=1.0, tolerance=0.1))[0] == "inconclusive"
    # the same mean with 30 seeds of that spread is inside: half-width 2.045 * 0.0202 / sqrt(30) = 0.0075
    vals = [1.06, 1.08, 1.10] * 10
    assert C.judge(vals, claim(value=1.0, tolerance=0.1))[0] == "reproduced"
    assert C.t_quantile(2) == pytest.approx(4.303) and C.t_quantile(1000) == 1.96


def test_above_below_and_log_scales():
    assert C.judge([0.9, 0.92, 0.91], claim(expect="above", value=0.5))[0] == "reproduced"
    assert C.judge([0.1, 0.12, 0.11], claim(expect="above", value=0.5))[0] == "not reproduced"
    assert C.judge([0.1, 0.12, 0.11], claim(expect="below", value=0.5))[0] == "reproduced"
    c = claim(value=-30, tolerance=1, scale="log2")
    assert C.judge([2.0 ** -30] * 3, claim(value=-30, tolerance=1, scale="log2", test="every_seed"))[0] == "reproduced"
    assert C.judge([2.0 ** -20] * 3, claim(value=-30, tolerance=1, scale="log2", test="every_seed"))[0] == "not reproduced"
    assert C.judge([0.0, -1.0, 1.0], c)[0] == "inconclusive"  # log of non-positive values: not finite
    assert C.expected_text(c) == "log2(x) \u2248 -30 \u00b1 1"


def test_every_seed_mixed_is_inconclusive():
    c = claim(expect="above", value=0.5, test="every_seed")
    assert C.judge([0.6, 0.7], c)[0] == "reproduced"
    assert C.judge([0.6, 0.4], c)[0] == "inconclusive"
    assert C.judge([0.3, 0.4], c)[0] == "not reproduced"
    assert C.judge([0.6, math.nan], c)[0] == "inconclusive"


# ----------------------------------------------------------------------------- claims as data


def test_claim_validation_is_one_line():
    with pytest.raises(InitlabError, match="expect.*Valid expects: above, approx, below"):
        claim(expect="equal")
    with pytest.raises(InitlabError, match="tolerance"):
        claim(expect="approx", tolerance=0)
    with pytest.raises(InitlabError, match="scale"):
        claim(scale="ln")
    d = {"scenarios": [{"activation": "relu", "scheme": "he_normal"}],
         "claims": [{"id": "a", "source": "s", "claim": "c", "quantity": "final", "expect": "above", "value": 0.5,
                     "colour": "red"}]}
    with pytest.raises(InitlabError, match=r"claims\[0\].*colour"):
        experiment_from_dict(d)
    d["claims"][0].pop("colour")
    exp = experiment_from_dict(d)
    assert exp.claims[0].id == "a"
    assert experiment_from_dict(experiment_to_dict(exp)) == exp
    # claims say what is checked, not what is trained: the fingerprint ignores them
    assert config_fingerprint(exp) == config_fingerprint(experiment_from_dict({k: v for k, v in d.items() if k != "claims"}))


def test_unknown_quantity_and_bad_arguments_are_inconclusive_rows():
    class Data:
        metrics = first_pass = None
    rows = C.evaluate_claims([claim(quantity="nope"), claim(id="d", args={"scenario": "x", "colour": 1})], Data())
    assert [r["verdict"] for r in rows] == ["inconclusive", "inconclusive"]
    assert "unknown claim quantity 'nope'" in rows[0]["measured"]
    assert "rejects the arguments" in rows[1]["measured"]


def test_register_quantity_is_one_function():
    def twice(data, k):
        """Two times k, per seed."""
        return {0: 2 * k, 1: 2 * k}
    C.register_quantity("twice", twice)
    try:
        assert C.quantities()["twice"] == "Two times k, per seed."
        with pytest.raises(InitlabError):
            C.register_quantity("twice", twice)
        rows = C.evaluate_claims([claim(quantity="twice", args={"k": 0.5}, value=1.0, test="every_seed")], None)
        assert rows[0]["verdict"] == "reproduced" and rows[0]["measured"] == "1, 1"
    finally:
        C.unregister_quantity("twice")
    assert "twice" not in C.quantities()


def test_quantities_on_frames():
    pd = pytest.importorskip("pandas")

    class Data:
        metrics = pd.DataFrame([dict(scenario=s, seed=k, step=st, split="test", metric="acc", value=v + 0.01 * k)
                                for s, v0 in (("a", 0.5), ("b", 0.2)) for k in range(3)
                                for st, v in ((0, 0.1), (10, v0))])
        first_pass = pd.DataFrame([dict(scenario="a", seed=k, index=i, pre_var=0.5 ** i, jac=1.0)
                                   for k in range(3) for i in range(1, 6)])
    assert C.q_final(Data, "a") == pytest.approx({0: 0.5, 1: 0.51, 2: 0.52})
    assert C.q_at_step(Data, "a", 5) == pytest.approx({0: 0.1, 1: 0.11, 2: 0.12})
    assert C.q_final_difference(Data, "a", "b") == pytest.approx({0: 0.3, 1: 0.3, 2: 0.3})
    assert C.q_layer_factor(Data, "a", "pre_var", 1, -1) == pytest.approx({0: 0.5, 1: 0.5, 2: 0.5})
    assert C.q_first_pass_ratio(Data, "a", "pre_var", layer=-1, over_layer=1) == pytest.approx({0: 1 / 16} | {1: 1 / 16, 2: 1 / 16})
    assert C.q_layer_spread(Data, "a", "pre_var") == pytest.approx({0: 16.0, 1: 16.0, 2: 16.0})
    assert C.q_layer_mean(Data, "a", "jac") == {0: 1.0, 1: 1.0, 2: 1.0}
    with pytest.raises(InitlabError, match="no row with scenario = 'zz'"):
        C.q_final(Data, "zz")


def test_claims_csv_columns():
    text = C.claims_csv([{"claim_id": "x", "verdict": "reproduced"}])
    header, row = list(csv.reader(text.splitlines()))
    assert tuple(header) == C.CLAIMS_COLUMNS and row[0] == "x" and row[6] == "reproduced"


# ----------------------------------------------------------------------------- --set and the schema


def test_parse_set_reads_toml_values():
    assert parse_set(["train.lr=0.01", "model.hidden=[50, 50]", "data.name=gaussian", "train.layer_stats=true"]) == {
        "train.lr": 0.01, "model.hidden": [50, 50], "data.name": "gaussian", "train.layer_stats": True}
    with pytest.raises(InitlabError, match="KEY=VALUE"):
        parse_set(["train.lr"])
    exp = with_overrides(load_experiment("smoke"), parse_set(["train.optimizer=\"sgd\"", "train.momentum=0.9"]))
    assert exp.train.momentum == 0.9
    with pytest.raises(InitlabError, match="train.lr: expected a number"):
        with_overrides(exp, parse_set(["train.lr=fast"]))
    with pytest.raises(InitlabError, match="train.momentum"):
        with_overrides(load_experiment("smoke"), parse_set(["train.momentum=0.9"]))  # adam has no momentum


def test_schema_doc_cannot_drift():
    assert (ROOT / "docs" / "schema.md").read_text(encoding="utf-8") == schema_markdown(), \
        "docs/schema.md is stale: regenerate it with initlab.lab.config.schema_markdown()"
    documented = {(t, k) for t, k, _, _ in _MEANINGS}
    keys = {(t, k) for t, ks in _KEYS_OF.items() for k in ks if not (t == "" and k in _KEYS_OF)}
    assert documented == keys
    for table, cls in (("data", DataSpec), ("model", ModelSpec), ("train", TrainSpec), ("claims", Claim)):
        assert {f.name for f in fields(cls)} <= {k for t, k in documented if t == table}


def test_cli_set_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "initlab.cli", "run", "smoke", "--out", str(tmp_path / "x"),
                        "--set", "train.lr=-1"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.lr" in lines[0], r.stderr
    assert not (tmp_path / "x").exists()


def _synthetic_run(run_dir, ratio_of, seeds=(0, 1, 2), layers=31):
    """A run directory of the he-cnn preset's 30-layer pair whose first-pass pre_var ratio Xavier/He at layer l is
    ``ratio_of(l, seed)`` (He: pre_var 1 + l/100 at every layer), loaded as the report loads it."""
    import numpy as np

    from initlab.lab.config import experiment_to_toml
    from initlab.lab.report.load import load_run

    exp = load_experiment("he-cnn")
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(experiment_to_toml(exp), encoding="utf-8")
    with (run_dir / "metrics.csv").open("w", encoding="utf-8") as f:
        f.write("scenario,seed,step,split,metric,value\n")
        f.writelines(f"{sc},{k},300,test,acc,0.5\n" for sc in ("relu-xavier-d30", "relu-he-d30") for k in seeds)
    rng = np.random.default_rng(0)
    rows = ["scenario,seed,scheme,index,pre_var"]
    for k in seeds:
        for i in range(1, layers + 1):
            he = 1.0 + i / 100
            rows.append(f"relu-he-d30,{k},he_normal,{i},{he!r}")
            rows.append(f"relu-xavier-d30,{k},xavier_normal,{i},"
                        f"{he * ratio_of(i, k) * (1 + 1e-7 * rng.standard_normal())!r}")
    (run_dir / "first_pass.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return load_run(run_dir), [c for c in exp.claims if c.id.startswith("variance-ratio")]


def test_first_pass_slope_on_a_synthetic_run(tmp_path):
    pytest.importorskip("pandas")

    def he_cnn(i, k):  # He et al.'s ratio: 9/45 at layer 1, then x1/2 per layer; the readout (31): fans 3136+10
        return 0.2 * 0.5 ** (min(i, 30) - 1) * (3136 / 3146 if i == 31 else 1.0)

    data, claims = _synthetic_run(tmp_path / "good", he_cnn)
    slope = C.q_first_pass_slope(data, "relu-xavier-d30", "pre_var", over_scenario="relu-he-d30", first=1, last=30)
    assert slope == pytest.approx({0: -1.0, 1: -1.0, 2: -1.0}, abs=1e-6)
    # without over_scenario: the slope of log2(pre_var) itself (He's 1 + l/100: log2 grows by ~0.012 per layer)
    own = C.q_first_pass_slope(data, "relu-he-d30", "pre_var", first=1, last=30)[0]
    assert 0.01 < own < 0.015
    rows = {r["claim_id"]: r for r in C.evaluate_claims(claims, data)}
    assert rows["variance-ratio-half-per-layer"]["verdict"] == "reproduced", rows
    assert rows["variance-ratio-layer-1"]["verdict"] == "reproduced", rows
    # negative control 1: x0.55 per layer (slope log2 0.55 = -0.86) is not -1
    data, claims = _synthetic_run(tmp_path / "slower", lambda i, k: 0.2 * 0.55 ** (i - 1))
    rows = {r["claim_id"]: r for r in C.evaluate_claims(claims, data)}
    assert rows["variance-ratio-half-per-layer"]["verdict"] == "not reproduced", rows
    # negative control 2: the layer-30 value right (0.2 * 2^-29) but reached in one jump, not per layer
    data, claims = _synthetic_run(tmp_path / "jump", lambda i, k: 0.2 * (0.5 ** 29 if i >= 30 else 1.0))
    assert C.q_first_pass_ratio(data, "relu-xavier-d30", "pre_var", layer=30, over_scenario="relu-he-d30")[0] == \
        pytest.approx(0.2 * 0.5 ** 29, rel=1e-5)
    rows = {r["claim_id"]: r for r in C.evaluate_claims(claims, data)}
    assert rows["variance-ratio-half-per-layer"]["verdict"] == "not reproduced", rows
    # fewer than two finite layers: NaN, so the claim is inconclusive, never a crash
    assert math.isnan(C.q_first_pass_slope(data, "relu-he-d30", "pre_var", first=3, last=3)[0])


# ----------------------------------------------------------------------------- a run with claims


def test_run_writes_claims_csv_and_the_report_opens_with_them(tmp_path):
    from initlab.lab.run import run_experiment

    d = {"name": "tiny", "data": {"name": "mnist", "limit": 400}, "model": {"widths": [784, 16, 10]},
         "train": {"steps": 20, "log_every": 10, "seeds": 2, "first_pass_batch": 50},
         "scenarios": [{"name": "relu-he", "activation": "relu", "scheme": "he_normal"}],
         "claims": [{"id": "ok", "source": "s", "claim": "Var(w) = 2/16 in layer 2", "quantity": "first_pass",
                     "args": {"scenario": "relu-he", "column": "weight_var", "layer": 2}, "expect": "approx",
                     "value": 0.125, "tolerance": 0.05, "test": "every_seed"},
                    {"id": "red", "source": "s", "claim": "an impossible accuracy", "quantity": "final",
                     "args": {"scenario": "relu-he"}, "expect": "above", "value": 1.5, "test": "every_seed"}]}
    summary = run_experiment(experiment_from_dict(d), tmp_path / "run")
    rows = list(csv.DictReader((tmp_path / "run" / "claims.csv").open(encoding="utf-8")))
    assert [(r["claim_id"], r["verdict"]) for r in rows] == [("ok", "reproduced"), ("red", "not reproduced")]
    html = summary.report.read_text(encoding="utf-8")
    assert html.index("<h2>Claims</h2>") < html.index("<h2>Findings</h2>")
    assert '<tr class="claim-failed"><td><code>red</code>' in html


def test_presets_lists_claims(capsys):
    from initlab.lab.cli import cmd_presets

    assert cmd_presets(None) == 0
    out = capsys.readouterr().out
    for name, _ in __import__("initlab.lab.config", fromlist=["list_presets"]).list_presets():
        assert name in out
        for c in load_experiment(name).claims:
            assert f"  {c.id}: {c.claim}" in out
