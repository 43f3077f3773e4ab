"""initlab.theory: quadrature and mean-field maps against closed forms, the variance recursion
against wide random networks, and the Jacobian spectrum (dynamical isometry)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import integrate
from torch import nn

from initlab import theory as T
from initlab._activations import activation_names, resolve_activation
from initlab._errors import InitlabError


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The simulations are many small matrix products: one thread is faster than two fighting
    over a busy machine's cores (restored afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def erf_act(x: torch.Tensor) -> torch.Tensor:
    """A custom callable (not in the activation table) with closed-form Gaussian moments."""
    return torch.erf(x)


def _erf_sq(q: float) -> float:  # E[erf(u)^2], u ~ N(0, q)
    return 2 / math.pi * math.asin(2 * q / (1 + 2 * q))


def _erf_cov(q: float, c: float) -> float:  # E[erf(u1) erf(u2)], Var q, correlation c
    return 2 / math.pi * math.asin(2 * q * c / (1 + 2 * q))


def _erf_dcov(q: float, c: float) -> float:  # E[erf'(u1) erf'(u2)]
    return 4 / math.pi / math.sqrt((1 + 2 * q) ** 2 - (2 * q * c) ** 2)


def _relu_cov(q: float, c: float) -> float:  # arc-cosine kernel (Cho & Saul 2009)
    return q / (2 * math.pi) * (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c)


def _quad(g, q: float, points=()) -> float:
    """Reference E[g(u)], u ~ N(0, q), by adaptive quadrature (scipy)."""
    s = math.sqrt(q)
    lim = 12 * s
    pts = sorted({0.0, *[p for p in points if abs(p) < lim]})
    val, _ = integrate.quad(lambda u: g(u) * math.exp(-u * u / (2 * q)) / math.sqrt(2 * math.pi * q),
                            -lim, lim, points=pts, limit=500, epsabs=1e-15, epsrel=1e-13)
    return val


# ------------------------------------------------------------------------------------------
# Gaussian expectations


def test_gaussian_moments_closed_forms():
    for q in (1e-3, 0.5, 2.0, 88.0):
        m = T.gaussian_moments("relu", q)
        assert m["sq_mean"] == pytest.approx(q / 2, rel=1e-12)
        assert m["grad_sq_mean"] == pytest.approx(0.5, rel=1e-12)
        assert m["mean"] == pytest.approx(math.sqrt(q / (2 * math.pi)), rel=1e-12)
        lk = T.gaussian_moments(nn.LeakyReLU(0.2), q)
        assert lk["sq_mean"] == pytest.approx(q * (1 + 0.04) / 2, rel=1e-12)
        assert lk["grad_sq_mean"] == pytest.approx((1 + 0.04) / 2, rel=1e-12)
        lin = T.gaussian_moments(None, q)
        assert (lin["sq_mean"], lin["grad_sq_mean"]) == (pytest.approx(q, rel=1e-12), pytest.approx(1.0, rel=1e-12))
        e = T.gaussian_moments(erf_act, q)
        assert e["sq_mean"] == pytest.approx(_erf_sq(q), rel=1e-10)
        assert e["grad_sq_mean"] == pytest.approx(4 / math.pi / math.sqrt(1 + 4 * q), rel=1e-10)
    # vectorised, and the q -> 0 limit (ReLU's kink has measure zero)
    v = T.gaussian_moments("relu", [0.0, 1.0, 4.0])
    assert v["sq_mean"] == pytest.approx([0.0, 0.5, 2.0], abs=1e-12)
    assert v["grad_sq_mean"] == pytest.approx([0.5, 0.5, 0.5], rel=1e-12)
    assert T.gaussian_moments("tanh", 0.0)["grad_sq_mean"] == pytest.approx(1.0, rel=1e-12)


def test_table_second_moments_agree():
    """Every closed form E[phi(z)^2] of the activation table, by quadrature."""
    checked = 0
    for name in activation_names():
        act = resolve_activation(name)
        if act.second_moment is not None:
            assert T.gaussian_moments(name, 1.0)["sq_mean"] == pytest.approx(act.second_moment, rel=1e-12), name
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize("q", [0.3, 10.0, 88.0, 450.0])
def test_saturating_activations_at_large_variance(q):
    """Sharp features at large q (a sigmoid layer with N(0, 1) weights on MNIST has q ~= 88):
    plain Gauss-Hermite is percent-level off here; the graded rule is not."""
    from scipy.special import expit as sig
    ref_sq = _quad(lambda u: sig(u) ** 2, q)
    ref_d = _quad(lambda u: (sig(u) * (1 - sig(u))) ** 2, q)
    m = T.gaussian_moments("sigmoid", q)
    assert m["sq_mean"] == pytest.approx(ref_sq, rel=1e-9)
    assert m["grad_sq_mean"] == pytest.approx(ref_d, rel=1e-9)
    ref_t = _quad(lambda u: 1 / math.cosh(min(abs(u), 100.0)) ** 4, q)
    assert T.gaussian_moments("tanh", q)["grad_sq_mean"] == pytest.approx(ref_t, rel=1e-9)


@pytest.mark.parametrize("name,f,kinks", [
    ("relu6", lambda u: min(max(u, 0.0), 6.0), (0.0, 6.0)),
    ("hardtanh", lambda u: min(max(u, -1.0), 1.0), (-1.0, 1.0)),
    ("hardswish", lambda u: u * min(max(u + 3, 0.0), 6.0) / 6, (-3.0, 3.0)),
])
def test_kinks_away_from_zero(name, f, kinks):
    for q in (0.5, 10.0, 88.0):
        assert T.gaussian_moments(name, q)["sq_mean"] == pytest.approx(_quad(lambda u: f(u) ** 2, q, kinks), rel=1e-10)


def test_custom_callable_without_autograd_uses_finite_differences():
    def numpy_tanh(x: torch.Tensor) -> torch.Tensor:  # invisible to autograd
        return torch.from_numpy(np.tanh(x.detach().numpy()))

    for q in (0.2, 3.0):
        got = T.gaussian_moments(numpy_tanh, q)["grad_sq_mean"]
        assert got == pytest.approx(T.gaussian_moments("tanh", q)["grad_sq_mean"], rel=1e-7)
    assert T.chi1(numpy_tanh, 1.5, 0.05) == pytest.approx(T.chi1("tanh", 1.5, 0.05), rel=1e-7)


# ------------------------------------------------------------------------------------------
# mean field: length map, q*, chi1, critical sw2


def test_length_map_and_q_star_closed_forms():
    assert T.length_map(2.0, "relu", 1.5, 0.1) == pytest.approx(1.5 * 1.0 + 0.1, rel=1e-12)
    assert T.length_map(np.array([1.0, 2.0]), None, 0.5, 0.2) == pytest.approx([0.7, 1.2], rel=1e-12)
    for sw2, sb2 in ((1.0, 0.1), (1.5, 0.3), (1.99, 0.05)):
        assert T.q_star("relu", sw2, sb2) == pytest.approx(sb2 / (1 - sw2 / 2), rel=1e-10)
        assert T.q_star("linear", sw2 / 2, sb2) == pytest.approx(sb2 / (1 - sw2 / 2), rel=1e-10)
    assert T.q_star("relu", 2.5, 0.1) == math.inf  # L(q) = 1.25 q + 0.1 grows without bound
    assert T.q_star("relu", 1.5, 0.0) == 0.0
    assert T.q_star("tanh", 0.9, 0.0) == 0.0  # ordered phase without bias
    for sw2, sb2 in ((2.0, 0.0), (1.5, 0.05), (4.0, 0.3)):
        q = T.q_star(erf_act, sw2, sb2)
        assert q > 0 and sw2 * _erf_sq(q) + sb2 == pytest.approx(q, rel=1e-10)
        q = T.q_star("tanh", sw2, sb2)
        assert T.length_map(q, "tanh", sw2, sb2) == pytest.approx(q, rel=1e-10)


def test_chi1_closed_forms():
    for sw2 in (0.5, 1.5, 3.0):  # 3.0: q* diverges, the large-length limit is still sw2 / 2
        assert T.chi1("relu", sw2, 0.1) == pytest.approx(sw2 / 2, rel=1e-12)
        assert T.chi1(nn.LeakyReLU(0.1), sw2, 0.1) == pytest.approx(sw2 * 1.01 / 2, rel=1e-12)
        assert T.chi1(None, sw2 / 2, 0.1) == pytest.approx(sw2 / 2, rel=1e-12)
    for sw2, sb2 in ((1.5, 0.05), (3.0, 0.0)):
        q = T.q_star(erf_act, sw2, sb2)
        assert T.chi1(erf_act, sw2, sb2) == pytest.approx(sw2 * 4 / math.pi / math.sqrt(1 + 4 * q), rel=1e-10)


def test_critical_sw2_known_values():
    assert T.critical_sw2("relu") == pytest.approx(2.0, rel=1e-10)
    assert T.critical_sw2("relu", 0.3) == pytest.approx(2.0, rel=1e-10)
    assert T.critical_sw2(nn.LeakyReLU(0.2)) == pytest.approx(2 / 1.04, rel=1e-10)
    assert T.critical_sw2("linear", 0.1) == pytest.approx(1.0, rel=1e-10)
    # sb2 = 0, odd activations: chi1 - 1 is flat (quadratic) above the transition, hence 1e-6
    assert T.critical_sw2("tanh") == pytest.approx(1.0, rel=1e-6)
    assert T.critical_sw2(erf_act) == pytest.approx(math.pi / 4, rel=1e-6)
    # Schoenholz et al. (2017): tanh at sb2 = 0.05 is critical at sw2 ~= 1.76
    s = T.critical_sw2("tanh", 0.05)
    assert s == pytest.approx(1.76, abs=0.005)
    assert T.chi1("tanh", s, 0.05) == pytest.approx(1.0, abs=1e-9)
    s = T.critical_sw2("sigmoid", 0.1)
    assert T.chi1("sigmoid", s, 0.1) == pytest.approx(1.0, abs=1e-9)
    # more bias needs larger weights to reach the edge of chaos
    assert T.critical_sw2("tanh", 0.05) < T.critical_sw2("tanh", 0.2) < T.critical_sw2("tanh", 0.5)


def test_critical_sw2_absent():
    with pytest.raises(InitlabError, match="no critical sw2"):
        T.critical_sw2(lambda x: 0.0 * x + 1.0)


# ------------------------------------------------------------------------------------------
# mean field: correlation map, c*, depth scales


@pytest.mark.parametrize("q", [0.05, 1.0, 30.0])
def test_correlation_map_closed_forms(q):
    cs = np.array([-0.95, -0.3, 0.0, 0.4, 0.9, 0.999])
    sw2, sb2 = 1.5, 0.2
    want = [(sw2 * _relu_cov(q, c) + sb2) / (sw2 * q / 2 + sb2) for c in cs]
    assert T.correlation_map(cs, q, "relu", sw2, sb2) == pytest.approx(want, abs=1e-10)
    want = [(sw2 * _erf_cov(q, c) + sb2) / (sw2 * _erf_sq(q) + sb2) for c in cs]
    assert T.correlation_map(cs, q, erf_act, sw2, sb2) == pytest.approx(want, abs=1e-9)
    assert T.correlation_map(1.0, q, "tanh", sw2, sb2) == pytest.approx(1.0, abs=1e-13)
    assert T.correlation_map(-1.0, q, "tanh", sw2, 0.0) == pytest.approx(-1.0, abs=1e-12)  # odd, no bias


def test_c_star():
    assert T.c_star("tanh", 1.2, 0.05) == 1.0  # ordered: inputs align
    assert T.c_star("relu", 1.5, 0.1) == 1.0
    assert T.c_star("tanh", 2.0, 0.0) == pytest.approx(0.0, abs=1e-12)  # odd, no bias: C(0) = 0
    for sw2, sb2 in ((2.5, 0.05), (4.0, 0.3)):
        c = T.c_star(erf_act, sw2, sb2)
        q = T.q_star(erf_act, sw2, sb2)
        assert 0 < c < 1
        # the fixed point of the closed-form map (independent of the 2-D quadrature)
        assert (sw2 * _erf_cov(q, c) + sb2) / q == pytest.approx(c, abs=1e-9)
    c = T.c_star("tanh", 2.5, 0.05)
    assert T.correlation_map(c, None, "tanh", 2.5, 0.05) == pytest.approx(c, abs=1e-10)


def test_depth_scales():
    for sw2 in (0.8, 1.5, 1.9):  # ReLU with bias is ordered for sw2 < 2: chi_q = chi_c = chi1 = sw2 / 2
        xi_q, xi_c = T.depth_scales("relu", sw2, 0.1)
        assert xi_q == pytest.approx(-1 / math.log(sw2 / 2), rel=1e-9)
        assert xi_c == pytest.approx(-1 / math.log(sw2 / 2), rel=1e-9)
    # xi_q = -1 / ln L'(q*): against a finite-difference slope of the length map
    for act, sw2, sb2 in (("tanh", 1.5, 0.05), ("tanh", 3.0, 0.3), (erf_act, 2.0, 0.1)):
        q = T.q_star(act, sw2, sb2)
        h = 1e-5 * q
        slope = (T.length_map(q + h, act, sw2, sb2) - T.length_map(q - h, act, sw2, sb2)) / (2 * h)
        assert T.depth_scales(act, sw2, sb2)[0] == pytest.approx(-1 / math.log(slope), rel=1e-6)
    # chaotic phase: xi_c = -1 / ln C'(c*), against the closed-form erf map's slope
    sw2, sb2 = 2.5, 0.05
    q, c = T.q_star(erf_act, sw2, sb2), T.c_star(erf_act, sw2, sb2)
    chi_c = sw2 * _erf_dcov(q, c)
    assert T.depth_scales(erf_act, sw2, sb2)[1] == pytest.approx(-1 / math.log(chi_c), rel=1e-8)
    # xi_c diverges at the edge of chaos and falls off on both sides
    crit = T.critical_sw2("tanh", 0.05)
    xs = [T.depth_scales("tanh", s, 0.05)[1] for s in (1.2, 1.6, 1.74, 1.78, 2.0, 3.0)]
    assert xs[0] < xs[1] < xs[2] and xs[3] > xs[4] > xs[5]
    assert T.depth_scales("tanh", crit, 0.05)[1] > 1e4


def test_mean_field_summary():
    crit = T.critical_sw2("tanh", 0.05)
    mf = T.mean_field("tanh", crit, 0.05)
    assert mf.phase == "critical" and mf.c_star == 1.0 and mf.xi_c > 1e4
    assert T.mean_field("tanh", 1.0, 0.05).phase == "ordered"
    chaotic = T.mean_field("tanh", 2.5, 0.05)
    assert chaotic.phase == "chaotic" and chaotic.c_star < 1 and chaotic.chi_c < 1
    div = T.mean_field("relu", 3.0, 0.1)
    assert div.q_star == math.inf and div.chi1 == pytest.approx(1.5) and math.isnan(div.c_star)


def test_mean_field_input_errors():
    with pytest.raises(InitlabError, match="sw2"):
        T.q_star("tanh", -1.0)
    with pytest.raises(InitlabError, match="sb2"):
        T.chi1("tanh", 1.0, float("nan"))
    with pytest.raises(InitlabError, match="did you mean 'tanh'"):
        T.q_star("tanhh", 1.0)
    with pytest.raises(InitlabError, match="c must be <= 1"):
        T.correlation_map(1.5, 1.0, "tanh", 1.0)
    with pytest.raises(InitlabError, match="q\\* diverges"):
        T.c_star("relu", 3.0, 0.1)
    with pytest.raises(InitlabError, match="same shape"):
        T.gaussian_moments(lambda x: x.sum(), 1.0)


# ------------------------------------------------------------------------------------------
# the variance recursion: arithmetic, model reading


def test_forward_recursion_by_hand():
    specs = [T.LayerSpec(784, 100, 1.0, 0.0, "sigmoid"), T.LayerSpec(100, 10, 0.02, 0.1, None)]
    out = T.forward_variances(0.1124, specs)
    assert out["pre_var"][0] == pytest.approx(784 * 0.1124)  # ~= 88: E[x^2], not Var(x)
    e = T.gaussian_moments("sigmoid", 784 * 0.1124)
    assert out["post_sq_mean"][0] == pytest.approx(e["sq_mean"])
    assert out["post_mean"][0] == pytest.approx(0.5, abs=1e-12)  # sigmoid(h) - 1/2 is odd
    assert out["post_var"][0] == pytest.approx(e["sq_mean"] - 0.25)
    assert out["input_sq_mean"][1] == out["post_sq_mean"][0]
    assert out["pre_var_no_bias"][1] == pytest.approx(100 * 0.02 * e["sq_mean"])
    assert out["pre_var"][1] == pytest.approx(100 * 0.02 * e["sq_mean"] + 0.1)
    assert out["post_sq_mean"][1] == out["pre_var"][1] and out["post_mean"][1] == 0.0  # readout


def test_per_sample_lengths():
    rng = np.random.default_rng(0)
    ex2 = rng.uniform(0.05, 0.2, size=50)
    relu = [T.LayerSpec(784, 300, 2 / 784, 0.0, "relu"), T.LayerSpec(300, 10, 2 / 300, 0.0, "relu")]
    a, b = T.forward_variances(ex2, relu), T.forward_variances(ex2.mean(), relu)
    assert a["pre_var"] == pytest.approx(b["pre_var"], rel=1e-12)  # homogeneous: lengths just average
    assert a["pre_var_per_sample"].shape == (2, 50)
    sig = [T.LayerSpec(784, 300, 1.0, 0.0, "sigmoid"), T.LayerSpec(300, 10, 1 / 300, 0.0, None)]
    a = T.forward_variances(ex2, sig)
    b = T.forward_variances(ex2.mean(), sig)
    want = np.mean([T.gaussian_moments("sigmoid", 784 * m)["sq_mean"] for m in ex2])
    assert a["post_sq_mean"][0] == pytest.approx(want, rel=1e-12)
    # E[sigmoid'(h)^2] ~ q^-1/2 is convex in q: the per-sample backward prediction is larger
    ga, gb = T.backward_variances(1.0, sig, a), T.backward_variances(1.0, sig, b["pre_var"])
    assert ga[0] > gb[0] * 1.01


def test_backward_recursion_by_hand():
    specs = [T.LayerSpec(20, 30, 0.1, 0.0, "relu"), T.LayerSpec(30, 40, 0.05, 0.0, "tanh"),
             T.LayerSpec(40, 5, 0.2, 0.0, None)]
    fwd = T.forward_variances(1.0, specs)
    g = T.backward_variances(2.0, specs, fwd["pre_var"])
    d_tanh = T.gaussian_moments("tanh", fwd["pre_var"][1])["grad_sq_mean"]
    assert g[2] == 2.0
    assert g[1] == pytest.approx(2.0 * 5 * 0.2 * d_tanh)
    assert g[0] == pytest.approx(g[1] * 40 * 0.05 * 0.5)
    assert T.backward_variances(2.0, specs, fwd) == pytest.approx(g)  # the dict works too


def test_exploding_chain_overflows_quietly():
    specs = [T.LayerSpec(1000, 1000, 1.0, 0.0, "relu")] * 130  # x500 per layer: past 1e308
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fwd = T.forward_variances(1.0, specs)
        bwd = T.backward_variances(1.0, specs, fwd)
    assert fwd["pre_var"][0] == 1000.0 and fwd["pre_var"][1] == pytest.approx(5e5)
    assert math.isinf(fwd["pre_var"][-1])
    assert bwd[-2] == pytest.approx(500.0) and math.isinf(bwd[0])


def test_recursion_input_errors():
    spec = T.LayerSpec(10, 10, 0.1)
    with pytest.raises(InitlabError, match="fan_in"):
        T.LayerSpec(0, 10, 0.1)
    with pytest.raises(InitlabError, match="weight_var"):
        T.LayerSpec(10, 10, -0.1)
    with pytest.raises(InitlabError, match="empty"):
        T.forward_variances(1.0, [])
    with pytest.raises(InitlabError, match="input_sq_mean"):
        T.forward_variances(-1.0, [spec])
    with pytest.raises(InitlabError, match="LayerSpec"):
        T.forward_variances(1.0, [(10, 10, 0.1)])
    with pytest.raises(InitlabError, match="one entry"):
        T.backward_variances(1.0, [spec, spec], [1.0])


def test_layer_specs_from_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 30), nn.ReLU(), nn.Linear(30, 20, bias=False), nn.Tanh(), nn.Linear(20, 3))
    nn.init.normal_(m[0].bias, std=0.3)
    specs = T.layer_specs_from_model(m)
    assert [s.name for s in specs] == ["0", "2", "4"]
    assert [(s.fan_in, s.fan_out) for s in specs] == [(12, 30), (30, 20), (20, 3)]
    assert [None if s.activation is None else s.activation.name for s in specs] == ["relu", "tanh", None]
    assert specs[0].weight_var == pytest.approx(float(m[0].weight.detach().var(unbiased=False)))
    assert specs[0].bias_var == pytest.approx(float(m[0].bias.detach().var(unbiased=False)))
    assert specs[1].bias_var == 0.0
    sq = T.layer_specs_from_model(m, stat="sq_mean")
    assert sq[0].weight_var == pytest.approx(float(m[0].weight.detach().square().mean()))
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4), nn.Flatten())
    cs = T.layer_specs_from_model(conv)
    assert [(s.fan_in, s.fan_out) for s in cs] == [(27, 72), (18, 18)]
    with pytest.raises(InitlabError, match="weight statistic"):
        T.layer_specs_from_model(m, stat="std")
    with pytest.raises(InitlabError, match="no Linear"):
        T.layer_specs_from_model(nn.Sequential(nn.ReLU()))


def test_layer_specs_forward_order():
    class Reversed(nn.Module):  # registered b, a; called a, b
        def __init__(self):
            super().__init__()
            self.b = nn.Linear(6, 2)
            self.a = nn.Linear(4, 6)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    m = Reversed()
    assert [s.name for s in T.layer_specs_from_model(m)] == ["b", "a"]
    specs = T.layer_specs_from_model(m, batch=torch.randn(3, 4))
    assert [s.name for s in specs] == ["a", "b"]
    assert specs[0].activation.name == "relu" and specs[1].activation is None
    assert not m.a._forward_hooks and not m.b._forward_hooks


# ------------------------------------------------------------------------------------------
# the recursion against wide random networks

WIDTH, DEPTH, BATCH, SEEDS = 1000, 3, 256, 16
# (activation for torch, for theory, weight variance from (fan_in, fan_out), bias variance)
CONFIGS = {
    "relu-he": (torch.relu, "relu", lambda i, o: 2.0 / i, 0.0),
    "tanh-xavier": (torch.tanh, "tanh", lambda i, o: 2.0 / (i + o), 0.0),
    "tanh-critical-bias": (torch.tanh, "tanh", lambda i, o: 1.76 / i, 0.05),
    "sigmoid-normal": (torch.sigmoid, "sigmoid", lambda i, o: 1.0, 0.0),
    "linear-lecun": (lambda z: z, None, lambda i, o: 1.0 / i, 0.0),
}


@pytest.fixture(scope="module")
def mnist():
    from initlab.lab.data import load_dataset

    x = load_dataset("mnist").x_train[:BATCH].double()
    assert float(x.mean()) > 0.1  # non-zero mean: E[x^2] and Var(x) differ by ~18%
    return x


def _simulate(x: torch.Tensor, act, wvar, bvar: float, seed: int) -> list[dict]:
    """One random network 784 -> 1000 x DEPTH (act) -> 1000 (readout); per layer the pooled
    variance of the pre-activation and of dL/d(pre-activation) for L = sum(out * G), G ~ N(0, 1),
    and the relative standard error of each over units (units are independent given the layer
    input, so std over units / sqrt(units) is the sampling error of the pooled value)."""
    g = torch.Generator().manual_seed(seed)
    fans = [x.shape[1]] + [WIDTH] * (DEPTH + 1)
    h, pres = x.float(), []
    for k in range(DEPTH + 1):
        w = torch.randn(fans[k + 1], fans[k], generator=g) * math.sqrt(wvar(fans[k], fans[k + 1]))
        b = torch.randn(fans[k + 1], generator=g) * math.sqrt(bvar)
        z = (h @ w.T + b).requires_grad_(True)
        pres.append(z)
        h = act(z) if k < DEPTH else z
    grads = torch.autograd.grad((h * torch.randn(h.shape, generator=g)).sum(), pres)
    rows = []
    for z, gr in zip(pres, grads):
        z = z.detach().double()
        unit_sq, unit_g = z.square().mean(0), gr.double().square().mean(0)
        rows.append({
            "pre_var": float(z.var(unbiased=False)),
            "pre_se": float(unit_sq.std() / unit_sq.mean()) / math.sqrt(unit_sq.numel()),
            "grad_var": float(gr.double().var(unbiased=False)),
            "grad_se": float(unit_g.std() / unit_g.mean()) / math.sqrt(unit_g.numel()),
        })
    return rows


def _specs(theory_act, wvar, bvar: float, d_in: int) -> list[T.LayerSpec]:
    fans = [d_in] + [WIDTH] * (DEPTH + 1)
    return [T.LayerSpec(fans[k], fans[k + 1], wvar(fans[k], fans[k + 1]), bvar, theory_act if k < DEPTH else None)
            for k in range(DEPTH + 1)]


@pytest.fixture(scope="module")
def simulations(mnist):
    return {name: [_simulate(mnist, act, wvar, bvar, seed) for seed in range(SEEDS)]
            for name, (act, _t, wvar, bvar) in CONFIGS.items()}


def _tolerance(runs: list[list[dict]], k: int, backward: bool) -> float:
    """5 standard errors of the mean (over seeds) of measured / predicted at layer k.

    Per network, the relative error of layer k's pooled variance is the sum of the independent
    unit-sampling errors of the layers it depends on (each passed on with a sensitivity of at
    most 1: exactly 1 for ReLU and linear layers, less for saturating ones): forward, layers
    0..k; backward, every forward layer and the gradient layers k..L. The seeds are independent
    networks. 2/width allows for the O(1/width) corrections to the wide-network limit.
    """
    var = []
    for rows in runs:
        pre = [r["pre_se"] ** 2 for r in rows]
        if backward:
            var.append(sum(pre) + sum(r["grad_se"] ** 2 for r in rows[k:]))
        else:
            var.append(sum(pre[: k + 1]))
    return 5.0 * math.sqrt(np.mean(var) / len(runs)) + 2.0 / WIDTH


@pytest.mark.parametrize("name", list(CONFIGS))
def test_recursion_matches_wide_networks(name, mnist, simulations):
    _act, theory_act, wvar, bvar = CONFIGS[name]
    runs = simulations[name]
    specs = _specs(theory_act, wvar, bvar, mnist.shape[1])
    per_sample_ex2 = mnist.square().mean(1).numpy()  # each example's own E[x^2]
    fwd = T.forward_variances(per_sample_ex2, specs)
    g_out = float(np.mean([rows[-1]["grad_var"] for rows in runs]))
    bwd = T.backward_variances(g_out, specs, fwd)
    for k in range(DEPTH + 1):
        ratio = np.mean([rows[k]["pre_var"] for rows in runs]) / fwd["pre_var"][k]
        tol = _tolerance(runs, k, backward=False)
        assert tol < 0.08  # the check stays tight: a few percent
        assert abs(ratio - 1) < tol, f"{name} layer {k}: measured/predicted pre_var = {ratio:.4f}, tol {tol:.4f}"
        gratio = np.mean([rows[k]["grad_var"] for rows in runs]) / bwd[k]
        gtol = _tolerance(runs, k, backward=True)
        assert gtol < 0.1
        assert abs(gratio - 1) < gtol, f"{name} layer {k}: measured/predicted grad var = {gratio:.4f}, tol {gtol:.4f}"
    if theory_act in ("relu", None):  # positively homogeneous: the batch mean of E[x^2] is enough
        one = T.forward_variances(float(per_sample_ex2.mean()), specs)
        assert one["pre_var"] == pytest.approx(fwd["pre_var"], rel=1e-12)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_variance_instead_of_second_moment_misses(name, mnist, simulations):
    """Negative control: feeding Var(x) instead of E[x^2] misses the first layer by ~18%, far
    outside the tolerance the correct prediction meets."""
    _act, theory_act, wvar, bvar = CONFIGS[name]
    runs = simulations[name]
    specs = _specs(theory_act, wvar, bvar, mnist.shape[1])
    wrong = T.forward_variances(float(mnist.var(unbiased=False)), specs)
    ratio = np.mean([rows[0]["pre_var"] for rows in runs]) / wrong["pre_var"][0]
    assert abs(ratio - 1) > 2 * _tolerance(runs, 0, backward=False)


def test_mnist_first_layer_with_standard_normal_weights(mnist):
    """The seeds' point: 784 * E[x^2] (~88 on the whole set), not 784 * Var(x) (~74)."""
    ex2, vx = float(mnist.square().mean()), float(mnist.var(unbiased=False))
    pred = T.forward_variances(ex2, [T.LayerSpec(784, 100, 1.0, 0.0, "sigmoid")])["pre_var"][0]
    assert pred == pytest.approx(784 * ex2) and 80 < pred < 95 and 784 * vx < 0.9 * pred


