"""Gains against closed forms, numerical integration and torch's table; errors; the CLI."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, stats
from torch import nn

from initlab import InitlabError, activation_names, gain, gain_table
from initlab._gains import second_moment
from initlab.cli import main


def quad_second_moment(fn) -> float:
    """E[phi(z)^2] by adaptive quadrature (scipy), split at the usual kinks."""
    def f(z: float) -> float:
        y = float(fn(torch.tensor([z], dtype=torch.float64))[0])
        return y * y * stats.norm.pdf(z)
    pts = [-12, -3, -1, 0, 1, 3, 6, 12]
    return sum(integrate.quad(f, a, b, epsabs=1e-13, epsrel=1e-12, limit=200)[0] for a, b in zip(pts, pts[1:]))


def test_relu_is_sqrt2():
    assert gain("relu") == pytest.approx(math.sqrt(2.0), rel=1e-15)


@pytest.mark.parametrize("a", [0.01, 0.2, 0.5])
def test_leaky_relu(a):
    assert gain("leaky_relu", a) == pytest.approx(math.sqrt(2.0 / (1.0 + a * a)), rel=1e-14)
    assert gain(nn.LeakyReLU(a)) == pytest.approx(math.sqrt(2.0 / (1.0 + a * a)), rel=1e-14)


def test_hardtanh_closed_form():
    # E[clip(z, -1, 1)^2] = 1 - 2 phi(1)
    assert second_moment("hardtanh") == pytest.approx(1.0 - 2.0 * stats.norm.pdf(1.0), rel=1e-6)


@pytest.mark.parametrize("name", [n for n in activation_names()])
def test_second_moment_matches_adaptive_quadrature(name):
    from initlab import resolve_activation

    act = resolve_activation(name)
    assert second_moment(name) == pytest.approx(quad_second_moment(act.fn), rel=1e-6)


def test_second_moment_negative_control():
    # the comparison above can fail: tanh's moment is not sigmoid's
    assert second_moment("tanh") != pytest.approx(quad_second_moment(torch.sigmoid), rel=1e-6)


def test_selu_is_self_normalising():
    assert gain("selu") == pytest.approx(1.0, abs=1e-3)


def test_kumar_closed_forms():
    assert gain("sigmoid", method="kumar") ** 2 == pytest.approx(12.8, rel=1e-8)
    assert gain("tanh", method="kumar") == pytest.approx(1.0, rel=1e-8)
    assert gain("hardtanh", method="kumar") == pytest.approx(1.0, rel=1e-8)
    assert gain("gelu", method="kumar") == pytest.approx(2.0, rel=1e-8)
    assert gain("silu", method="kumar") == pytest.approx(2.0, rel=1e-8)
    assert gain("mish", method="kumar") == pytest.approx(1.0 / math.tanh(math.log(2.0)), rel=1e-8)
    ln2 = math.log(2.0)
    assert gain("softplus", method="kumar") == pytest.approx(1.0 / math.sqrt(0.25 * (1 + ln2 * ln2)), rel=1e-8)
    assert gain("elu", method="kumar") == pytest.approx(1.0, rel=1e-8)  # alpha = 1: smooth at 0


@pytest.mark.parametrize("act, param", [("relu", None), ("leaky_relu", 0.1), ("relu6", None), ("prelu", None),
                                        ("selu", None), ("elu", 0.5)])
def test_kumar_rejects_non_differentiable(act, param):
    with pytest.raises(InitlabError, match=rf"method 'kumar' needs an activation differentiable at 0, "
                                           rf"and '{act}' is not.*second_moment"):
        gain(act, param, method="kumar")


def test_kumar_custom_callables():
    assert gain(lambda x: torch.tanh(x), method="kumar") == pytest.approx(1.0, rel=1e-8)
    with pytest.raises(InitlabError, match="differentiable at 0.*jumps from -1 to 1"):
        gain(torch.abs, method="kumar")
    with pytest.raises(InitlabError, match=r"phi'\(0\) = 0"):
        gain(lambda x: x * x, method="kumar")


@pytest.mark.parametrize("name, param", [("linear", None), ("sigmoid", None), ("tanh", None), ("relu", None),
                                         ("leaky_relu", 0.2), ("selu", None)])
def test_torch_table(name, param):
    expected = torch.nn.init.calculate_gain(name, param)
    assert gain(name if name != "linear" else "identity", param, method="torch") == pytest.approx(expected, rel=1e-12)


def test_torch_method_unknown_entry():
    with pytest.raises(InitlabError, match="calculate_gain has no entry for activation 'gelu'.*tanh.*second_moment"):
        gain("gelu", method="torch")


def test_accepts_modules_functions_callables():
    assert gain(nn.ReLU()) == gain(nn.ReLU) == gain(F.relu) == gain("relu")
    assert gain(torch.tanh) == gain("tanh")
    assert gain(None) == 1.0
    assert gain(lambda x: torch.tanh(x)) == pytest.approx(gain("tanh"), rel=1e-9)
    assert gain(nn.GELU(approximate="tanh")) == gain("gelu_tanh")


def test_custom_callable_is_cached():
    calls = []

    def act(x):
        calls.append(1)
        return torch.tanh(x)

    first = gain(act)
    n = len(calls)
    assert gain(act) == first and len(calls) == n


def test_custom_callable_errors():
    with pytest.raises(InitlabError, match="elementwise function of a torch tensor"):
        gain(lambda x: x.no_such_method())
    with pytest.raises(InitlabError, match="same shape"):
        gain(lambda x: x.sum())


def test_unknown_activation_and_method():
    with pytest.raises(InitlabError, match=r"unknown activation 'rleu'; did you mean 'relu'\?.*tanh"):
        gain("rleu")
    with pytest.raises(InitlabError, match=r"unknown method 'kumr'; did you mean 'kumar'\?.*second_moment.*torch"):
        gain("tanh", method="kumr")


def test_gain_table():
    rows = dict(gain_table("kumar"))
    assert set(rows) == set(activation_names())
    assert rows["relu"] is None
    assert rows["tanh"] == pytest.approx(1.0)
    sm = dict(gain_table())
    assert all(v is not None and v > 0 for v in sm.values())
    with pytest.raises(InitlabError, match="unknown method"):
        gain_table("nope")


def test_cli_gains(capsys):
    assert main(["gains"]) == 0
    out = capsys.readouterr().out
    for name in ("relu", "sigmoid", "tanh", "gelu", "hardswish"):
        assert name in out
    assert "1.414214" in out and "3.577709" in out  # sqrt(2); sqrt(12.8)
    assert main(["gains", "leaky_relu", "--param", "0.2", "--method", "torch"]) == 0
    out = capsys.readouterr().out
    assert "leaky_relu(0.2)" in out and f"{math.sqrt(2 / 1.04):.6f}" in out


def test_cli_gains_unknown_activation(capsys):
    assert main(["gains", "rleu"]) == 2
    assert "initlab: error: unknown activation 'rleu'" in capsys.readouterr().err
