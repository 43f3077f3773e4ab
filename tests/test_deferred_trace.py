"""init_model with a scheme that does not choose by activation writes without tracing the model;
its report finds the activation column on first read. The rows must equal an eager trace's."""
from __future__ import annotations

import copy
import gc
import pickle
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from initlab import _apply
from initlab._apply import init_model
from initlab._graph import find_activations


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        self.prelu = nn.PReLU(init=0.3)

    def forward(self, x):
        x = F.leaky_relu(self.a(x), 0.1)
        x = self.prelu(torch.tanh(self.b(x)) + x)
        return self.c(x)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 8)

    def forward(self, x):
        x = self.act(self.fc1(x))
        if x.mean() > 0:  # data-dependent control flow: symbolic tracing fails
            x = x / 2
        return self.fc2(x)


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.GELU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def attention() -> nn.Module:
    return nn.Sequential(nn.Embedding(50, 16), nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
                         nn.Linear(16, 50))


MODELS = {"functional": Functional, "untraceable": Untraceable, "cnn": cnn, "attention": attention}
SCHEMES = ["he_normal", "xavier_uniform", "torch_default", nn.init.xavier_normal_]


def eager(make, scheme, monkeypatch) -> _apply.InitReport:
    with monkeypatch.context() as mp:
        mp.setattr(_apply, "_needs_trace", lambda *a: True)
        rep = init_model(make(), scheme, generator=gen())
    assert rep._pending is None
    return rep


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s if isinstance(s, str) else s.__name__)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_deferred_rows_equal_an_eager_trace(name, scheme, monkeypatch):
    make = MODELS[name]
    ref = eager(make, scheme, monkeypatch)
    rep = init_model(make(), scheme, generator=gen())
    assert rep._pending is not None  # written untraced
    assert rep.rows == ref.rows and rep.traced == ref.traced and rep.note == ref.note
    assert str(rep) == str(ref) and rep.param_rows() == ref.param_rows()
    assert rep._pending is None


def test_the_writes_do_not_trace_and_the_first_read_traces_once(monkeypatch):
    calls = []
    real = _apply.find_activations
    monkeypatch.setattr(_apply, "find_activations", lambda m: calls.append(m) or real(m))
    m = Functional()
    rep = init_model(m, "he_normal", generator=gen())
    assert calls == [] and len(rep) == 4  # the row count needs no trace (a, b, c and the PReLU)
    assert rep["a"]["activation"] == "leaky_relu(0.1)" and rep["c"]["activation"] is None
    assert rep["b"]["activation"] == "tanh"
    str(rep), rep.traced, rep.note
    assert calls == [m]
    init_model(Functional(), "auto", generator=gen())  # auto chooses by activation: traced while writing
    assert len(calls) == 2


def test_without_the_deferred_fill_the_rows_differ(monkeypatch):
    """Negative control: the comparison above sees the activation column."""
    ref = eager(Functional, "he_normal", monkeypatch)
    monkeypatch.setattr(_apply._DeferredTrace, "fill", lambda self, rows: (True, "", False))
    rep = init_model(Functional(), "he_normal", generator=gen())
    assert rep.rows != ref.rows and rep["a"]["activation"] is None


@pytest.mark.parametrize("change", ["replace", "eval", "slope", "add"])
def test_a_model_changed_before_the_first_read_gets_no_activations(change):
    m = nn.Sequential(nn.Linear(8, 8), nn.PReLU(), nn.Linear(8, 8))
    rep = init_model(m, "he_normal", generator=gen())
    if change == "replace":
        m[2] = nn.Linear(8, 8)
    elif change == "eval":
        m.eval()
    elif change == "slope":
        with torch.no_grad():
            m[1].weight.fill_(0.5)  # a trained slope: a trace now reads prelu(0.5), the writes saw prelu(0.25)
        assert find_activations(m)["0"].activation.label == "prelu(0.5)"
    else:
        m.append(nn.ReLU())
    assert rep.traced is False and rep.note == _apply._STALE
    assert all(r["activation"] is None for r in rep.rows)
    text = str(rep)
    assert _apply._STALE in text and "registration order" not in text


def test_an_unchanged_model_gets_the_activations_of_the_writes():
    """Negative control of the test above: read before any change, the slope is the written one."""
    m = nn.Sequential(nn.Linear(8, 8), nn.PReLU(), nn.Linear(8, 8))
    rep = init_model(m, "he_normal", generator=gen())
    assert rep.traced and rep["0"]["activation"] == "prelu(0.25)"


def test_weight_and_norm_updates_do_not_stale_the_report():
    m = cnn()
    rep = init_model(m, "he_normal", generator=gen())
    with torch.no_grad():  # a training step: weights, norms and running statistics change
        for p in m.parameters():
            p.add_(0.01)
    m(torch.randn(2, 3, 8, 8))
    assert rep.traced and rep["0"]["activation"] == "relu" and rep["3"]["activation"] == "gelu"


def test_the_report_lets_go_of_the_model_after_the_first_read():
    m = Functional()
    rep = init_model(m, "he_normal", generator=gen())
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is not None  # held until read
    assert rep["a"]["activation"] == "leaky_relu(0.1)"
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copied_report_carries_the_rows_not_the_model(how):
    rep = init_model(Functional(), "xavier_normal", generator=gen())
    twin = pickle.loads(pickle.dumps(rep)) if how == "pickle" else copy.deepcopy(rep)
    assert twin._pending is None and rep._pending is None
    assert twin == rep and twin["a"]["activation"] == "leaky_relu(0.1)"
    assert not any(isinstance(v, nn.Module) for v in vars(twin).values())