# ------------------------------------------------------------------------------------------
# Jacobian spectrum


def test_jacobian_spectrum_of_a_linear_map_is_exact():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5)
    s = T.jacobian_spectrum(lin, torch.randn(3, 7))
    want = torch.linalg.svdvals(lin.weight.detach().double()).numpy()
    assert s.shape == (3, 5)
    for row in s:
        assert row == pytest.approx(want, rel=1e-6)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten())
    assert T.jacobian_spectrum(conv, torch.randn(2, 1, 4, 4)).shape == (2, 16)


def test_jacobian_spectrum_input_errors():
    lin = nn.Linear(3, 2)
    with pytest.raises(InitlabError, match="torch.Tensor"):
        T.jacobian_spectrum(lin, [[1.0, 2.0, 3.0]])
    with pytest.raises(InitlabError, match="NaN"):
        T.jacobian_spectrum(lin, torch.tensor([[1.0, float("nan"), 0.0]]))
    with pytest.raises(InitlabError, match="batch dimension"):
        T.jacobian_spectrum(lin, torch.randn(3))
    with pytest.raises(InitlabError, match="failed"):
        T.jacobian_spectrum(lin, torch.randn(2, 4))  # wrong width


def _deep_tanh(width: int, depth: int, sw2: float, sb2: float, orthogonal: bool, seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        with torch.no_grad():
            if orthogonal:
                nn.init.orthogonal_(lin.weight, gain=math.sqrt(sw2), generator=g)
            else:
                lin.weight.normal_(0.0, math.sqrt(sw2 / width), generator=g)
            lin.bias.normal_(0.0, math.sqrt(sb2), generator=g)
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers)


