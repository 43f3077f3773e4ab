"""The theory presets (edge-of-chaos, isometry, fixup) end to end in reduced form (few steps, small
grids, a data subset), their claim quantities against hand-made runs, with negative controls."""
from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from initlab.lab import studies as S
from initlab.lab.config import experiment_from_dict, experiment_to_toml, load_experiment, read_toml
from initlab.lab.report import write_report
from initlab.lab.run import run_experiment


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _preset_dict(name):
    from importlib.resources import files
    return read_toml(files("initlab.lab.presets").joinpath(f"{name}.toml").read_text(encoding="utf-8"), name)


def _reduced(name, *, steps=4, keep=None, depth=None, seeds=(0, 1)):
    d = _preset_dict(name)
    d["data"]["limit"] = 300
    d["train"].update(steps=steps, log_every=2, seeds=list(seeds), first_pass_batch=20)
    if keep is not None:
        d["scenarios"] = [s for s in d["scenarios"] if keep(s)]
    if depth is not None:
        for s in d["scenarios"]:
            s["depth"] = depth(s["depth"])
    return d


def _claims(run_dir):
    return {r["claim_id"]: r for r in csv.DictReader((run_dir / "claims.csv").open(encoding="utf-8"))}


def test_presets_parse_with_their_claims():
    for name, n_claims in (("edge-of-chaos", 1), ("isometry", 4), ("fixup", 5)):
        exp = load_experiment(name)
        assert len(exp.claims) == n_claims and exp.scenarios
        for c in exp.claims:  # every claim names a registered quantity and scenarios of its preset
            names = {s.name for s in exp.scenarios}
            for key in ("scenario", "other"):
                if key in dict(c.args):
                    assert dict(c.args)[key] in names


def test_edge_of_chaos_reduced(tmp_path):
    d = _reduced("edge-of-chaos")
    assert d["grid"]["sw2"] == [1.0, 1.4, 1.76, 2.5, 4.0] and d["grid"]["depths"] == [10, 25, 50, 100]
    d["grid"].update(sw2=[1.0, 1.76], depths=[2, 10])
    exp = experiment_from_dict(d)
    assert [s.name for s in exp.scenarios] == ["tanh-sw1-d2", "tanh-sw1-d10", "tanh-sw1.76-d2", "tanh-sw1.76-d10"]
    run_experiment(exp, tmp_path / "run")
    rows = _claims(tmp_path / "run")
    assert rows["trainable-depth-6xi_c"]["verdict"] in ("reproduced", "not reproduced", "inconclusive")
    assert "not measurable" not in rows["trainable-depth-6xi_c"]["measured"]
    html = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert "heatmap.png" in html and "accuracy_vs_depth.png" in html


def test_isometry_reduced(tmp_path):
    d = _reduced("isometry", depth=lambda L: 6 if L == 32 else 2)
    run_experiment(experiment_from_dict(d), tmp_path / "run")
    rows = _claims(tmp_path / "run")
    assert set(rows) == {"tanh-orthogonal-isometric", "relu-not-isometric", "linear-orthogonal-depth-independent",
                         "linear-gaussian-slower-with-depth"}
    for r in rows.values():
        assert r["verdict"] in ("reproduced", "not reproduced", "inconclusive")
    for cid in ("tanh-orthogonal-isometric", "relu-not-isometric"):
        assert "not measurable" not in rows[cid]["measured"]
    assert "jacobian_spectra.png" in (tmp_path / "run" / "report.html").read_text(encoding="utf-8")


def test_fixup_reduced(tmp_path):
    d = _reduced("fixup", depth=lambda L: 11, seeds=(0, 1, 2))  # 10 blocks: He/He x3 per block, He/LeCun x2
    d["claims"] = [dict(c, value=c["value"] / 5) if c["id"].endswith("growth") else c for c in d["claims"]]
    run_experiment(experiment_from_dict(d), tmp_path / "run")
    rows = _claims(tmp_path / "run")
    assert rows["he-he-growth"]["verdict"] == "reproduced", rows["he-he-growth"]
    assert rows["he-lecun-growth"]["verdict"] == "reproduced", rows["he-lecun-growth"]
    assert "not measurable" not in rows["he-lecun-no-training"]["measured"]
    # negative control: the He/He growth is not the He/LeCun one (x3 vs x2 per block)
    d["claims"] = [dict(c, args=dict(c["args"], scenario="he-lecun")) if c["id"] == "he-he-growth" else c
                   for c in d["claims"]]
    (tmp_path / "run" / "config.toml").write_text(experiment_to_toml(experiment_from_dict(d)), encoding="utf-8")
    write_report(tmp_path / "run", figures=False)
    assert _claims(tmp_path / "run")["he-he-growth"]["verdict"] == "not reproduced"


