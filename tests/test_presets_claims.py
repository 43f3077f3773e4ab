"""Every preset with claims runs in a reduced form (a few steps, 2 seeds, a small data set) and writes a
claims.csv row per claim whose quantity could be measured (the verdicts of such short runs mean nothing)."""
from __future__ import annotations

import csv

import pytest

from initlab.lab.claims import CLAIMS_COLUMNS, VERDICTS
from initlab.lab.config import load_experiment, preset_names, with_overrides
from initlab.lab.run import run_experiment

WITH_CLAIMS = [n for n in preset_names() if load_experiment(n).claims]


def test_the_presets_state_claims():
    assert {"glorot", "he-cnn", "kumar-sigmoid", "lsuv-deep", "torch-default"} <= set(WITH_CLAIMS)


@pytest.mark.parametrize("name", WITH_CLAIMS)
def test_reduced_preset_measures_every_claim(name, tmp_path):
    exp = load_experiment(name)
    exp = with_overrides(exp, {"train.steps": 4, "train.log_every": 2, "train.seeds": [0, 1], "data.limit": 300,
                               "train.first_pass_batch": 40})
    summary = run_experiment(exp, tmp_path / name, report=True)
    assert summary.complete
    rows = list(csv.DictReader((tmp_path / name / "claims.csv").open(encoding="utf-8")))
    assert [r["claim_id"] for r in rows] == [c.id for c in exp.claims]
    for r in rows:
        assert set(r) == set(CLAIMS_COLUMNS)
        assert r["verdict"] in VERDICTS
        assert not r["measured"].startswith("not measurable"), r