def test_dynamical_isometry():
    """Pennington et al. (2017): a deep tanh network at the edge of chaos (small sb2, so q* is
    small) keeps its Jacobian's singular values near 1 with orthogonal weights; Gaussian weights
    of the same variance spread them over orders of magnitude (the negative control)."""
    sb2 = 1e-4
    sw2 = T.critical_sw2("tanh", sb2)
    assert T.chi1("tanh", sw2, sb2) == pytest.approx(1.0, abs=1e-9)
    width, depth = 64, 32
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(1)) * math.sqrt(T.q_star("tanh", sw2, sb2))
    orth = T.jacobian_spectrum(_deep_tanh(width, depth, sw2, sb2, True, 0), x)
    gauss = T.jacobian_spectrum(_deep_tanh(width, depth, sw2, sb2, False, 0), x)
    near_one = lambda s: float(np.mean((s > 0.5) & (s < 2.0)))  # noqa: E731
    assert near_one(orth) > 0.75 and near_one(gauss) < 0.25
    assert np.log(orth).std() < 1.0 < 3.0 < np.log(gauss).std()
    # mean squared singular value = prod of chi1 = 1 at criticality (up to finite width)
    assert 0.7 < float(np.mean(orth ** 2)) < 1.3


@pytest.mark.parametrize("name", ["identity", "relu", "leaky_relu", "prelu"])
def test_homogeneous_shortcut_matches_the_quadrature(name):
    phi = T._phi(name)
    assert phi.homogeneous
    q = np.logspace(-8, 12, 41)
    fast = T._expect_1d(phi, q, grad=True, stein=True)
    slow = T._expect_1d_quadrature(phi, q, True, True)
    # rounding noise of the quadrature sums is ~1e-16 of each term's scale (identity: E[phi] = 0)
    scale = {"mean": np.sqrt(q), "sq": q, "dsq": np.ones_like(q), "stein": np.ones_like(q)}
    for key in ("mean", "sq", "dsq", "stein"):
        assert np.all(np.abs(fast[key] - slow[key]) <= 1e-11 * np.abs(slow[key]) + 1e-14 * scale[key]), key


