"""init_model's fast paths give what the plain ones give: the batched realised stds (against
torch.std), the queued constant fills (against fill_ and reset_running_stats), the one module walk
(against named_modules / named_parameters), the memoised checks (errors still per layer)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from initlab import _keys
from initlab._apply import STD_SAMPLE, _Fills, _first_seen, _kind, _std_sample, _std_samples, init_model
from initlab._errors import InitlabError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(t: torch.Tensor) -> float | None:
    s = _std_sample(t)
    return None if s is None else float(s)


# ------------------------------------------------------------------------------------------
# realised stds in one batch


def _tensors() -> list[torch.Tensor]:
    g = gen(3)
    big = torch.randn(300, 400, generator=g) * 0.02  # more than STD_SAMPLE entries: the leading ones
    return [
        torch.randn(64, 27, generator=g) * 0.3,
        big,
        big.t(),  # non-contiguous: its leading rows, copied
        torch.randn(5, generator=g, dtype=torch.float64),
        torch.randn(40, 40, generator=g).half(),  # measured in fp32
        torch.randn(1000, generator=g) + 3.0,  # a mean larger than the spread: torch.std itself
        torch.full((50, 50), 0.1),  # a constant: torch.std itself (no cancellation residue of the sums)
        torch.randn(100, generator=g) * 1e30,  # squares beyond fp32: torch.std itself
        torch.randn(100, generator=g) * 1e-30,  # squares below fp32's normal range: torch.std itself
        torch.tensor([1.0, float("nan"), 2.0]),
        torch.ones(1),  # fewer than two entries: None
        torch.empty(4, 4, device="meta"),  # None
    ]


def test_batched_stds_agree_with_torch_std():
    ts = _tensors()
    got = _std_samples(ts)
    for t, g, ref in zip(ts, got, map(_reference, ts)):
        if ref is None:
            assert g is None
        elif math.isnan(ref):
            assert math.isnan(g)
        else:
            assert g == pytest.approx(ref, rel=2e-6, abs=0.0), (tuple(t.shape), t.dtype)
    for i in (5, 6, 7, 8):  # the mean dominates, or squares out of range: torch.std's own number
        assert got[i] == _reference(ts[i])


def test_batched_std_tolerance_is_tight_enough_to_fail():
    # negative control: the leading-entries rule matters; the std of the whole big tensor differs
    # from the sample's by more than the tolerance used above
    t = torch.cat([torch.randn(STD_SAMPLE, generator=gen(1)), 3.0 * torch.randn(STD_SAMPLE, generator=gen(2))])
    (got,) = _std_samples([t])
    assert got == pytest.approx(_reference(t), rel=2e-6)
    assert got != pytest.approx(float(t.std()), rel=2e-6)


def test_report_stds_are_the_leading_entries_std():
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3, bias=False), nn.BatchNorm2d(32),
                      nn.Flatten(), nn.Linear(32 * 4, 10))
    rep = init_model(m, "he_normal", generator=gen())
    by = {r["name"]: r for r in rep.rows}
    for name in ("0", "2", "5"):
        w = m.get_submodule(name).weight
        assert by[name]["realised_std"] == pytest.approx(_reference(w), rel=2e-6)
    assert by["3"]["realised_std"] == 0.0


# ------------------------------------------------------------------------------------------
# queued constant fills


def _old_norm_init(m: nn.Module) -> None:
    """What init_model did to a norm before the fills were queued."""
    m.weight.fill_(1.0)
    m.bias.zero_()
    m.reset_running_stats()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_queued_norm_fills_equal_the_plain_ones(dtype):
    a = nn.BatchNorm2d(7).to(dtype)
    with torch.no_grad():
        for t in (*a.parameters(), a.running_mean, a.running_var):
            t.uniform_(-2, 2, generator=gen(4))
        a.num_batches_tracked.fill_(9)
    b = copy.deepcopy(a)
    with torch.no_grad():
        _old_norm_init(a)
        fills = _Fills()
        written = fills.norm(b)
        assert {id(b.weight), id(b.running_var)} <= {id(t) for t in written}
        assert not torch.equal(b.running_var, a.running_var)  # queued: nothing written yet
        fills.write()
    for x, y in zip((*a.parameters(), *a.buffers()), (*b.parameters(), *b.buffers())):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("value", [0.0, -0.0, 1.0, 0.1, -2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_queued_constants_are_bit_identical_to_fill(value, dtype):
    a = torch.randn(33, generator=gen(5)).to(dtype)
    b = a.clone()
    fills = _Fills()
    fills.put(b, value)
    fills.write()
    a.fill_(value)
    assert torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32 if a.element_size() == 4
                              else torch.int64),
                       b.view(torch.int16 if b.element_size() == 2 else torch.int32 if b.element_size() == 4
                              else torch.int64))  # bits: -0.0 stays -0.0


class _CountingNorm(nn.BatchNorm1d):
    calls = 0

    def reset_running_stats(self) -> None:
        type(self).calls += 1
        super().reset_running_stats()


def test_a_norm_with_its_own_reset_running_stats_runs_it():
    m = nn.Sequential(nn.Linear(4, 6), _CountingNorm(6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        m[1].running_var.fill_(5.0)
    _CountingNorm.calls = 0
    init_model(m, "he_normal", generator=gen())
    assert _CountingNorm.calls == 1 and torch.equal(m[1].running_var, torch.ones(6))


def test_bias_constant_and_norms_after_init_model():
    m = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3).half())
    init_model(m, "he_normal", bias=0.1, generator=gen())
    assert torch.equal(m[0].bias, torch.full((8,), 0.1))
    assert torch.equal(m[3].bias, torch.full((3,), 0.1, dtype=torch.float16))
    assert torch.equal(m[1].weight, torch.ones(8)) and torch.equal(m[1].bias, torch.zeros(8))
    assert int(m[1].num_batches_tracked) == 0


# ------------------------------------------------------------------------------------------
# one walk of the modules


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        block = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 5)))
        self.a, self.b = block, nn.Linear(5, 5)
        self.c = block  # the same block twice
        self.d = nn.Linear(5, 5)
        self.d.weight = self.b.weight  # a parameter shared by two modules
        self.register_parameter("unused", None)


def test_one_walk_names_modules_and_parameters_as_torch_does():
    m = _Shared()
    every = list(m.named_modules(remove_duplicate=False))
    assert len(every) > len(list(m.named_modules()))
    assert _first_seen(every) == list(m.named_modules())
    assert list(_keys.named_parameters(m, every)) == list(m.named_parameters())
    assert list(_keys.named_parameters(m)) == list(m.named_parameters())


class _OwnParameters(nn.Module):
    """A module that lists parameters it does not register (so _parameters says nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.holder = [nn.Parameter(torch.zeros(3))]

    def parameters(self, recurse: bool = True):
        yield from self.holder

    def reset_parameters(self) -> None:
        pass


def test_kind_asks_a_module_that_lists_its_own_parameters():
    assert _kind("x", _OwnParameters()) == "other"
    assert _kind("x", nn.ReLU()) is None
    assert _kind("x", nn.PReLU()) == "other"
    assert _kind("x", nn.LayerNorm(3, elementwise_affine=False)) is None
    assert _kind("x", nn.BatchNorm1d(3, affine=False)) == "norm"  # running statistics only


# ------------------------------------------------------------------------------------------
# memoised checks


def test_memoised_checks_still_name_the_layer():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4).half())
    before = [t.clone() for t in m.parameters()]
    with pytest.raises(InitlabError, match=r"^layer '4' \(Linear \(4, 4\)\):.*too large for float16"):
        init_model(m, "xavier_normal", gain=1e5, generator=gen())  # fp32 layers 0 and 2 share its fans: checked
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))  # nothing written
    with pytest.raises(InitlabError, match=r"^layer '0' \(Linear \(4, 4\)\):.*too large for float32"):
        init_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), "xavier_normal", gain=1e38, generator=gen())
