"""The sampler's batch (``initlab._engine.batched``): init_model fills many small weights
together, spread over threads as whole tensors, with the same bits as one call per tensor."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from initlab import _apply, _engine
from initlab._apply import init_model
from initlab._engine import _TINY, SMALL, batched, variance_scaling_


def many_small() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(16, 16, 3) for _ in range(30)] + [nn.Linear(160, 160, bias=False) for _ in range(12)]
    m = nn.Sequential(*layers)
    sizes = [p.numel() for p in m.parameters() if p.dim() > 1]
    assert sum(n for n in sizes if n >= _TINY) > SMALL  # the small ones go parallel (the tiny ones stay on the caller)
    assert any(n < _TINY for n in sizes) and max(sizes) < SMALL
    return m


def weights(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def init(threads: int, *, batch: bool = True, scheme: str = "he_normal", seed: int = 3) -> list[torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with contextlib.ExitStack() as stack:
            if not batch:
                mp = stack.enter_context(pytest.MonkeyPatch.context())
                mp.setattr(_apply, "batched", lambda measure=0: contextlib.nullcontext({}))
            m = many_small()
            init_model(m, scheme, generator=torch.Generator().manual_seed(seed))
    finally:
        torch.set_num_threads(before)
    return weights(m)


@pytest.mark.parametrize("scheme", ["he_normal", "xavier_uniform", "torch_default"])
def test_batched_equals_one_call_per_tensor_at_any_thread_count(scheme, monkeypatch):
    groups = []
    real = _engine._run_parallel
    monkeypatch.setattr(_engine, "_run_parallel",
                        lambda tasks, workers, here=None: groups.append((len(tasks), here is not None)) or
                        real(tasks, workers, here))
    ref = init(1, batch=False, scheme=scheme)
    assert groups == []  # one thread, one call per tensor: no pool
    two = init(2, scheme=scheme)
    assert groups == [(1, True)]  # the small tensors went to two threads: a pool thread and the calling one
    one = init(1, scheme=scheme)
    for a, b, c in zip(ref, one, two, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    other = init(2, scheme=scheme, seed=4)  # negative control: the comparison sees the values
    assert not all(torch.equal(a, b) for a, b in zip(ref, other) if a.dim() > 1)


def test_nothing_is_written_when_the_batch_raises():
    t = torch.zeros(64, 64)
    with pytest.raises(RuntimeError), batched():
        variance_scaling_(t, 2.0, "fan_in", "normal", generator=torch.Generator().manual_seed(0))
        raise RuntimeError("stop")
    assert not t.any()
    with batched():
        variance_scaling_(t, 2.0, "fan_in", "normal", generator=torch.Generator().manual_seed(0))
        assert not t.any()  # prepared only: filled when the block ends
    ref = torch.empty(64, 64)
    variance_scaling_(ref, 2.0, "fan_in", "normal", generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, ref)


def _tiny_set(seed: int, calls: list[int] | None = None) -> list[torch.Tensor]:
    """Tiny tensors of odd and even sizes, fp32 and fp64, normal, truncated normal and uniform,
    more of them than one batch holds (``calls``: the sizes of the batches filled together)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(80):  # 80 x ~2.5k fp32 elements > CHUNK: at least two batches
        shape = (7 + i % 5, 3 + (i * 7) % 11, 3, 3)
        t = torch.empty(shape, dtype=torch.float64 if i % 4 == 3 else torch.float32)
        dist = ("normal", "truncated_normal", "uniform")[i % 3]
        variance_scaling_(t, 1.0 + i / 10, "fan_in", dist, generator=g)
        out.append(t)
    return out


def test_tiny_tensors_batched_have_the_bits_of_one_call_each(monkeypatch):
    ref = _tiny_set(5)  # outside batched(): one call per tensor
    sizes: list[int] = []
    real = _engine._fill_batch
    monkeypatch.setattr(_engine, "_fill_batch", lambda group, kind, work, stats=None: sizes.append(len(group)) or
                        real(group, kind, work, stats))
    with batched():
        got = _tiny_set(5)
    assert len(sizes) >= 6 and max(sizes) > 1  # filled together: each distribution, fp32 and fp64, 2+ batches
    assert sum(sizes) == 80
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)
    with batched():
        other = _tiny_set(6)  # negative control: another seed, other values
    assert not any(torch.equal(a, b) for a, b in zip(ref, other))