def test_homogeneous_shortcut_only_for_scale_free_activations():
    # negative control: relu6 and sigmoid are not homogeneous; scaling their q = 1 moments is wrong
    for name in ("relu6", "sigmoid", "elu"):
        phi = T._phi(name)
        assert not phi.homogeneous
        q = np.array([50.0])
        unit = T._expect_1d_quadrature(phi, np.ones(1), False, False)["sq"][0]
        assert abs(q[0] * unit - T._expect_1d(phi, q)["sq"][0]) > 1e-3 * T._expect_1d(phi, q)["sq"][0]


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_derivative_from_output_matches_autograd(name):
    phi = T._phi(name)
    u = np.linspace(-40.0, 40.0, 2001)
    f, df = phi.f_df(u)
    t = torch.from_numpy(u).requires_grad_(True)
    (g,) = torch.autograd.grad(resolve_activation(name).fn(t).sum(), t)
    np.testing.assert_allclose(df, g.numpy(), rtol=1e-12, atol=1e-15)  # phi' <= 1: rounding near 1 - y^2 = 0
    # negative control: the other activation's derivative formula differs
    other = resolve_activation("tanh" if name == "sigmoid" else "sigmoid").derivative_from_output
    assert np.max(np.abs(other(f) - g.numpy())) > 0.1


