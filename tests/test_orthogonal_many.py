"""orthogonal_many_: the QRs in parallel, bit-identical to orthogonal_ on each tensor in order."""
from __future__ import annotations

import pytest
import torch

import initlab
from initlab import InitlabError
from initlab._orthogonal import orthogonal_many_

SHAPES = [(64, 96), (96, 64), (10, 64), (16, 8, 3, 3), (48, 48), (0, 5)]


def _tensors() -> list[torch.Tensor]:
    return [torch.empty(s) for s in SHAPES] + [torch.empty(12, 20, dtype=torch.float64)]


def _sequential(threads: int) -> list[torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(7)
        ts = _tensors()
        for t in ts:
            initlab.orthogonal_(t, 1.5, generator=g)
        return ts
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_bit_identical_to_orthogonal_in_order(threads):
    ref = _sequential(1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(7)
        got = orthogonal_many_(_tensors(), 1.5, generator=g)
        assert torch.get_num_threads() == threads  # restored
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    # and the generator moved on exactly as after the sequential calls
    g2 = torch.Generator().manual_seed(7)
    for t in _tensors():
        initlab.orthogonal_(t, generator=g2)
    assert torch.equal(g.get_state(), g2.get_state())
    # a different seed gives different matrices (the comparison can fail)
    other = orthogonal_many_(_tensors(), 1.5, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other[0], ref[0])


def test_orthonormal_rows():
    w = orthogonal_many_([torch.empty(30, 50), torch.empty(50, 30)], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(w[0] @ w[0].T, torch.eye(30), atol=1e-5)
    assert torch.allclose(w[1].T @ w[1], torch.eye(30), atol=1e-5)


def test_bad_input_is_one_line_and_writes_nothing():
    good = torch.zeros(4, 4)
    with pytest.raises(InitlabError, match="at least 2 dimensions"):
        orthogonal_many_([good, torch.empty(3)])
    assert torch.count_nonzero(good) == 0


def test_fresh_worker_threads_stay_on_one_thread():
    """In a fresh process (new worker threads, whose first parallel op reads torch's process-wide
    default) switching thread counts between calls keeps the bits of the one-thread QR."""
    import subprocess
    import sys
    code = (
        "import torch, initlab\n"
        "from initlab._orthogonal import orthogonal_many_\n"
        "shapes = [(64, 96), (200, 300), (300, 300), (256, 256), (48, 48), (10, 64)]\n"
        "torch.set_num_threads(1)\n"
        "g = torch.Generator().manual_seed(7); ref = [torch.empty(s) for s in shapes]\n"
        "[initlab.orthogonal_(t, generator=g) for t in ref]\n"
        "ok = True\n"
        "for th in (2, 3, 2, 4, 3):\n"
        "    torch.set_num_threads(th)\n"
        "    got = orthogonal_many_([torch.empty(s) for s in shapes], generator=torch.Generator().manual_seed(7))\n"
        "    ok &= all(torch.equal(a, b) for a, b in zip(got, ref))\n"
        "print(ok)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def _with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


# around the threshold between a QR on the calling thread and one in a worker: n m^2 = _INLINE,
# just above it, and the study MLP's first layer
EDGE = [(256, 256), (257, 256), (256, 257), (100, 784), (10, 100)]


def test_edge_shapes_bit_identical_for_any_thread_count():
    from initlab import _orthogonal
    assert _orthogonal._cost(256, 256) == _orthogonal._INLINE < _orthogonal._cost(257, 256)

    def single():
        g = torch.Generator().manual_seed(11)
        return [initlab.orthogonal_(torch.empty(s), 0.9, generator=g) for s in EDGE]

    def many():
        return orthogonal_many_([torch.empty(s) for s in EDGE], 0.9, generator=torch.Generator().manual_seed(11))

    ref = _with_threads(1, single)
    for threads in (2, 3):
        for got in (_with_threads(threads, single), _with_threads(threads, many)):
            assert all(torch.equal(a, b) for a, b in zip(got, ref))
            assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(got, ref))


def test_small_qrs_inline_large_ones_in_a_worker_each_on_one_thread(monkeypatch):
    """Where each QR runs and on how many intra-op threads: a small one on the calling thread, a
    large one in an initlab-qr worker, every one on one thread; the caller's count is put back.
    (Bits do not depend on the place: see the test above.)"""
    import threading

    from initlab import _orthogonal
    seen = []
    real = _orthogonal._qr_signs

    def spy(a):
        seen.append((tuple(a.shape), threading.current_thread().name, torch.get_num_threads()))
        return real(a)

    monkeypatch.setattr(_orthogonal, "_qr_signs", spy)

    def run():
        g = torch.Generator().manual_seed(0)
        initlab.orthogonal_(torch.empty(256, 256), generator=g)
        initlab.orthogonal_(torch.empty(257, 256), generator=g)
        orthogonal_many_([torch.empty(100, 784), torch.empty(10, 100)], generator=g)
        return torch.get_num_threads()

    assert _with_threads(2, run) == 2
    where = {s: (name.startswith("initlab-qr"), n) for s, name, n in seen}
    assert where[(256, 256)] == (False, 1)
    assert where[(257, 256)] == (True, 1)
    # of several small ones, a worker takes what it finds when it wakes up, the caller the rest
    assert where[(784, 100)][1] == where[(100, 10)][1] == 1


def test_direct_write_matches_the_copy_paths():
    """Written in place by the product (contiguous, Q's dtype) or computed and copied (a
    transposed view, fp16): the same numbers."""
    def fill(t):
        return initlab.orthogonal_(t, 1.7, generator=torch.Generator().manual_seed(5))

    for shape in [(30, 50), (50, 30), (8, 4, 3, 3)]:
        direct = fill(torch.empty(shape))
        strided = fill(torch.empty(tuple(reversed(shape))).permute(*reversed(range(len(shape)))))
        assert not strided.is_contiguous()
        assert torch.equal(direct, strided)
        assert torch.equal(fill(torch.empty(shape, dtype=torch.float16)), direct.half())
        assert not torch.equal(fill(torch.empty(shape)) * 1.001, direct)


@pytest.mark.parametrize("fail_in", ["draw", "qr"])
def test_failure_midway_writes_nothing_and_leaves_no_worker_running(monkeypatch, fail_in):
    import time

    from initlab import _orthogonal
    shapes = [(300, 300), (100, 784), (320, 300), (10, 100)]
    calls, running, after = [], [0], []
    real_draw, real_qr = _orthogonal._gaussian_checked, _orthogonal._qr_signs

    def draw(*args):
        calls.append("draw")
        if fail_in == "draw" and calls.count("draw") == 3:
            raise KeyboardInterrupt
        return real_draw(*args)

    def qr(a):
        calls.append("qr")
        if fail_in == "qr" and calls.count("qr") == 2:
            raise KeyboardInterrupt
        running[0] += 1
        time.sleep(0.05)  # still running when the error reaches the caller, unless it is waited for
        try:
            return real_qr(a)
        finally:
            running[0] -= 1

    monkeypatch.setattr(_orthogonal, "_gaussian_checked", draw)
    monkeypatch.setattr(_orthogonal, "_qr_signs", qr)
    ts = [torch.zeros(s) for s in shapes]
    with pytest.raises(KeyboardInterrupt):
        _with_threads(2, lambda: orthogonal_many_(ts, generator=torch.Generator().manual_seed(0)))
    after.append(running[0])
    assert after == [0]  # no QR still running
    assert all(torch.count_nonzero(t) == 0 for t in ts)  # nothing written
    monkeypatch.setattr(_orthogonal, "_gaussian_checked", real_draw)
    monkeypatch.setattr(_orthogonal, "_qr_signs", real_qr)
    again = _with_threads(2, lambda: orthogonal_many_([torch.empty(s) for s in shapes],
                                                      generator=torch.Generator().manual_seed(0)))
    ref = _with_threads(1, lambda: orthogonal_many_([torch.empty(s) for s in shapes],
                                                    generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for a, b in zip(again, ref))
