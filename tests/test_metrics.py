"""The metric registry: one entry per per-step metric, from training to metrics.csv, TensorBoard,
the figures and the report."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from initlab._errors import InitlabError
from initlab.lab import metrics as M
from initlab.lab.config import experiment_from_dict, load_experiment, with_overrides
from initlab.lab.data import load_dataset
from initlab.lab.run import run_experiment
from initlab.lab.training import plan_groups, run_group
from initlab.lab.training import engines as engines_mod

PNG = b"\x89PNG\r\n\x1a\n"


def grad_norm(view: M.LogView) -> torch.Tensor:
    """Per member and weight layer: the norm of the last step's weight gradient, shape (M, layers)."""
    return torch.stack([layer.grad.flatten(1).norm(dim=1) for layer in view.layers], dim=1)


@pytest.fixture
def extra_metric():
    """Registers a per-layer gradient norm for the test only; the registry is restored afterwards."""
    before = M.registered()
    metric = M.register_metric(M.Metric("grad_norm", "gradient norm", compute=grad_norm, plot="grad_norm.png",
                                        caption="Weight-gradient norm per layer at each log step", component="layer",
                                        log_scale=True))
    yield metric
    M.unregister_metric("grad_norm")
    assert M.registered() == before


def short_smoke(steps: int = 6, log_every: int = 3):
    return with_overrides(load_experiment("smoke"), {"train.steps": steps, "train.log_every": log_every})


def test_a_new_metric_reaches_csv_tensorboard_figures_and_report(tmp_path, extra_metric):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp = short_smoke()
    out = tmp_path / "with"
    run_experiment(exp, out)
    m = pd.read_csv(out / "metrics.csv")
    names = ["grad_norm_1", "grad_norm_2", "grad_norm_3"]  # the smoke MLP has three weight layers
    extra = m[m.metric.str.startswith("grad_norm")]
    assert sorted(extra.metric.unique()) == names
    assert set(extra.split) == {"train"} and sorted(extra.step.unique()) == [3, 6]
    assert len(extra) == len(exp.scenarios) * 2 * len(names)
    assert np.isfinite(extra.value).all() and (extra.value > 0).all()
    # within a member, step and split the rows follow the registry: loss, acc, then the new metric
    one = m[(m.scenario == "relu-he") & (m.step == 3) & (m.split == "train")]
    assert list(one.metric) == ["loss", "acc"] + names
    # the default metrics are exactly those of a run without the new metric
    M.unregister_metric("grad_norm")
    try:
        run_experiment(exp, tmp_path / "without", report=False)
    finally:
        M.register_metric(extra_metric)
    lines = (out / "metrics.csv").read_text().splitlines()
    assert [ln for ln in lines if ",grad_norm_" not in ln] == (tmp_path / "without" / "metrics.csv").read_text().splitlines()
    # TensorBoard: one scalar tag per component, the CSV's numbers
    acc = EventAccumulator(str(out / "tb" / "relu-he" / "seed0"), size_guidance={"scalars": 0})
    acc.Reload()
    assert set(names) <= set(acc.Tags()["scalars"])
    for name in names:
        want = m[(m.scenario == "relu-he") & (m.metric == name)].sort_values("step")
        got = acc.Scalars(name)
        assert [e.step for e in got] == want.step.tolist()
        assert np.allclose([e.value for e in got], want.value, rtol=1e-6)
    # the figure, and the report that embeds it with its caption
    assert (out / "figures" / "grad_norm.png").read_bytes()[:8] == PNG
    html = (out / "report.html").read_text()
    assert "figures/grad_norm.png" in html and "Weight-gradient norm per layer at each log step" in html


def test_no_extra_metric_no_extra_figure(tmp_path):
    run_experiment(short_smoke(), tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "figures").iterdir()) == [
        "accuracy.png", "layer1_histograms.png", "loss.png", "variance_per_layer.png"]


@pytest.fixture(scope="module")
def small_data():
    ds = load_dataset("mnist", limit=400)
    return ds


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_every_engine_shows_the_same_gradients(small_data, monkeypatch, extra_metric, kind):
    """``LogView.layers`` is engine-independent: the stacked, vmap and per-member engines give the
    same per-layer gradient norms for the same members."""
    model = ({"kind": "mlp", "widths": [784, 24, 24, 10]} if kind == "mlp"
             else {"kind": "cnn", "widths": [784, 10], "channels": [4], "kernel": 3})
    exp = experiment_from_dict({
        "model": model, "train": {"steps": 4, "log_every": 2, "batch_size": 16, "first_pass_batch": 20, "seeds": [0, 1]},
        "scenarios": [{"activation": "relu", "scheme": "he_normal"}, {"activation": "tanh", "scheme": "xavier_normal"}]})
    (grp,) = plan_groups(exp)

    def norms() -> tuple[str, dict]:
        res = run_group(grp, small_data)
        return res.engine, {(r["scenario"], r["seed"], r["step"], r["metric"]): r["value"] for r in res.metrics
                            if r["metric"].startswith("grad_norm")}

    engines = {}
    if kind == "mlp":
        engines["stacked"] = norms()[1]
        monkeypatch.setattr(engines_mod, "parse_mlp", lambda model, act: None)
    engine, engines["vmap"] = norms()
    assert engine == "vmap"  # one vmap block per activation
    monkeypatch.setattr(engines_mod, "_vmap_works", lambda models, x: False)
    engine, engines["per-member"] = norms()
    assert engine == "per-member"
    ref = engines.pop("per-member")
    n_layers = 3 if kind == "mlp" else 2  # cnn: the conv and the readout
    assert len(ref) == 2 * 2 * 2 * n_layers and all(v > 0 for v in ref.values())
    for name, got in engines.items():
        assert got.keys() == ref.keys(), name
        np.testing.assert_allclose([got[k] for k in ref], list(ref.values()), rtol=1e-4, err_msg=name)


def test_registry_rules():
    assert [m.name for m in M.registered() if not m.optional] == ["loss", "acc"]
    assert M.headline().name == "acc" and [m.name for m in M.display_order() if not m.optional] == ["acc", "loss"]
    assert M.tensorboard_tag("acc", "test") == "test/acc" and M.tensorboard_tag("loss", "train") == "loss"
    # an unknown name sorts after the registered ones instead of failing
    assert M.sort_key("loss") < M.sort_key("acc") < M.sort_key("something_else")
    assert M.tensorboard_tag("something_else", "train") == "train/something_else"
    with pytest.raises(InitlabError, match="already registered"):
        M.register_metric(M.Metric("acc", "accuracy", splits=("train", "test")))
    with pytest.raises(InitlabError, match="cannot be removed"):
        M.unregister_metric("loss")
    with pytest.raises(InitlabError, match="compute function"):
        M.Metric("weight_norm", "weight norm")
    with pytest.raises(InitlabError, match="train rows only"):
        M.Metric("weight_norm", "weight norm", splits=("test",), compute=grad_norm)
    assert math.isfinite(M.sort_key("acc")[0])
