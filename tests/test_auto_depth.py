"""``auto`` is exact at every depth: the variance recursion keeps each layer's pre-activation second
moment at 1 (initlab._schemes._AutoRule), and the correction pass (initlab._calibrate) removes the
finite-width drift of the weights actually drawn, for every activation of the table."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import initlab
from initlab import theory
from initlab._activations import activation_names, resolve_activation

DEPTH, WIDTH, N = 50, 256, 256


def _mlp(name: str, depth: int = DEPTH, width: int = WIDTH) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width, bias=False), resolve_activation(name).module()]
    return nn.Sequential(*layers, nn.Linear(width, width, bias=False))


def _pre_activation_moments(model: nn.Sequential, x: torch.Tensor) -> list[float]:
    out = []
    with torch.no_grad():
        for m in model:
            x = m(x)
            if isinstance(m, nn.Linear):
                out.append(float(x.double().square().mean()))
    return out


def _input(scale: float = 1.0, width: int = WIDTH) -> torch.Tensor:
    return scale * torch.randn(N, width, generator=torch.Generator().manual_seed(1))


def _predicted(name: str, gains: list[float], q0: float = 1.0) -> list[float]:
    """The variance recursion (initlab.theory.forward_variances) for the chain with these gains
    (the gains do not depend on the width: the models for them are 16 wide, to be quick)."""
    specs = [theory.LayerSpec(WIDTH, WIDTH, g * g / WIDTH, activation=name) for g in gains[:-1]]
    specs.append(theory.LayerSpec(WIDTH, WIDTH, gains[-1] ** 2 / WIDTH))
    return list(theory.forward_variances(q0, specs)["pre_var"])


def _gains(model: nn.Module, **kw) -> list[float]:
    """The recursion's gains (without the correction pass, whose factors depend on the draw)."""
    rep = initlab.init_model(model, "auto", calibrate=False, generator=torch.Generator().manual_seed(0), **kw)
    return [r["gain"] for r in rep if r["kind"] == "Linear"]


@pytest.mark.parametrize("name", activation_names())
def test_every_activation_exact_at_depth_50_by_the_recursion(name):
    q = _predicted(name, _gains(_mlp(name, DEPTH, width=16)))
    assert q == pytest.approx([1.0] * (DEPTH + 1), rel=1e-6), name


@pytest.mark.parametrize("name", activation_names())
def test_every_activation_measured_in_band(name):
    # the goal: depth 50, width 256, plain init_model(model, "auto"), input E[x^2] = 1
    model = _mlp(name)
    rep = initlab.init_model(model, "auto", generator=torch.Generator().manual_seed(0))
    assert rep.extra["calibration"]["batch"] == "synthetic"
    q = _pre_activation_moments(model, _input())
    assert all(0.5 <= v <= 2.0 for v in q), (name, min(q), max(q))


@pytest.mark.parametrize("kw", [{"exact": False}, {"calibrate": False}], ids=["fixed_gain", "recursion_only"])
@pytest.mark.parametrize("name", ["silu", "gelu", "hardswish"])
def test_negative_control_without_the_correction_leaves_the_band(name, kw):
    # the same measurement fails for the old per-layer gain, and for the recursion alone at finite
    # width (the map q -> E[phi(sqrt(q) z)^2] has slope > 1 at q* = 1 for these activations)
    assert _slope(name) > 1.0
    model = _mlp(name)
    initlab.init_model(model, "auto", generator=torch.Generator().manual_seed(0), **kw)
    q = _pre_activation_moments(model, _input())
    assert not all(0.5 <= v <= 2.0 for v in q), (name, min(q), max(q))


@pytest.mark.parametrize("name", ["relu", "silu"])
def test_negative_control_xavier_leaves_the_band(name):
    model = _mlp(name)
    initlab.init_model(model, "xavier_normal", generator=torch.Generator().manual_seed(0))
    q = _pre_activation_moments(model, _input())
    assert not all(0.5 <= v <= 2.0 for v in q), (name, min(q), max(q))


