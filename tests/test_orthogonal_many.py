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
