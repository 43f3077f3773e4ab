"""Named schemes: realised std vs target for every scheme, orthogonality, registry errors, CLI."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

import initlab
from initlab import InitlabError, get_scheme, register_scheme, schemes
from initlab._engine import TRUNC_VAR
from initlab._schemes import TF1_REALISED_FACTOR, identity_
from initlab.cli import main

SEED = 99
KURT = {"normal": 0.0, "uniform": -1.2, "truncated_normal": float(stats.truncnorm(-2, 2).stats(moments="k"))}


def gen(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def var_z(x: torch.Tensor, var: float, distribution: str) -> float:
    a = x.detach().double().numpy().ravel()
    se = var * math.sqrt((KURT[distribution] + 2.0) / a.size)
    return abs(float(np.var(a)) - var) / se


MODEL_ONLY = ("auto", "lsuv")  # need the whole model (and, for lsuv, a batch): tested through init_model
STOCHASTIC = [n for n in schemes() if n not in MODEL_ONLY + ("zeros", "identity")]


def test_registry_has_every_named_scheme():
    expected = {"normal", "xavier_normal", "xavier_uniform", "xavier_caffe", "he_normal", "he_uniform",
                "lecun_normal", "lecun_uniform", "kumar", "torch_default", "tf1_variance_scaling",
                "orthogonal", "delta_orthogonal", "identity", "zeros", "auto", "lsuv"}
    assert expected <= set(schemes())
    assert get_scheme("dirac").name == "identity"


@pytest.mark.parametrize("name", [n for n in schemes() if n not in MODEL_ONLY])
def test_every_scheme_realises_its_target_std(name):
    s = get_scheme(name)
    w = torch.empty(256, 384)
    s(w, generator=gen())
    target = s.target_std((384, 256), shape=(256, 384))
    assert target is not None
    if s.distribution is not None:  # variance scaling: 5 standard errors
        assert var_z(w, target ** 2, s.distribution) < 5.0
    else:
        assert float(w.std()) == pytest.approx(target, rel=0.02)


@pytest.mark.parametrize("name", [n for n in schemes() if n not in MODEL_ONLY])
def test_every_scheme_on_conv_meta_and_half(name):
    s = get_scheme(name)
    w = torch.empty(8, 4, 3, 3, dtype=torch.float16)
    assert s(w, generator=gen()) is w
    assert torch.isfinite(w).all()
    m = torch.empty(8, 4, 3, 3, device="meta")
    assert s(m, generator=gen()) is m


@pytest.mark.parametrize("name", STOCHASTIC)
def test_every_scheme_reproducible(name):
    s = get_scheme(name)
    a = s(torch.empty(20, 30), generator=gen(1))
    b = s(torch.empty(20, 30), generator=gen(1))
    c = s(torch.empty(20, 30), generator=gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_variance_check_negative_control():
    # He on a 384-fan layer does not realise Xavier's variance: the check can fail
    w = get_scheme("he_normal")(torch.empty(256, 384), generator=gen())
    assert var_z(w, 2.0 / (256 + 384), "normal") > 5.0


def test_normal_baseline():
    w = get_scheme("normal")(torch.empty(300, 300), generator=gen())
    assert var_z(w, 1.0, "normal") < 5.0
    b = initlab.normal_(torch.empty(100_000), 0.5, mean=2.0, generator=gen())  # 1-d is fine here
    assert float(b.mean()) == pytest.approx(2.0, abs=5 * 0.5 / math.sqrt(1e5))
    assert var_z(b - 2.0, 0.25, "normal") < 5.0


@pytest.mark.parametrize("a", [0.0, 0.2])
def test_he_leaky_variance(a):
    w = torch.empty(300, 400)
    initlab.he_normal_(w, "leaky_relu", a, generator=gen())
    assert var_z(w, 2.0 / ((1 + a * a) * 400), "normal") < 5.0
    s = get_scheme("he_uniform", activation="leaky_relu", param=a, mode="fan_out")
    assert s.target_std((400, 300)) == pytest.approx(math.sqrt(2.0 / ((1 + a * a) * 300)))


def test_kumar_sigmoid_variance():
    w = initlab.kumar_(torch.empty(300, 400), "sigmoid", generator=gen())
    assert var_z(w, 12.8 / 400, "normal") < 5.0
    assert get_scheme("kumar", activation="tanh").target_std((400, 300)) == pytest.approx(1 / 20)


def test_torch_default_matches_nn_linear():
    ours = get_scheme("torch_default")(torch.empty(200, 500), generator=gen()).numpy().ravel()
    torch.manual_seed(0)
    theirs = nn.Linear(500, 200).weight.detach().numpy().ravel()
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3
    assert np.abs(ours).max() <= 1 / math.sqrt(500)
    # negative control: Xavier uniform is a different distribution for this shape
    xav = get_scheme("xavier_uniform")(torch.empty(200, 500), generator=gen()).numpy().ravel()
    assert stats.ks_2samp(xav, theirs).pvalue < 1e-6


def test_tf1_truncated_is_not_variance_corrected():
    factor, n = 2.0, 100
    s = get_scheme("tf1_variance_scaling", factor=factor, mode="FAN_IN")
    w = s(torch.empty(20_000, 100), generator=gen())  # 2M samples: SE of the variance ~0.08%
    sigma = math.sqrt(1.3 * factor / n)
    assert TF1_REALISED_FACTOR == pytest.approx(1.3 * TRUNC_VAR) == pytest.approx(1.0058637, rel=1e-7)
    assert var_z(w, TF1_REALISED_FACTOR * factor / n, "truncated_normal") < 5.0
    assert var_z(w, factor / n, "truncated_normal") > 5.0  # realised variance is 0.59% above factor / n
    assert float(w.abs().max()) <= 2 * sigma * (1 + 1e-6)
    sub = w.flatten()[:200_000].double().numpy()
    assert stats.kstest(sub, stats.truncnorm(-2, 2, scale=sigma).cdf).pvalue > 1e-3
    assert s.target_std((n, 10)) == pytest.approx(math.sqrt(TF1_REALISED_FACTOR * factor / n))


def test_tf1_uniform_and_modes():
    s = get_scheme("tf1_variance_scaling", factor=1.0, mode="fan_avg", uniform=True)
    w = s(torch.empty(300, 500), generator=gen())
    limit = math.sqrt(3.0 / 400)
    assert float(w.abs().max()) <= limit and float(w.abs().max()) > 0.99 * limit
    with pytest.raises(InitlabError, match=r"unknown mode 'fan_geo_avg'.*fan_avg, fan_in, fan_out"):
        get_scheme("tf1_variance_scaling", mode="fan_geo_avg")
    with pytest.raises(InitlabError, match="uniform must be True or False, got 'yes'"):
        get_scheme("tf1_variance_scaling", uniform="yes")


@pytest.mark.parametrize("shape", [(20, 50), (50, 20), (16, 4, 3, 3)])
def test_orthogonal_is_orthogonal(shape):
    w = initlab.orthogonal_(torch.empty(shape), 1.5, generator=gen())
    m = w.reshape(shape[0], -1).double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    assert torch.allclose(gram, 2.25 * torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-5)


def test_orthogonal_bf16_computed_in_fp32():
    w = initlab.orthogonal_(torch.empty(64, 64, dtype=torch.bfloat16), generator=gen())
    ref = initlab.orthogonal_(torch.empty(64, 64), generator=gen())
    assert torch.equal(w, ref.bfloat16())


def _qr_q00(n: int, trials: int, correct: bool) -> np.ndarray:
    g = gen()
    out = []
    for _ in range(trials):
        if correct:
            q = initlab.orthogonal_(torch.empty(n, n), generator=g)
        else:
            q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
        out.append(float(q[0, 0]))
    return np.array(out)


def test_orthogonal_is_haar_sign_corrected():
    # for a Haar matrix E[q00] = 0 and Var[q00] = 1/n; the raw QR's sign convention biases q00
    n, trials = 4, 500
    se = math.sqrt(1.0 / n / trials)
    assert abs(_qr_q00(n, trials, True).mean()) < 5 * se
    assert abs(_qr_q00(n, trials, False).mean()) > 5 * se  # negative control: no sign correction


def test_delta_orthogonal_is_an_isometry():
    w = initlab.delta_orthogonal_(torch.empty(8, 4, 3, 3), generator=gen())
    assert torch.count_nonzero(w[:, :, [0, 2]]) == 0 and torch.count_nonzero(w[:, :, :, [0, 2]]) == 0
    x = torch.randn(2, 4, 9, 9, generator=gen(3))
    y = F.conv2d(x, w, padding=1)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-4)
    s = get_scheme("delta_orthogonal", gain=2.0)
    assert s.target_std(shape=(8, 4, 3, 3)) == pytest.approx(2.0 / math.sqrt(72))


def test_identity_and_dirac():
    eye = get_scheme("identity")(torch.empty(4, 6))
    assert torch.equal(eye, torch.eye(4, 6))
    w = identity_(torch.empty(6, 3, 3, 3), groups=2)
    ref = torch.nn.init.dirac_(torch.empty(6, 3, 3, 3), groups=2)
    assert torch.equal(w, ref)
    x = torch.randn(1, 4, 5, 5)
    conv = get_scheme("dirac")(torch.empty(4, 4, 3, 3))
    assert torch.equal(F.conv2d(x, conv, padding=1), x)


def test_zeros_and_auto():
    assert torch.count_nonzero(get_scheme("zeros")(torch.ones(3, 4))) == 0
    assert torch.count_nonzero(get_scheme("zeros")(torch.ones(5))) == 0
    with pytest.raises(InitlabError, match=r"init_model\(model, 'auto'\)"):
        get_scheme("auto")(torch.empty(3, 4))
    with pytest.raises(InitlabError, match=r"init_model\(model, 'lsuv', batch=x\)"):
        get_scheme("lsuv")(torch.empty(3, 4))
    with pytest.raises(InitlabError, match="unknown distribution 'gaus'"):
        get_scheme("auto", distribution="gaus")


def test_in_place_forms_take_generator():
    fns = [initlab.xavier_normal_, initlab.xavier_uniform_, initlab.he_normal_, initlab.he_uniform_,
           initlab.lecun_normal_, initlab.lecun_uniform_, initlab.kumar_, initlab.orthogonal_,
           initlab.delta_orthogonal_, initlab.normal_]
    for fn in fns:
        a = fn(torch.empty(6, 5), generator=gen(4))
        b = fn(torch.empty(6, 5), generator=gen(4))
        assert torch.equal(a, b), fn.__name__


def test_aliases_and_case():
    assert get_scheme("Glorot-Normal").name == "xavier_normal"
    assert get_scheme("Kaiming-Uniform").name == "kaiming_uniform"  # torch's kaiming_uniform_, no longer he_uniform


def test_params_and_repr():
    s = get_scheme("he_normal", activation="leaky_relu", param=0.1)
    assert s.params == {"activation": "leaky_relu", "param": 0.1, "mode": "fan_in", "distribution": "normal"}
    assert repr(s).startswith("Scheme('he_normal', activation='leaky_relu'")
    assert s.scale == pytest.approx(2 / 1.01) and s.mode == "fan_in"


def test_pickle_roundtrip():
    s = get_scheme("kumar", activation="tanh", distribution="truncated_normal")
    t = pickle.loads(pickle.dumps(s))
    assert t.name == s.name and t.params == s.params
    assert torch.equal(s(torch.empty(5, 7), generator=gen()), t(torch.empty(5, 7), generator=gen()))


def test_explicit_fans_used():
    s = get_scheme("lecun_normal")
    w = s(torch.empty(300, 400), fans=(25, 1), generator=gen())
    assert var_z(w, 1 / 25, "normal") < 5.0


# ---------------------------------------------------------------------------------------------
# errors

def test_unknown_scheme_lists_valid_and_closest():
    with pytest.raises(InitlabError, match=r"unknown scheme 'xavier_norml'; did you mean 'xavier_normal'\?"
                                           r".*he_normal.*orthogonal") as e:
        get_scheme("xavier_norml")
    assert "tf1_variance_scaling" in str(e.value)
    with pytest.raises(InitlabError, match="must be a string, got int"):
        get_scheme(3)


def test_bad_params():
    with pytest.raises(InitlabError, match=r"scheme 'he_normal' does not take 'slope'; its parameters: "
                                           r"activation='relu', param=None, mode='fan_in', distribution='normal'"):
        get_scheme("he_normal", slope=0.1)
    with pytest.raises(InitlabError, match=r"scheme 'lecun_uniform' does not take 'gain'; its parameters: distribution='uniform'"):
        get_scheme("lecun_uniform", gain=2.0)
    with pytest.raises(InitlabError, match=r"scheme 'he_normal': unknown mode 'fan_inn'.*fan_in"):
        get_scheme("he_normal", mode="fan_inn")
    with pytest.raises(InitlabError, match=r"unknown distribution 'gaussian_ish'.*truncated_normal"):
        get_scheme("lecun_normal", distribution="gaussian_ish")
    with pytest.raises(InitlabError, match="gain must be a finite number > 0, got -1"):
        get_scheme("xavier_normal", gain=-1)
    with pytest.raises(InitlabError, match="std must be a finite number > 0, got 0"):
        get_scheme("normal", std=0)
    with pytest.raises(InitlabError, match=r"unknown activation 'tahn'; did you mean 'tanh'\?"):
        get_scheme("he_normal", activation="tahn")


def test_kumar_on_relu_is_a_clear_error():
    with pytest.raises(InitlabError, match=r"scheme 'kumar'.*'relu' is not.*second_moment"):
        get_scheme("kumar", activation="relu")


def test_fan_scheme_on_bias_and_int():
    with pytest.raises(InitlabError, match="fan-based schemes do not apply"):
        get_scheme("he_normal")(torch.empty(5))
    with pytest.raises(InitlabError, match="orthogonal_ needs a tensor with at least 2 dimensions"):
        get_scheme("orthogonal")(torch.empty(5))
    with pytest.raises(InitlabError, match="floating-point tensor.*torch.int64"):
        get_scheme("xavier_uniform")(torch.zeros(3, 4, dtype=torch.long))


def test_register_scheme():
    name = "test_half_lecun"
    try:
        register_scheme(name, lambda k=0.5: get_scheme("lecun_normal"), "half of nothing")
        s = get_scheme(name, k=0.25)
        assert s.name == name and s.params == {"k": 0.25}
        assert name in schemes()
        with pytest.raises(InitlabError, match="already registered"):
            register_scheme(name, lambda: None)
        register_scheme(name, lambda: (lambda t, *, fans=None, generator=None: t.fill_(3.0)), overwrite=True)
        assert float(get_scheme(name)(torch.empty(2, 2)).sum()) == 12.0
        with pytest.raises(InitlabError, match="must be callable"):
            register_scheme("x_bad", 3)
    finally:
        from initlab._schemes import _REGISTRY
        _REGISTRY.pop(name, None)


def test_cli_schemes(capsys):
    assert main(["schemes"]) == 0
    out = capsys.readouterr().out
    for n in schemes():
        assert f"\n{n} " in out
    assert main(["schemes", "-v"]) == 0
    assert "params: activation='relu'" in capsys.readouterr().out


def test_orthogonal_bit_identical_for_any_thread_count():
    before = torch.get_num_threads()
    out = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = [initlab.orthogonal_(torch.empty(s), generator=gen(6)) for s in ((384, 384), (512, 96))]
            out[threads].append(initlab.delta_orthogonal_(torch.empty(256, 128, 3, 3), generator=gen(6)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(out[1], out[2]))


def test_schemes_declare_their_level_and_needs():
    levels = {n: (get_scheme(n).level, get_scheme(n).needs_batch) for n in schemes()}
    assert levels.pop("auto") == ("model", False)
    assert levels.pop("lsuv") == ("model", True)
    assert set(levels.values()) == {("tensor", False)}  # every other scheme initialises a tensor
    for name in levels:
        t = torch.empty(8, 6)
        assert get_scheme(name)(t, generator=gen(0)) is t


def test_a_registered_model_level_scheme_needs_no_special_case():
    # init_model asks the Scheme what it is: a model-level scheme of a user's works like auto
    from initlab._schemes import LayerChoice, Scheme, _REGISTRY

    def per_layer_lecun() -> Scheme:
        def init(t, f, g):
            raise InitlabError("scheme 'test_per_layer' needs the whole model: use initlab.init_model")
        lecun = get_scheme("lecun_normal")
        return Scheme(name="test_per_layer", init=init, level="model",
                      for_layer=lambda act: LayerChoice(lecun, "readout" if act is None else f"lecun after {act.name}"))
    register_scheme("test_per_layer", per_layer_lecun, "LeCun, labelled by the activation")
    try:
        m = nn.Sequential(nn.Linear(400, 300), nn.Tanh(), nn.Linear(300, 10))
        rep = initlab.init_model(m, "test_per_layer", generator=gen(0))
        assert rep.scheme == "test_per_layer"
        assert [r["scheme"] for r in rep] == ["lecun after tanh", "readout"]
        assert rep["0"]["target_std"] == pytest.approx(1 / math.sqrt(400))
        with pytest.raises(InitlabError, match="needs the whole model"):
            get_scheme("test_per_layer")(torch.empty(3, 4))
        with pytest.raises(InitlabError, match="scheme 'test_per_layer' takes no parameters; got 'k'"):
            initlab.init_model(m, "test_per_layer", k=1)
    finally:
        _REGISTRY.pop("test_per_layer", None)


def test_model_level_scheme_on_a_tensor_names_init_model():
    for name, call in (("auto", r"init_model\(model, 'auto'\)"), ("lsuv", r"init_model\(model, 'lsuv', batch=x\)")):
        with pytest.raises(InitlabError, match=call):
            get_scheme(name)(torch.empty(3, 4))
    # negative control: a tensor-level scheme does not raise
    get_scheme("lecun_normal")(torch.empty(3, 4))
