"""The planned probe (a cached plan per model, batched reductions, one transfer, the table built on
first use) gives the same table as the probe before it: every row, column, note and theory string of
``tests/probe_reference.json`` (written by ``tests/probe_reference.py``) on an MLP, a CNN with
BatchNorm and bounded activations, and a residual model with functional activations.

Tolerance: the statistics are float32 reductions over at most ~10^5 values, accumulated pairwise;
a reordered float32 sum differs by at most ~log2(n) * eps32 ≈ 17 * 1.19e-7 ≈ 2e-6 of the sum of
magnitudes, and a variance or prediction built from two such sums by a few times that, so values
agree to REL = 1e-5 of their column's scale (strings, integers, fractions of counted units and
histogram counts exactly). The negative control shows a 1e-4 change of one weight matrix fails.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import initlab

from probe_reference import PATH, cases, table

REL = 1e-5
REFERENCE = json.loads(PATH.read_text())
EXACT = {"index", "layer", "kind", "activation", "fan_in", "fan_out", "units", "saturated_frac", "dead_frac"}


def _num(v):
    return float(v) if v in ("nan", "inf", "-inf") else v


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _column(col: str, got: list, want: list) -> list[str]:
    g, w = [_num(v) for v in got], [_num(v) for v in want]
    if col in EXACT or not all(isinstance(v, float) for v in w):
        return [] if all(_same(a, b) for a, b in zip(g, w)) else [f"{col}: {g} != {w}"]
    scale = max((abs(v) for v in w if math.isfinite(v)), default=0.0)
    return [f"row {i} {col}: {a!r} != {b!r}" for i, (a, b) in enumerate(zip(g, w))
            if not (math.isnan(a) and math.isnan(b))
            and not (math.isfinite(a) and abs(a - b) <= REL * max(abs(b), 1e-3 * scale))]


def _histograms(got: dict, want: dict) -> list[str]:
    bad = []
    for layer, kinds in want.items():
        for kind, w in kinds.items():
            g = got.get(layer, {}).get(kind)
            if g is None or g["counts"] != w["counts"] or g["num"] != w["num"] or \
                    max(abs(p - q) for p, q in zip(g["edges"], w["edges"])) > REL * max(map(abs, w["edges"])):
                bad.append(f"histogram {layer}/{kind} differs")
    return bad


def _mismatches(got: dict, want: dict) -> list[str]:
    bad = [f"{key}: {got[key]!r} != {want[key]!r}" for key in ("traced", "backward", "notes", "theory", "batch_size")
           if got[key] != want[key]]
    if len(got["rows"]) != len(want["rows"]) or set(got["rows"][0]) != set(want["rows"][0]):
        return bad + ["the rows differ in number or columns"]
    for col in want["rows"][0]:
        bad += _column(col, [r[col] for r in got["rows"]], [r[col] for r in want["rows"]])
    for i, (a, b) in enumerate(zip(got["input"] + [got["loss"]], want["input"] + [want["loss"]])):
        a, b = _num(a), _num(b)
        if not (a is None and b is None) and not abs(a - b) <= REL * abs(b):
            bad.append(f"input/loss {i}: {a!r} != {b!r}")
    return bad + _histograms(got["histograms"], want["histograms"])


@pytest.mark.parametrize("name", list(REFERENCE))
def test_planned_probe_gives_the_reference_table(name):
    model, x, kw = cases()[name]()
    first = table(initlab.probe(model, x, **kw))
    assert _mismatches(first, REFERENCE[name]) == []
    # the second call runs on the cached plan: the same table again
    assert _mismatches(table(initlab.probe(model, x, **kw)), REFERENCE[name]) == []


def test_a_small_change_of_the_weights_fails_the_comparison():
    """Negative control: scaling one weight matrix by 1 + 1e-4 moves the table past the tolerance."""
    model, x, kw = cases()["mlp"]()
    with torch.no_grad():
        model[2].weight.mul_(1 + 1e-4)
    bad = _mismatches(table(initlab.probe(model, x, **kw)), REFERENCE["mlp"])
    assert any("weight_var" in b for b in bad) and any("pre_var" in b for b in bad)


class _Threads(torch.nn.Module):
    """An MLP that records the thread count its forward pass runs on, and can fail."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fail, self.seen = torch.nn.Linear(6, 5), torch.nn.Linear(5, 2), fail, []

    def forward(self, x):
        self.seen.append(torch.get_num_threads())
        h = torch.relu(self.fc1(x))
        if self.fail:
            raise RuntimeError("boom")
        return self.fc2(h)


def test_the_model_runs_on_the_callers_threads_and_the_count_is_restored():
    """The statistics run on one thread, the model's own pass on the caller's count, which is set
    back afterwards, also when the forward pass fails; the table is the one of a one-thread call."""
    before = torch.get_num_threads()
    x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(0)), torch.randint(0, 2, (16,))
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        ref = table(initlab.probe(_Threads(), x, target=y))
        torch.set_num_threads(2)
        torch.manual_seed(0)
        model = _Threads()
        got = table(initlab.probe(model, x, target=y))
        assert model.seen[-1] == 2 and torch.get_num_threads() == 2  # (the first entry: the plan's trace)
        assert _mismatches(got, ref) == []
        with pytest.raises(initlab.InitlabError, match="boom"):
            initlab.probe(_Threads(fail=True), x, target=y)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
