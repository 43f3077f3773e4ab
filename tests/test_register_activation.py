"""A user's activation, registered once, is known everywhere: gains, ``auto``, fx detection (module
and function), theory, probe and audit; re-registering it leaves no stale cached value."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate, stats
from torch import nn

import initlab
from initlab import InitlabError, theory
from initlab._activations import unregister_activation


def squareplus(x: torch.Tensor) -> torch.Tensor:
    """Squareplus (So 2021), the functional form a model calls in ``forward``."""
    return 0.5 * (x + torch.sqrt(x * x + 4))


class MySquareplus(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (x + torch.sqrt(x * x + 4))


class FunctionalNet(nn.Module):
    """Squareplus called as a function: fx must see one call, not the torch ops inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(64, 256), nn.Linear(256, 256), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(squareplus(self.fc2(squareplus(self.fc1(x)))))


def _module_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 256), MySquareplus(), nn.Linear(256, 256), MySquareplus(),
                         nn.Linear(256, 10))


def _second_moment(fn) -> float:
    """E[phi(z)^2], z ~ N(0, 1), by scipy's adaptive quadrature: independent of initlab's rule."""
    def f(z: float) -> float:
        y = float(fn(torch.tensor([z], dtype=torch.float64))[0])
        return y * y * stats.norm.pdf(z)
    return sum(integrate.quad(f, a, b, epsabs=1e-13, epsrel=1e-12)[0] for a, b in ((-12, 0), (0, 12)))


E_SQ = _second_moment(squareplus)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def registered():
    row = initlab.register_activation("squareplus", lambda x: 0.5 * (x + torch.sqrt(x * x + 4)),
                                      modules=(MySquareplus,), functions=(squareplus,),
                                      suggest="squareplus_scheme")
    try:
        yield row
    finally:
        unregister_activation("squareplus")


def test_gain_is_the_second_moment_gain(registered):
    assert initlab.gain("squareplus") == pytest.approx(1.0 / math.sqrt(E_SQ), rel=1e-9)
    assert initlab.gain(MySquareplus()) == pytest.approx(1.0 / math.sqrt(E_SQ), rel=1e-9)
    assert "squareplus" in initlab.activation_names()
    assert dict(initlab.gain_table())["squareplus"] == pytest.approx(1.0 / math.sqrt(E_SQ), rel=1e-9)


@pytest.mark.parametrize("build", [_module_net, FunctionalNet], ids=["module", "function"])
def test_fx_detection_links_every_hidden_layer(registered, build):
    links = initlab.find_activations(build())
    acts = {name: None if link.activation is None else link.activation.name for name, link in links.items()}
    hidden = [n for n in acts if n not in ("4", "out")]
    assert [acts[n] for n in hidden] == ["squareplus", "squareplus"]
    assert all(link.traced for link in links.values())
    assert acts.get("4", acts.get("out")) is None  # the readout


@pytest.mark.parametrize("build", [_module_net, FunctionalNet], ids=["module", "function"])
def test_auto_uses_the_second_moment_gain(registered, build):
    torch.manual_seed(0)
    m = build()
    rep = initlab.init_model(m, "auto", exact=False, generator=_gen())
    g = 1.0 / math.sqrt(E_SQ)
    hidden = [r for r in rep if r["activation"] == "squareplus"]
    assert len(hidden) == 2
    for r in hidden:
        assert r["scheme"] == "he_normal"
        assert r["gain"] == pytest.approx(g, rel=1e-9)
        assert r["target_std"] == pytest.approx(g / math.sqrt(r["fan_in"]), rel=1e-9)
        assert r["realised_std"] == pytest.approx(r["target_std"], rel=0.02)
    assert rep.rows[-1]["scheme"] == "lecun_normal"  # the readout


def test_theory_integrates_it(registered):
    assert theory.gaussian_moments("squareplus", 1.0)["sq_mean"] == pytest.approx(E_SQ, rel=1e-8)
    q = 2.5  # E[phi(u)^2], u ~ N(0, q), by the same independent quadrature
    assert theory.gaussian_moments(MySquareplus(), q)["sq_mean"] == pytest.approx(
        _second_moment(lambda z: squareplus(math.sqrt(q) * z)), rel=1e-8)
    m = _module_net()
    initlab.init_model(m, "auto", generator=_gen())
    specs = theory.layer_specs_from_model(m)
    assert [None if s.activation is None else s.activation.name for s in specs] == ["squareplus", "squareplus", None]


def test_probe_measures_and_predicts_it(registered):
    torch.manual_seed(0)
    m = _module_net()
    initlab.init_model(m, "auto", generator=_gen())
    x = torch.randn(512, 64, generator=_gen(1))
    res = initlab.probe(m, x)
    rows = res.rows
    assert [r["activation"] for r in rows] == ["squareplus", "squareplus", "none"]
    with torch.no_grad():
        h = m[1](m[0](x))
    assert rows[0]["post_var"] == pytest.approx(float(h.var(unbiased=False)), rel=1e-6)
    # the recursion through squareplus: E[phi(h)^2] of the first layer's Gaussian pre-activation
    # matches the measurement, and feeds the next layer's prediction
    assert rows[0]["predicted_pre_sq_mean"] == pytest.approx(rows[0]["pre_sq_mean"], rel=0.02)
    assert rows[0]["predicted_post_sq_mean"] == pytest.approx(rows[0]["post_sq_mean"], rel=0.02)
    for prev, r in zip(rows, rows[1:]):
        assert r["predicted_pre_sq_mean"] == pytest.approx(
            r["fan_in"] * r["weight_var"] * prev["predicted_post_sq_mean"], rel=1e-9)
    # not zero on the negative half-line, not bounded: no dead or saturated units to count
    assert all(math.isnan(r["dead_frac"]) and math.isnan(r["saturated_frac"]) for r in rows)


