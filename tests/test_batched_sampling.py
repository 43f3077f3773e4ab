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
                mp.setattr(_apply, "batched", contextlib.nullcontext)
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