def test_fixup_scenario_reduced_starts_with_zero_branch_outputs(tmp_path):
    """The preset's fixup scenario (50 blocks, 1 seed, 2 steps): in the first pass every branch's last layer
    (indices 3, 5, ..., 101) has weight variance 0 and every first layer (2, 4, ..., 100) He's 2/64 times
    1/50 (Fixup's L^(-1/2) on the std); the stream's growth claim holds exactly; a changed residual is refused."""
    from initlab._errors import InitlabError

    d = _reduced("fixup", keep=lambda s: s["name"] == "fixup", steps=2, seeds=(0,))
    d["claims"] = [c for c in d["claims"] if c["id"].startswith("fixup")]
    exp = experiment_from_dict(d)
    assert exp.scenarios[0].residual == "fixup" and len(exp.scenarios[0].model.widths) - 2 == 51
    run_experiment(exp, tmp_path / "run", report=False)
    fp = pd.read_csv(tmp_path / "run" / "first_pass.csv")
    assert sorted(fp["index"]) == list(range(1, 103))  # stem, 50 x (first, last), readout
    last, first = fp[fp["index"].isin(range(3, 102, 2))], fp[fp["index"].isin(range(2, 101, 2))]
    assert (last["weight_var"] == 0).all() and (last["bias_var"] == 0).all()
    # the sample variance of 64 x 64 normals: relative standard error sqrt(2 / 4096); within 4 of them
    assert ((first["weight_var"] / (2 / 64 / 50) - 1).abs() < 4 * (2 / 4096) ** 0.5).all()
    assert (first["weight_var"] > 0).all()  # negative control: the first layers are not zero
    write_report(tmp_path / "run", figures=False)
    rows = _claims(tmp_path / "run")
    assert rows["fixup-no-growth"]["verdict"] == "reproduced" and rows["fixup-no-growth"]["measured"] == "0"
    # the residual policy is part of the run's fingerprint: the same run without it is refused
    d["scenarios"][0]["residual"] = "none"
    with pytest.raises(InitlabError, match="holds another experiment"):
        run_experiment(experiment_from_dict(d), tmp_path / "run", report=False)


# ----------------------------------------------------------------------------- the quantities


def _grid_run(acc_of):
    """A hand-made run of the edge-of-chaos grid whose final accuracies are ``acc_of(sw2, depth)``."""
    exp = load_experiment("edge-of-chaos")
    sw2 = S.scenario_sw2(exp)
    rows = [{"scenario": sc.name, "seed": seed, "step": 150, "split": "test", "metric": "acc",
             "value": acc_of(sw2[sc.name], len(sc.model.widths) - 2)} for sc in exp.scenarios for seed in (0, 1)]
    return SimpleNamespace(metrics=pd.DataFrame(rows), config_text=experiment_to_toml(exp))


def test_depth_scale_agreement_against_theory_and_a_negative_control():
    def theory(s, L):
        return 0.9 if S.theory_trainable("tanh", s, 0.05, L) else 0.1

    assert S.depth_scale_agreement(_grid_run(theory)) == {0: 1.0, 1: 1.0}
    # negative control: a run where only the shallowest depth trains disagrees in many cells
    shallow = S.depth_scale_agreement(_grid_run(lambda s, L: 0.9 if L == 10 else 0.1))
    assert all(v <= 0.6 for v in shallow.values())
    # and the same run judged against a curve 10x too short agrees less than against 6 xi_c
    assert S.depth_scale_agreement(_grid_run(theory), multiple=0.6)[0] < 1.0


def test_steps_to():
    m = pd.DataFrame([{"scenario": "a", "seed": 0, "step": s, "split": "train", "metric": "loss", "value": v}
                      for s, v in ((0, 2.3), (10, 1.5), (20, 0.9), (30, 0.5))])
    data = SimpleNamespace(metrics=m)
    assert S.steps_to(data, "a", 1.0) == {0: 20.0}
    assert math.isnan(S.steps_to(data, "a", 0.1)[0])  # never reached