def test_audit_gives_the_rows_advice(registered):
    torch.manual_seed(0)
    m = _module_net()
    x = torch.randn(256, 64, generator=_gen(1))
    initlab.init_model(m, "auto", generator=_gen())
    assert not initlab.audit(m, x).codes() & {"signal_grows", "signal_shrinks"}
    initlab.init_model(m, "normal", generator=_gen())  # N(0, 1) weights: the signal explodes
    result = initlab.audit(m, x)
    fixes = [f.fix for f in result.findings if f.code == "signal_grows"]
    assert fixes and "squareplus_scheme" in fixes[0]


def test_facts_of_the_row_reach_probe_and_gains():
    # a bounded, kinked user activation: saturation is counted and the kinks reach the quadrature
    initlab.register_activation("clip2", lambda x: torch.clamp(x, -2.0, 2.0), kinks=(-2.0, 2.0), bounds=(-2.0, 2.0),
                                differentiable_at_0=True)
    try:
        e_sq = 1.0 - 2.0 * (2.0 * stats.norm.pdf(2.0) + (1 - stats.norm.cdf(2.0))) + 8.0 * (1 - stats.norm.cdf(2.0))
        assert initlab.gain("clip2") == pytest.approx(1.0 / math.sqrt(e_sq), rel=1e-8)
        m = nn.Sequential(nn.Linear(32, 64), initlab.resolve_activation("clip2").module(), nn.Linear(64, 4))
        initlab.init_model(m, "normal", generator=_gen())
        row = initlab.probe(m, torch.randn(128, 32, generator=_gen(1))).rows[0]
        assert row["activation"] == "clip2" and row["saturated_frac"] > 0.5
    finally:
        unregister_activation("clip2")


def test_re_registering_is_never_stale(registered):
    g1 = initlab.gain("squareplus")
    sq1 = theory.gaussian_moments("squareplus", 1.0)["sq_mean"]
    initlab.register_activation("squareplus", lambda x: squareplus(x) * 2.0, modules=(MySquareplus,),
                                functions=(squareplus,), overwrite=True)
    assert initlab.gain("squareplus") == pytest.approx(g1 / 2.0, rel=1e-9)
    assert theory.gaussian_moments("squareplus", 1.0)["sq_mean"] == pytest.approx(4.0 * sq1, rel=1e-9)


def test_negative_control_unregistered_is_unknown():
    # without the row: the name is unknown, and the module and the function are not table rows;
    # fx traces into them and the fingerprint recognises the expression as a *custom* activation
    # (not a table row), whose auto gain comes from quadrature: the same 1/sqrt(E[phi^2])
    with pytest.raises(InitlabError, match="unknown activation 'squareplus'"):
        initlab.gain("squareplus")
    for build in (_module_net, FunctionalNet):
        links = list(initlab.find_activations(build()).values())
        assert all(link.activation.custom and link.activation.row is None for link in links[:2])
        assert links[2].activation is None
        rep = initlab.init_model(build(), "auto", exact=False, generator=_gen())
        assert [r["scheme"] for r in rep] == ["he_normal", "he_normal", "lecun_normal"]
        assert list(rep)[0]["gain"] == pytest.approx(E_SQ ** -0.5, rel=1e-6)
    res = initlab.probe(_module_net(), torch.randn(16, 64))
    assert res.rows[2]["activation"] == "none" and res.rows[0]["activation"] != "squareplus"


def test_the_lab_trains_a_registered_activation(registered, tmp_path):
    """The lab validates, builds (the row's module), initialises, trains and reports a registered
    activation; ``auto`` gives layer 2 fan_in * Var[W] = 1 / E[phi^2], LeCun gives 1 (control)."""
    import pandas as pd

    from initlab.lab.config import experiment_from_dict
    from initlab.lab.models import build_model
    from initlab.lab.run import run_experiment

    exp = experiment_from_dict({
        "name": "squareplus", "data": {"name": "gaussian", "limit": 600},
        "train": {"steps": 10, "log_every": 5, "seeds": [0, 1]},
        "scenarios": [{"activation": "squareplus", "scheme": "auto"},
                      {"activation": "squareplus", "scheme": "lecun_normal"}],
    })
    model = build_model(exp.scenarios[0].model, "squareplus")
    assert sum(isinstance(m, MySquareplus) for m in model.modules()) == 2  # the row's module
    summary = run_experiment(exp, tmp_path / "run")
    assert summary.complete
    m = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert set(m.scenario) == {"squareplus-auto", "squareplus-lecun_normal"} and m["value"].notna().all()
    fp = pd.read_csv(tmp_path / "run" / "first_pass.csv")
    layer2 = fp[fp["index"] == 2]
    assert set(layer2.activation) == {"squareplus"}
    prod = (layer2.fan_in * layer2.weight_var).groupby(layer2.scheme).mean()
    se = math.sqrt(2.0 / (100 * 100 * 2))  # relative standard error of a variance from 2 x 10^4 normal draws
    assert abs(prod["auto"] * E_SQ - 1.0) < 5 * se
    assert abs(prod["lecun_normal"] - 1.0) < 5 * se and abs(prod["lecun_normal"] * E_SQ - 1.0) > 10 * se
    assert (tmp_path / "run" / "report.html").is_file()
