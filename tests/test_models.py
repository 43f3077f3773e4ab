"""The lab's model builders: plain MLP and CNN, activations the library recognises, any scheme applies."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from initlab._activations import activation_names, resolve_activation
from initlab._errors import InitlabError
from initlab.lab.config import ModelSpec
from initlab.lab.models import Elementwise, activation_module, build_model, cnn, image_shape, mlp

T = torch.linspace(-4.0, 4.0, 161, dtype=torch.float64)


def test_mlp_structure():
    m = mlp([784, 100, 100, 10], "sigmoid")
    kinds = [type(x) for x in m]
    assert kinds == [nn.Linear, nn.Sigmoid, nn.Linear, nn.Sigmoid, nn.Linear]
    sizes = [(x.in_features, x.out_features) for x in m if isinstance(x, nn.Linear)]
    assert sizes == [(784, 100), (100, 100), (100, 10)]
    assert all(x.bias is not None for x in m if isinstance(x, nn.Linear))
    assert m(torch.rand(5, 784)).shape == (5, 10)


def test_mlp_without_bias_and_logistic_regression():
    m = mlp((64, 10), "relu", bias=False)
    assert len(m) == 1 and m[0].bias is None


@pytest.mark.parametrize("name", activation_names())
def test_every_table_activation_becomes_a_recognised_module(name):
    mod = activation_module(name).double()
    act = resolve_activation(name)
    assert not isinstance(mod, Elementwise)  # a torch.nn module the library's graph walker knows
    with torch.no_grad():
        assert torch.allclose(mod(T.clone()), act.fn(T.clone()))
    assert resolve_activation(mod).name == act.name
    assert resolve_activation(mod).param == act.param


def test_activation_parameters_and_aliases():
    m = activation_module("leaky_relu", 0.2)
    assert isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2
    assert isinstance(activation_module("logistic"), nn.Sigmoid)
    assert isinstance(activation_module(F.relu), nn.ReLU)
    assert isinstance(activation_module(nn.Tanh), nn.Tanh)
    assert isinstance(activation_module(None), nn.Identity)
    g = activation_module("gelu_tanh")
    assert isinstance(g, nn.GELU) and g.approximate == "tanh"
    with pytest.raises(InitlabError, match="takes no parameter"):
        activation_module("relu", 0.1)


def test_module_instances_are_copied_per_layer():
    m = mlp([8, 6, 6, 2], nn.PReLU(init=0.3))
    prelus = [x for x in m if isinstance(x, nn.PReLU)]
    assert len(prelus) == 2 and prelus[0] is not prelus[1]
    assert prelus[0].weight.data_ptr() != prelus[1].weight.data_ptr()
    assert float(prelus[1].weight.detach()) == pytest.approx(0.3)


def test_custom_callable_is_wrapped():
    def cube(x: torch.Tensor) -> torch.Tensor:
        return x**3

    m = mlp([4, 3, 2], cube)
    assert isinstance(m[1], Elementwise) and "cube" in repr(m)
    with torch.no_grad():
        assert torch.equal(m[1](T), T**3)


@pytest.mark.parametrize("bad, pattern", [
    ([784], r"widths: expected at least 2 entries"),
    ([784, 0, 10], r"widths\[1\]: expected a positive integer, got 0"),
    ("784", r"widths: expected a list of positive integers"),
    ([784, 10.5], r"widths\[1\]: expected a positive integer"),
])
def test_mlp_bad_widths(bad, pattern):
    with pytest.raises(InitlabError, match=pattern):
        mlp(bad, "relu")


def test_unknown_activation():
    with pytest.raises(InitlabError, match=r"unknown activation 'rleu'; did you mean 'relu'\?"):
        mlp([4, 3, 2], "rleu")


def test_cnn_takes_flat_and_image_inputs():
    m = cnn(channels=(4, 8), kernel=3, activation="relu", hidden=(32,), n_classes=10, in_shape=(1, 28, 28))
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        a, b = m(x), m(x.reshape(3, 784))
    assert a.shape == (3, 10) and torch.equal(a, b)
    convs = [x for x in m if isinstance(x, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 4, (3, 3)), (4, 8, (3, 3))]
    lin = [x for x in m if isinstance(x, nn.Linear)]
    assert lin[0].in_features == 8 * 7 * 7 and lin[-1].out_features == 10


def test_cnn_small_images_and_even_kernels():
    m = cnn(channels=(4, 4, 4, 4), kernel=2, activation="tanh", hidden=(), in_shape=(1, 8, 8))
    assert m(torch.rand(2, 64)).shape == (2, 10)
    with pytest.raises(InitlabError, match="channels: expected at least 1 entries"):
        cnn(channels=(), in_shape=(1, 8, 8))


def test_build_model_from_specs():
    m = build_model(ModelSpec(kind="mlp", widths=(784, 100, 100, 10)), "relu")
    assert isinstance(m, nn.Sequential) and isinstance(m[1], nn.ReLU)
    c = build_model(ModelSpec(kind="cnn", widths=(64, 20, 10), channels=(6,), kernel=3), "sigmoid")
    assert c(torch.rand(2, 64)).shape == (2, 10)
    assert sum(isinstance(x, nn.Sigmoid) for x in c) == 2  # after the conv and the hidden dense layer
    assert image_shape(784) == (1, 28, 28)
    with pytest.raises(InitlabError, match="not a square number"):
        image_shape(100 + 1)
    with pytest.raises(InitlabError, match=r"unknown model kind 'rnn'"):
        build_model(type("S", (), {"kind": "rnn"})(), "relu")


def test_the_library_finds_the_activations():
    from initlab._graph import find_activations

    links = find_activations(mlp([784, 100, 100, 10], "sigmoid"))
    assert [(l.activation.name if l.activation else None) for l in links.values()] == ["sigmoid", "sigmoid", None]
    links = find_activations(cnn(channels=(4,), activation="leaky_relu", hidden=(16,)))
    acts = [(l.activation.name, l.activation.param) if l.activation else None for l in links.values()]
    assert acts == [("leaky_relu", 0.01), ("leaky_relu", 0.01), None]
    assert all(l.traced for l in links.values())


# ----------------------------------------------------------------------------- initialisation of the built models

has_schemes = importlib.util.find_spec("initlab._schemes") is not None


@pytest.mark.skipif(not has_schemes, reason="the scheme registry (initlab._schemes) is not installed")
@pytest.mark.parametrize("scheme", ["normal", "xavier_normal", "he_normal", "lecun_normal", "orthogonal", "auto", "lsuv"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_any_scheme_applies(scheme, kind):
    import initlab

    spec = ModelSpec(kind=kind, widths=(784, 64, 10), channels=(4,) if kind == "cnn" else ())
    model = build_model(spec, "relu")
    x = torch.rand(64, 784, generator=torch.Generator().manual_seed(0))
    initlab.init_model(model, scheme, generator=torch.Generator().manual_seed(1), batch=x)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    assert all(float(p.detach().abs().sum()) == 0 for n, p in model.named_parameters() if n.endswith("bias"))


@pytest.mark.skipif(not has_schemes, reason="the scheme registry (initlab._schemes) is not installed")
def test_xavier_on_the_built_mlp_has_glorot_variance():
    import initlab

    m = mlp([784, 100, 100, 10], "sigmoid")
    initlab.init_model(m, "xavier_normal", generator=torch.Generator().manual_seed(0))
    w = m[0].weight.detach().double()
    target = 2.0 / (784 + 100)  # Glorot & Bengio (2010): Var = 2 / (fan_in + fan_out)
    se = target * math.sqrt(2.0 / w.numel())  # sd of a sample variance of n normals
    assert abs(float(w.var()) - target) < 5 * se
    assert abs(float(w.var()) - 1.0 / 784) > 5 * se  # negative control: not LeCun's 1/fan_in


def test_first_layer_pre_activation_variance_is_fan_in_times_second_moment():
    """With N(0,1) weights, Var(Wx) = sum_i x_i^2: 784 E[x^2] ~ 88 on MNIST, not 784 Var(x) ~ 74.6.

    Given the batch, w_k^T S w_k (S = mean of x x^T) has mean tr(S) and variance 2 tr(S^2), so the
    mean over the units of 20 independent initialisations (2,000 units) is tested at 5 standard errors.
    """
    from initlab.lab.data import load_dataset

    d = load_dataset("mnist")
    x = d.x_train[:100].double()
    m = mlp([784, 100, 100, 10], "sigmoid").double()
    sq = []
    with torch.no_grad():
        for seed in range(20):
            torch.nn.init.normal_(m[0].weight, 0.0, 1.0, generator=torch.Generator().manual_seed(seed))
            h = x @ m[0].weight.T  # matmul without bias
            sq.append(float((h * h).mean()))
    S = x.T @ x / len(x)
    predicted = float(torch.trace(S))  # = 784 * E[x^2] of the batch
    se = math.sqrt(2 * float(torch.trace(S @ S)) / (20 * 100))
    measured = sum(sq) / len(sq)
    assert 80 < predicted < 96
    assert abs(measured - predicted) < 5 * se
    # negative control: 784 * Var(x) of the same batch is rejected
    wrong = 784 * float(x.var(unbiased=False))
    assert abs(measured - wrong) > 5 * se
