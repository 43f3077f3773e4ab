"""initlab's names against their peers: ``torch_default`` is PyTorch's own default for every module
type, the ``kaiming_*`` schemes are ``torch.nn.init.kaiming_*_`` for every nonlinearity torch
accepts, and the xavier/he/lecun presets take ``distribution=`` with the same variance.

Each equality is a two-sample Kolmogorov-Smirnov test of the weights initlab draws against those
PyTorch draws (fixed seeds, p > 0.001), with a negative control that the test rejects: the old
behaviour (a distribution with the wrong variance or law) gives p < 1e-6.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

import initlab

P_SAME, P_DIFFERENT = 1e-3, 1e-6

MODULES = {
    "Linear": lambda: nn.Linear(200, 100),
    "Conv2d grouped strided": lambda: nn.Conv2d(16, 32, 3, stride=2, groups=2),
    "ConvTranspose2d strided": lambda: nn.ConvTranspose2d(16, 32, 3, stride=2),
    "Embedding": lambda: nn.Embedding(500, 64),
    "MultiheadAttention": lambda: nn.MultiheadAttention(64, 4),
    "MultiheadAttention kdim": lambda: nn.MultiheadAttention(64, 4, kdim=32, vdim=48),
    "Bilinear": lambda: nn.Bilinear(20, 30, 40),
}


def _weights(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().flatten() for n, p in m.named_parameters() if p.dim() >= 2}


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(stats.ks_2samp(a.numpy(), b.numpy()).pvalue)


@pytest.mark.parametrize("kind", list(MODULES))
def test_torch_default_is_pytorchs_default(kind):
    torch.manual_seed(0)
    ref = MODULES[kind]()
    mine = MODULES[kind]()
    initlab.init_model(mine, "torch_default", generator=torch.Generator().manual_seed(1))
    got, want = _weights(mine), _weights(ref)
    assert got.keys() == want.keys() and got
    for name in want:
        assert _ks(got[name], want[name]) > P_SAME, (kind, name)


def test_torch_default_negative_control():
    """The old rule (U(+-1/sqrt(fan_in)) with initlab's fans everywhere) is rejected by the same test."""
    torch.manual_seed(0)
    for kind, old in [("Embedding", lambda w: nn.init.uniform_(w, -1, 1)),
                      ("ConvTranspose2d strided", lambda w: initlab.get_scheme("he_uniform", activation="linear")(
                          w, fans=(16 * 9 / 4, 32 * 9)))]:
        ref = MODULES[kind]()
        w = ref.weight.detach().clone()
        old(w)
        assert _ks(w.flatten(), ref.weight.detach().flatten()) < P_DIFFERENT, kind


def test_torch_default_on_a_tensor_is_linears_default():
    w = torch.empty(300, 200)
    initlab.get_scheme("torch_default")(w, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    assert _ks(w.flatten(), nn.Linear(200, 300).weight.detach().flatten()) > P_SAME


NONLINEARITIES = [("linear", 0.0), ("conv2d", 0.0), ("sigmoid", 0.0), ("tanh", 0.0), ("relu", 0.0),
                  ("leaky_relu", 0.0), ("leaky_relu", 0.2), ("selu", 0.0)]


@pytest.mark.parametrize("dist", ["normal", "uniform"])
@pytest.mark.parametrize("nonlinearity,a", NONLINEARITIES)
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_kaiming_is_torchs_kaiming(dist, nonlinearity, a, mode):
    shape = (150, 60, 3)
    w = torch.empty(shape)
    initlab.get_scheme(f"kaiming_{dist}", a=a, mode=mode, nonlinearity=nonlinearity)(
        w, generator=torch.Generator().manual_seed(0))
    ref = torch.empty(shape)
    getattr(nn.init, f"kaiming_{dist}_")(ref, a=a, mode=mode, nonlinearity=nonlinearity,
                                          generator=torch.Generator().manual_seed(1))
    assert _ks(w.flatten(), ref.flatten()) > P_SAME


def test_kaiming_negative_control_and_errors():
    """he_normal (initlab's second-moment gain, the old kaiming_normal alias) is not torch's kaiming_normal_
    for selu or sigmoid (variance x1.78, x3.41); unknown nonlinearities say where to go."""
    for act in ("selu", "sigmoid"):
        w, ref = torch.empty(150, 180), torch.empty(150, 180)
        initlab.get_scheme("he_normal", activation=act)(w, generator=torch.Generator().manual_seed(0))
        nn.init.kaiming_normal_(ref, nonlinearity=act, generator=torch.Generator().manual_seed(1))
        assert _ks(w.flatten(), ref.flatten()) < P_DIFFERENT, act
    with pytest.raises(initlab.InitlabError, match="he_normal"):
        initlab.get_scheme("kaiming_normal", nonlinearity="gelu")


@pytest.mark.parametrize("name", ["xavier_normal", "xavier_uniform", "he_normal", "he_uniform",
                                  "lecun_normal", "lecun_uniform"])
def test_distribution_option_keeps_the_variance(name):
    shape = (400, 250)
    var = {n: None for n in ("normal", "truncated_normal", "uniform")}
    for dist in var:
        w = torch.empty(shape)
        initlab.get_scheme(name, distribution=dist)(w, generator=torch.Generator().manual_seed(3))
        var[dist] = float(w.var())
        if dist == "truncated_normal":  # truncated at 2 sigma: nothing beyond 2 / 0.8796 std
            assert float(w.abs().max()) <= 2 / 0.87962566 * math.sqrt(var[dist]) * 1.01
    target = initlab.get_scheme(name).target_std(shape=shape) ** 2
    se = target * math.sqrt(2 / (shape[0] * shape[1])) * 1.2  # the standard error of a sample variance (kurtosis <= 3)
    for dist, v in var.items():
        assert abs(v - target) < 5 * se, (name, dist, v, target)
