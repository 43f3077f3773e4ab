"""Activations recognised by what they compute (initlab._fingerprint), in traced graphs and in
the registration-order fallback, with near-miss negative controls."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import initlab
from initlab._fingerprint import fingerprint


class Net(nn.Module):
    """fc1 -> f -> fc2, with ``f`` written inline in forward."""

    def __init__(self, f) -> None:
        super().__init__()
        self.fc1, self.f, self.fc2 = nn.Linear(8, 8), f, nn.Linear(8, 8)

    def forward(self, x):
        return self.fc2(self.f(self.fc1(x)))


class Untraceable(Net):
    def forward(self, x):
        h = self.fc1(x)
        if h.sum() > 1e9:  # data-dependent control flow: fx cannot trace this
            h = h * 2
        return self.fc2(self.f(h))


def _label(f, cls=Net):
    act = initlab.find_activations(cls(f))["fc1"].activation
    return None if act is None else ("custom" if act.custom else act.label)


EXPRESSIONS = [
    (lambda x: x * torch.sigmoid(x), "silu"),
    (lambda x: x * torch.sigmoid(1.702 * x), "quick_gelu"),
    (lambda x: x.clamp(min=0), "relu"),
    (lambda x: torch.clamp(x, 0, 6), "relu6"),
    (lambda x: x * F.relu6(x + 3) / 6, "hardswish"),
    (lambda x: F.relu6(x + 3) / 6, "hardsigmoid"),
    (lambda x: torch.where(x > 0, x, 0.3 * x), "leaky_relu(0.3)"),
    (lambda x: torch.where(x > 0, x, 0.5 * (torch.exp(x) - 1)), "elu(0.5)"),
    (lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
     "gelu_tanh"),
    (lambda x: x * torch.tanh(F.softplus(x)), "mish"),
]


@pytest.mark.parametrize("f,expected", EXPRESSIONS)
def test_inline_expressions_are_recognised(f, expected):
    assert _label(f) == expected


@pytest.mark.parametrize("f", [
    lambda x: x * torch.sigmoid(1.6 * x),  # near QuickGELU and SiLU, neither
    lambda x: x.clamp(min=0.1),  # near ReLU
    lambda x: torch.clamp(x, 0, 5.9),  # near ReLU6
    lambda x: x * F.relu6(x + 3) / 6.1,  # near hard-swish
])
def test_near_misses_are_custom(f):
    assert _label(f) == "custom"


def test_custom_expression_gain_is_its_quadrature():
    links = initlab.find_activations(Net(lambda x: x * torch.sigmoid(1.6 * x)))
    act = links["fc1"].activation
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mc = float((act.fn(z) ** 2).mean())
    assert initlab.gain(act) == pytest.approx(mc ** -0.5, rel=2e-3)
    assert "custom" in links["fc1"].note


def test_non_elementwise_is_not_an_activation():
    assert _label(lambda x: torch.softmax(x, -1)) is None
    assert fingerprint(lambda x: x - x.mean()) is None
    assert fingerprint(nn.Dropout(0.5).train()) is None  # not deterministic


@pytest.mark.parametrize("module,expected", [
    (nn.Hardsigmoid(), "hardsigmoid"), (nn.RReLU(0.1, 0.3), "rrelu(0.2)"), (nn.Threshold(0.0, 0.0), "relu"),
    (nn.Hardswish(), "hardswish"), (nn.LeakyReLU(0.2), "leaky_relu(0.2)"),
])
def test_modules_traced_and_untraced(module, expected):
    assert _label(module) == expected
    assert _label(module, Untraceable) == expected


class SwishModule(nn.Module):  # a user module the table does not know
    def forward(self, x):
        return x * torch.sigmoid(x)


def test_unknown_module_in_registration_order():
    link = initlab.find_activations(Untraceable(SwishModule()))["fc1"]
    assert not link.traced and link.activation.label == "silu"


def test_hf_activation_classes():
    acts = pytest.importorskip("transformers.activations")
    expected = {"NewGELUActivation": "gelu_tanh", "GELUActivation": "gelu", "QuickGELUActivation": "quick_gelu",
                "SiLUActivation": "silu", "FastGELUActivation": "gelu_tanh"}
    for cls, name in expected.items():
        if hasattr(acts, cls):
            assert _label(getattr(acts, cls)(), Untraceable) == name, cls
            assert _label(getattr(acts, cls)()) == name, cls


def test_fingerprint_matches_every_table_row():
    for name in initlab.activation_names():
        act = initlab.resolve_activation(name)
        got = fingerprint(lambda x, a=act: a.fn(x))
        assert got is not None and got.name in {name, "leaky_relu", "elu", "relu"}, name