# ------------------------------------------------------------------------------------------
# critical sw2: true crossings only; the correlation map iterates on its own output


def _gelu_np(x):
    from scipy.special import ndtr
    return x * ndtr(x)


def _gelu_d_np(x):
    from scipy.special import ndtr
    return ndtr(x) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _gauss(g, q):
    """E[g(u)], u ~ N(0, q), by scipy's adaptive quadrature (independent of initlab's rules)."""
    s = math.sqrt(q)
    val, _ = integrate.quad(lambda z: g(s * z) * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi), -12, 12,
                            points=[0.0], limit=200, epsabs=1e-13, epsrel=1e-12)
    return val


def _scipy_q_star(sw2, sb2, q0=1.0, steps=400):
    q = q0
    for _ in range(steps):
        q = sw2 * _gauss(lambda u: _gelu_np(u) ** 2, q) + sb2
        if q > 1e12 or q < 1e-12:
            break
    return q


def test_critical_sw2_jump_raises_for_gelu_family():
    # independent facts (scipy quadrature): from q0 = 1, gelu's length falls to 0 just below
    # sw2 = 1 / E[gelu(z)^2] and diverges just above, so chi1 jumps from sw2 / 4 to sw2 / 2
    s_jump = 1.0 / _gauss(lambda u: _gelu_np(u) ** 2, 1.0)
    assert s_jump == pytest.approx(2.3517, abs=1e-4)
    assert _scipy_q_star(s_jump * 0.99, 0.0) < 1e-6 and _scipy_q_star(s_jump * 1.01, 0.0) > 1e6
    for act in ("gelu", "gelu_tanh", "silu", "mish", "hardswish"):
        with pytest.raises(InitlabError, match="chi1 jumps across 1") as got:
            T.critical_sw2(act)
        assert "no critical sw2" in str(got.value) and "\n" not in str(got.value)
    with pytest.raises(InitlabError, match=r"sw2 = 2\.3517.*from 0\.58.* to 1\.17"):
        T.critical_sw2("gelu")


