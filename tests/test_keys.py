"""Streams keyed by (call draw, parameter name, global index): order, partial models, views,
random access, threads, and the Philox bits themselves."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import initlab
from initlab import _keys, _philox
from initlab._engine import CHUNK, SMALL, _sample_, workers_for


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def stage(names: list[str]) -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({n: nn.Linear(40 + i, 30 + i) for n, i in ((n, int(n[1:])) for n in names)})


def test_values_depend_on_the_name_not_on_order_or_other_layers():
    full = stage(["l0", "l1", "l2", "l3"])
    initlab.init_model(full, "he_normal", generator=gen(5))
    part = stage(["l2", "l3"])  # a pipeline stage builds only its own blocks
    initlab.init_model(part, "he_normal", generator=gen(5))
    for n in ("l2", "l3"):
        assert torch.equal(full[n].weight, part[n].weight)
    rev = nn.ModuleDict({n: stage([n])[n] for n in ["l3", "l2"]})  # other registration order
    initlab.init_model(rev, "he_normal", generator=gen(5))
    assert torch.equal(rev["l2"].weight, full["l2"].weight)
    # negative controls: another seed, or another name, gives other values
    other = stage(["l2", "l3"])
    initlab.init_model(other, "he_normal", generator=gen(6))
    assert not torch.equal(other["l2"].weight, full["l2"].weight)
    renamed = nn.ModuleDict({"x2": stage(["l2"])["l2"]})
    initlab.init_model(renamed, "he_normal", generator=gen(5))
    assert not torch.equal(renamed["x2"].weight, full["l2"].weight)


def test_each_call_draws_once_so_repeated_calls_differ():
    g = gen(3)
    a, b = stage(["l1"]), stage(["l1"])
    initlab.init_model(a, "he_normal", generator=g)
    initlab.init_model(b, "he_normal", generator=g)
    assert not torch.equal(a["l1"].weight, b["l1"].weight)
    g2 = gen(3)
    torch.randint(0, 1 << 32, (2,), generator=g2)  # the one draw of the first call
    c = stage(["l1"])
    initlab.init_model(c, "he_normal", generator=g2)
    assert torch.equal(c["l1"].weight, b["l1"].weight)


def test_standalone_tensor_keyed_by_one_draw():
    a = initlab.variance_scaling_(torch.empty(64, 32), generator=gen(1))
    b = initlab.variance_scaling_(torch.empty(64, 32), generator=gen(1))
    c = initlab.variance_scaling_(torch.empty(64, 32), generator=gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = gen(1)
    initlab.variance_scaling_(torch.empty(3), generator=g, fans=(1, 1))
    assert g.get_state().ne(gen(1).get_state()).any()  # it drew from g


@pytest.mark.parametrize("kind", ["normal", "uniform", "truncated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_view_of_a_parameter_gets_its_own_elements(kind, dtype):
    m = nn.Linear(301, 500).to(dtype)  # 150,500 elements: straddles a chunk
    with _keys.keyed(m, gen(9)):
        _sample_(m.weight, kind, 1.0, None)
    full = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.zero_()
    with _keys.keyed(m, gen(9)):
        for view in (m.weight[:, 7:133], m.weight[:, 133:], m.weight[1:500:2, :7], m.weight[0:500:2, :7]):
            _sample_(view, kind, 1.0, None)
    assert torch.equal(full, m.weight)


def test_multihead_attention_blocks_match_the_whole_parameter():
    # in_proj_weight is written as three blocks (views); every element keeps its global index
    m = nn.MultiheadAttention(16, 4)
    initlab.init_model(m, "xavier_uniform", generator=gen(2))
    w = m.in_proj_weight.detach().clone()
    ref = torch.empty_like(w)
    with _keys.keyed(m, gen(2)):
        _sample_(m.in_proj_weight, "uniform", 1.0, None)
        ref.copy_(m.in_proj_weight)
    # each block's values are a rescaling of the same underlying uniforms
    ratio = (w / ref)
    assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio), rtol=1e-5)


def test_philox_words_match_the_reference_and_the_vectorised_version():
    # Random123's known answer for Philox4x64-10, counter 0, key 0
    assert [hex(int(v)) for v in _philox.blocks((0, 0), np.array([0]))[0]] == [
        "0x16554d9eca36314c", "0xdb20fe9d672d0fdc", "0xd7e772cee186176b", "0x7e68b68aec7ba23b"]
    key = _philox.stream_key(123, "layer.weight")
    seq = _philox.words(key, 5, 3000)
    pos = np.random.default_rng(0).integers(0, 3000, 500)
    assert np.array_equal(_philox.gather(key, pos + 5), seq[pos])
    assert not np.array_equal(_philox.words(_philox.stream_key(123, "layer.bias"), 5, 3000), seq)


def test_thread_count_does_not_change_values_and_small_tensors_stay_on_one_thread():
    n = 3 * CHUNK + 17
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = initlab.truncated_normal_(torch.empty(n), 0.1, generator=gen(4))
        torch.set_num_threads(2)
        b = initlab.truncated_normal_(torch.empty(n), 0.1, generator=gen(4))
        assert workers_for(SMALL - 1) == 1 and workers_for(n) == 2
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_grid_is_symmetric_and_never_reaches_plus_or_minus_one(dtype):
    from initlab._engine import _transform, _unit_grid

    w = np.array([0, (1 << 64) - 1], dtype=np.uint64)  # the smallest and largest words
    v = _unit_grid(w, 0, 2 if dtype == torch.float64 else 4, dtype)  # fp32: two elements per word
    m = 52 if dtype == torch.float64 else 23
    assert v.min().item() == -1 + 2.0 ** -m and v.max().item() == 1 - 2.0 ** -m
    out = torch.empty_like(v)
    _transform(v.clone(), out, "normal", 1.0)
    assert torch.isfinite(out).all() and out.min().item() == -out.max().item()
    # negative control: the grid point -1 would give an infinite weight
    assert torch.isinf(torch.erfinv(torch.tensor(-1.0, dtype=dtype)))


@pytest.mark.parametrize("seed", range(40))
def test_runs_equal_the_brute_force_index_list(seed):
    """``_runs`` folds contiguous dimensions into one run; its runs, expanded, are exactly the
    global indices of the local elements in row-major order (views, shards, size-1 dims)."""
    rng = np.random.default_rng(seed)
    dims = int(rng.integers(1, 5))
    shape = [int(rng.integers(1, 6)) for _ in range(dims)]
    strides = []
    acc = 1
    for s in reversed(shape):  # a contiguous parent, then a random slice of each dimension
        strides.append(acc)
        acc *= s
    strides = strides[::-1]
    offsets = []
    for s, st in zip(shape, strides):
        lo = int(rng.integers(0, s))
        hi = int(rng.integers(lo + 1, s + 1))
        step = int(rng.choice([1, 1, 2]))
        offsets.append(np.arange(lo, hi, step, dtype=np.int64) * st)
    base = int(rng.integers(0, 100))
    starts, lens = _keys._runs(offsets, base)
    got = np.concatenate([np.arange(a, a + n) for a, n in zip(starts, lens)]) if starts.size else np.zeros(0)
    grids = np.meshgrid(*offsets, indexing="ij")
    want = base + sum(g.ravel() for g in grids)
    np.testing.assert_array_equal(got, want)
    assert np.all(starts[1:] != starts[:-1] + lens[:-1])  # adjacent runs are joined


def test_runs_of_a_contiguous_parameter_are_one_run_without_per_row_work():
    offsets = [np.arange(s, dtype=np.int64) * st for s, st in zip((512, 256, 1, 1), (256, 1, 1, 1))]
    starts, lens = _keys._runs(offsets)
    assert starts.tolist() == [0] and lens.tolist() == [512 * 256]