def test_correction_is_deterministic_and_leaves_the_generator_alone():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = _mlp("gelu", depth=4), _mlp("gelu", depth=4)
    ra = initlab.init_model(a, "auto", generator=g1)
    initlab.init_model(b, "auto", calibrate=False, generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())  # the synthetic batch has its own generator
    factors = ra.extra["calibration"]["factors"]
    assert set(factors) == {n for n, m in a.named_modules() if isinstance(m, nn.Linear)}
    for (n, ma), mb in zip(a.named_modules(), b.modules()):
        if isinstance(ma, nn.Linear):
            assert torch.allclose(ma.weight, mb.weight * factors[n], rtol=1e-6, atol=0)
            row = ra[n]
            assert row["calibrated"] == factors[n] and 0.7 < factors[n] < 1.4
    assert "calibrated: 5 layers" in str(ra)
    c = _mlp("gelu", depth=4)
    initlab.init_model(c, "auto", generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_no_synthetic_pass_where_the_input_is_unknown():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 4))
    rep = initlab.init_model(conv, "auto", generator=torch.Generator().manual_seed(0))
    assert "calibration" not in rep.extra and "calibrated" not in str(rep)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rep = initlab.init_model(conv, "auto", batch=x, generator=torch.Generator().manual_seed(0))
    assert rep.extra["calibration"]["batch"] == "batch"
    # the conv feeds a BatchNorm (which undoes any scale): only the readout is rescaled
    assert set(rep.extra["calibration"]["factors"]) == {"4"}


def _slope(name: str, e: float = 1e-4) -> float:
    m = [theory.gaussian_moments(name, q)["sq_mean"] for q in (1 - e, 1.0, 1 + e)]
    return (m[2] - m[0]) / (2 * e) / m[1]


def test_raw_data_input_is_corrected_with_batch():
    x = _input(0.1 ** 0.5)  # E[x^2] = 0.1
    model = _mlp("silu", depth=5)
    rep = initlab.init_model(model, "auto", calibrate=False, batch=x, generator=torch.Generator().manual_seed(0))
    assert list(rep)[0]["gain"] == pytest.approx(float(x.double().square().mean()) ** -0.5, rel=1e-9)
    q = _pre_activation_moments(model, x)
    assert all(0.8 <= v <= 1.25 for v in q), q
    # with the correction pass on the batch: exactly 1 on that batch
    rep = initlab.init_model(model, "auto", batch=x, generator=torch.Generator().manual_seed(0))
    assert rep.extra["calibration"]["batch"] == "batch"
    assert _pre_activation_moments(model, x) == pytest.approx([1.0] * 6, rel=1e-4)
    # without the batch the first layer assumes E[x^2] = 1: its pre-activations start at 0.1
    initlab.init_model(model, "auto", calibrate=False, generator=torch.Generator().manual_seed(0))
    assert _pre_activation_moments(model, x)[0] == pytest.approx(0.1, rel=0.15)


def test_negative_control_fixed_gain_rule_drifts():
    # the old rule: every layer gets the gain of the activation that FOLLOWS it, 1/sqrt(E[phi(z)^2]),
    # exact only at unit variance; for SiLU the recursion's pre-activation second moment runs away
    old = [initlab.gain("silu")] * DEPTH + [1.0]
    q = _predicted("silu", old)
    assert q[0] == pytest.approx(initlab.gain("silu") ** 2) and max(q) > 2.0
    assert max(_predicted("silu", _gains(_mlp("silu", DEPTH, width=16)))) < 1.0 + 1e-6
    rep = initlab.init_model(_mlp("silu", DEPTH, width=16), "auto", exact=False,
                             generator=torch.Generator().manual_seed(0))
    assert max(_predicted("silu", [r["gain"] for r in rep])) > 2.0  # auto with exact=False: the old rule


def test_readme_mlp_labels_and_recursion_gains():
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.Tanh(),
                          nn.Linear(128, 64), nn.Sigmoid(), nn.Linear(64, 10))
    rep = list(initlab.init_model(model, "auto", calibrate=False, generator=torch.Generator().manual_seed(0)))
    assert [r["scheme"] for r in rep] == ["he_normal", "lecun_normal", "kumar", "lecun_normal"]
    # each gain is 1/sqrt(E[x^2]) of the layer's input: data (1), relu (1/2), tanh, sigmoid at q = 1
    e_tanh = initlab.theory.gaussian_moments("tanh", 1.0)["sq_mean"]
    e_sig = initlab.theory.gaussian_moments("sigmoid", 1.0)["sq_mean"]
    expected = [1.0, 2 ** 0.5, e_tanh ** -0.5, e_sig ** -0.5]
    assert [r["gain"] for r in rep] == pytest.approx(expected, rel=1e-6)


def test_audit_flags_the_drift_of_the_recursion_alone():
    x = _input()
    drifting = _mlp("silu")
    initlab.init_model(drifting, "auto", calibrate=False, generator=torch.Generator().manual_seed(0))
    codes = {f.code for f in initlab.audit(drifting, x, backward=False, scheme="auto").findings
             if f.severity == "error"}
    assert "signal_grows" in codes  # x1e5 over 50 layers, x1.27 per layer
    exact = _mlp("silu")
    initlab.init_model(exact, "auto", generator=torch.Generator().manual_seed(0))
    found = initlab.audit(exact, x, backward=False, scheme="auto").findings
    assert not {f.code for f in found} & {"signal_grows", "signal_shrinks", "output_scale"}