def test_critical_sw2_jump_negative_control(monkeypatch):
    # without the continuity check the solver returns the jump, where chi1 is 0.59 on one side
    # and 1.18 on the other: the check above is what tells the two apart
    monkeypatch.setattr(T, "_JUMP", math.inf)
    monkeypatch.setattr(T, "_SOLVE_CACHE", type(T._SOLVE_CACHE)())  # nothing solved here is kept
    s = T.critical_sw2("gelu", 0.0)
    lo, hi = T.chi1("gelu", s * (1 - 1e-6)), T.chi1("gelu", s * (1 + 1e-6))
    assert lo == pytest.approx(s / 4, rel=1e-5) and hi == pytest.approx(s / 2, rel=1e-5)


def test_critical_sw2_gelu_with_bias_against_scipy():
    # with sb2 = 0.3 gelu has a true edge of chaos: q* and chi1 by scipy quadrature, chi1 = 1 there
    sb2 = 0.3
    s = T.critical_sw2("gelu", sb2)
    from scipy.optimize import brentq
    q_t = T.q_star("gelu", s, sb2)
    q = brentq(lambda x: s * _gauss(lambda u: _gelu_np(u) ** 2, x) + sb2 - x, 0.9 * q_t, 1.1 * q_t, xtol=1e-12)
    assert q == pytest.approx(q_t, rel=1e-7)
    assert s * _gauss(lambda u: _gelu_d_np(u) ** 2, q) == pytest.approx(1.0, abs=1e-8)
    for eps in (-1e-4, 1e-4):  # continuous on both sides
        assert T.chi1("gelu", s * (1 + eps), sb2) == pytest.approx(1.0, abs=1e-3)


def test_correlation_map_iterates_on_its_own_output():
    # silu at q = 3 used to give C(1) = 1.0000000000000002, which it then rejected as input
    c = np.array([1.0, 1 - 1e-15, 0.9, -1.0])
    for _ in range(30):
        c = T.correlation_map(c, 3.0, "silu", 0.5, 0.0)
        assert np.all(c <= 1.0) and np.all(c >= -1.0)
    assert T.correlation_map(1.0, 3.0, "silu", 0.5, 0.0) == 1.0
    assert T.correlation_map(1.0 + 1e-13, 1.0, "tanh", 1.0) == pytest.approx(1.0, abs=1e-13)
    # negative control: beyond rounding is still an error
    with pytest.raises(InitlabError, match="c must be <= 1"):
        T.correlation_map(1.0 + 1e-9, 1.0, "tanh", 1.0)
