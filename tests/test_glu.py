"""nn.GLU: recognised as an activation, its gain by quadrature, the halved width handled by the fans."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import initlab
from initlab._activations import GLU_SECOND_MOMENT

from test_auto_depth import _pre_activation_moments

WIDTH, DEPTH, N = 128, 30, 256


def test_second_moment_by_quadrature_matches_scipy():
    integrate = pytest.importorskip("scipy.integrate")
    special = pytest.importorskip("scipy.special")
    ref = integrate.quad(lambda z: special.expit(z) ** 2 * math.exp(-z * z / 2) / math.sqrt(2 * math.pi),
                         -math.inf, math.inf, epsabs=1e-14)[0]
    assert GLU_SECOND_MOMENT == pytest.approx(ref, rel=1e-10)
    assert initlab.gain("glu") == pytest.approx(ref ** -0.5, rel=1e-10)
    assert initlab.gain(nn.GLU()) == initlab.gain("glu")


def test_second_moment_by_monte_carlo():
    # E[(a sigmoid(b))^2] for independent standard normal halves; s.e. from the sample itself
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400_000, 2, generator=g, dtype=torch.float64)
    y2 = nn.functional.glu(x, dim=-1).square().flatten()
    se = float(y2.std()) / math.sqrt(y2.numel())
    assert abs(float(y2.mean()) - GLU_SECOND_MOMENT) < 4 * se
    assert abs(float(y2.mean()) - 0.25) > 4 * se  # negative control: E[z^2] E[sigmoid(0)^2] is not it


def _mlp(depth: int = DEPTH) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(WIDTH, 2 * WIDTH, bias=False), nn.GLU()]  # GLU halves 2 WIDTH to WIDTH
    return nn.Sequential(*layers, nn.Linear(WIDTH, 10, bias=False))


def _moments(model: nn.Sequential) -> list[float]:
    return _pre_activation_moments(model, torch.randn(N, WIDTH, generator=torch.Generator().manual_seed(1)))


def test_auto_links_glu_and_uses_its_gain():
    model = _mlp(3)
    links = initlab.find_activations(model)
    assert links["0"].activation.name == "glu" and links["2"].fed_by.name == "glu"
    rep = initlab.init_model(model, "auto", exact=False, generator=torch.Generator().manual_seed(0))
    row = rep["0"]
    assert row["activation"] == "glu" and row["scheme"] == "he_normal"
    assert (row["fan_in"], row["fan_out"]) == (WIDTH, 2 * WIDTH)
    assert row["target_std"] == pytest.approx(initlab.gain("glu") / math.sqrt(WIDTH))
    rep = initlab.init_model(model, "auto", calibrate=False, generator=torch.Generator().manual_seed(0))
    assert rep["2"]["gain"] == pytest.approx(GLU_SECOND_MOMENT ** -0.5)  # fed by a GLU: 1/E[x^2]


def test_deep_glu_mlp_stays_in_band():
    # depth 10: the correction pass measures on one synthetic batch, and a GLU stack (a product of two
    # linear maps) amplifies that batch's sampling error with depth; at depth 30 another batch can
    # leave the band (a known limit: GLU is not an elementwise activation of the table)
    model = _mlp(10)
    initlab.init_model(model, "auto", generator=torch.Generator().manual_seed(0))
    q = _moments(model)
    assert all(0.5 <= v <= 2.0 for v in q), (min(q), max(q))


def test_negative_control_glu_read_as_a_readout_shrinks():
    # what auto did before GLU was recognised: LeCun everywhere, x0.29 per layer
    model = _mlp()
    initlab.init_model(model, "lecun_normal", generator=torch.Generator().manual_seed(0))
    q = _moments(model)
    assert min(q) < 0.5
