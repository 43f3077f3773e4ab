"""Every preset with claims runs in a reduced form (a few steps, 2 seeds, a small data set, a small first-pass
batch, a grid of a few small cells) and writes a claims.csv row per claim whose quantity could be measured
(the verdicts of such short runs mean nothing)."""
from __future__ import annotations

import csv
from importlib.resources import files

import pytest

from initlab.lab.claims import CLAIMS_COLUMNS, VERDICTS
from initlab.lab.config import experiment_from_dict, load_experiment, preset_names, read_toml
from initlab.lab.run import run_experiment

WITH_CLAIMS = [n for n in preset_names() if load_experiment(n).claims]

#: a smaller grid for a preset whose [grid] is large (two values of each axis: what its claims need to be measured)
GRIDS = {"edge-of-chaos": {"sw2": [1.0, 4.0], "depths": [10, 25]}}

#: scenarios deeper than this run with this depth
MAX_DEPTH = 8


def reduced(name: str):
    d = read_toml(files("initlab.lab.presets").joinpath(f"{name}.toml").read_text(encoding="utf-8"), name)
    d["data"]["limit"] = 300
    d["train"].update(steps=4, log_every=2, seeds=[0, 1], first_pass_batch=8)
    d.get("grid", {}).update(GRIDS.get(name, {}))
    for sc in d.get("scenarios", []):  # a deep scenario's claims are measured as well on a few layers
        if sc.get("depth", 0) > MAX_DEPTH:
            sc["depth"] = MAX_DEPTH
    return experiment_from_dict(d)


def test_the_presets_state_claims():
    assert {"glorot", "he-cnn", "kumar-sigmoid", "lsuv-deep", "torch-default"} <= set(WITH_CLAIMS)


@pytest.mark.parametrize("name", WITH_CLAIMS)
def test_reduced_preset_measures_every_claim(name, tmp_path):
    exp = reduced(name)
    assert [c.id for c in exp.claims] == [c.id for c in load_experiment(name).claims]
    summary = run_experiment(exp, tmp_path / name, report=True)
    assert summary.complete
    rows = list(csv.DictReader((tmp_path / name / "claims.csv").open(encoding="utf-8")))
    assert [r["claim_id"] for r in rows] == [c.id for c in exp.claims]
    for r in rows:
        assert set(r) == set(CLAIMS_COLUMNS)
        assert r["verdict"] in VERDICTS
        assert not r["measured"].startswith("not measurable"), r