def test_tiny_blocks_of_a_fused_weight_batched_as_one_call_each(monkeypatch):
    # MultiheadAttention's in_proj is three row blocks: runs that start inside the parameter
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.MultiheadAttention(15, 3), nn.MultiheadAttention(8, 2))

    a, b = make(), make()
    init_model(a, "xavier_normal", generator=torch.Generator().manual_seed(1))
    with monkeypatch.context() as mp:
        mp.setattr(_apply, "batched", lambda measure=0: contextlib.nullcontext({}))
        init_model(b, "xavier_normal", generator=torch.Generator().manual_seed(1))
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert a[0].in_proj_weight.std() > 0 and not torch.equal(a[0].in_proj_weight[:15], a[0].in_proj_weight[15:30])


def test_stds_taken_while_sampling_equal_the_ones_measured_after(monkeypatch):
    def make() -> nn.Module:
        torch.manual_seed(0)
        # every weight at least _TINY entries (below, the sums are taken after sampling, as before)
        return nn.Sequential(nn.Embedding(2000, 24, padding_idx=3), nn.Linear(24, 1000), nn.Conv2d(64, 32, 3),
                             nn.Linear(300, 300), nn.Linear(300, 1000, bias=False).double(), nn.Linear(8, 8))

    used: list[bool] = []
    real = _apply.measured
    monkeypatch.setattr(_apply, "measured", lambda x, v, known: used.append(r := real(x, v, known)) or r)
    fast = init_model(make(), "xavier_normal", generator=torch.Generator().manual_seed(2))
    n_used = sum(r is not None for r in used)
    with monkeypatch.context() as mp:
        mp.setattr(_apply, "batched", lambda measure=0: contextlib.nullcontext({}))
        slow = init_model(make(), "xavier_normal", generator=torch.Generator().manual_seed(2))
    assert n_used == 4  # every sampled weight but the Embedding, whose padding row was zeroed after sampling,
    # and the tiny Linear(8, 8)
    assert [r["realised_std"] for r in fast.rows] == [r["realised_std"] for r in slow.rows]
    # negative control: sums looked up without the version check give the Embedding's std before its
    # padding row was zeroed, another number
    monkeypatch.setattr(_apply, "measured", lambda x, v, known: (h := known.get((x.data_ptr(), x.numel(), x.dtype)))
                        and (h[1], h[2]))
    stale = init_model(make(), "xavier_normal", generator=torch.Generator().manual_seed(2))
    assert stale.rows[0]["realised_std"] != slow.rows[0]["realised_std"]
    assert [r["realised_std"] for r in stale.rows[1:]] == [r["realised_std"] for r in slow.rows[1:]]


def test_threads_take_chunks_from_one_queue_each_once(monkeypatch):
    # a pool thread held back (here: by a sleep on its first chunk) leaves the chunks to the calling
    # thread; every chunk is still filled once, with the bits of one thread
    import threading
    import time

    n = 6 * _engine.CHUNK + 77
    ref = variance_scaling_(torch.empty(n), 2.0, "fan_in", "normal", generator=torch.Generator().manual_seed(9),
                            fans=(50, 50))
    filled: list[tuple[int, str]] = []
    real = _engine._fill_run

    def spy(buf, kind, a, key, start):
        name = threading.current_thread().name
        if name.startswith("initlab-sample") and not any(w == name for _, w in filled):
            time.sleep(0.05)
        filled.append((start, name))
        return real(buf, kind, a, key, start)

    monkeypatch.setattr(_engine, "_fill_run", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = variance_scaling_(torch.empty(n), 2.0, "fan_in", "normal", generator=torch.Generator().manual_seed(9),
                                fans=(50, 50))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, ref)
    starts = sorted(s for s, _ in filled)
    assert starts == [i * _engine.CHUNK for i in range(7)]  # each chunk once
    assert {w for _, w in filled} >= {threading.main_thread().name}  # the calling thread takes chunks too
