"""The lab's optimisers (initlab.lab.training.optim): the updates of ``torch.optim.Adam(fused=True)`` and
``torch.optim.SGD(fused=True)``, bit for bit, in ``torch.optim``'s state format, without importing torch._dynamo."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from initlab.lab.training.loop import make_optimizer
from initlab.lab.training.optim import FusedAdam, FusedSGD, fused_supported

# shapes of a stacked 5-member MLP: sizes with and without a tail that the kernel's vector loop leaves over
SHAPES = [(5, 37, 11), (5, 1, 11), (5, 11, 3), (5, 1, 3)]


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).requires_grad_(True) for s in SHAPES]
    for p in params:
        p.grad = torch.zeros_like(p)
    return params


def _steps(opt, params: list[torch.Tensor], steps: int, start: int = 0) -> None:
    for k in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + k)  # step k's gradients, whatever step a run starts at
        for p in params:  # gradients over many scales, some exactly zero
            p.grad.copy_(torch.randn(p.shape, generator=g) * 10.0 ** (k % 9 - 6))
            p.grad[0].zero_()
        opt.step()


def _torch(kind: str, params: list[torch.Tensor], lr: float, momentum: float = 0.0):
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, fused=True)


def _ours(kind: str, params: list[torch.Tensor], lr: float, momentum: float = 0.0):
    return FusedAdam(params, lr) if kind == "adam" else FusedSGD(params, lr, momentum)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


CASES = [("adam", 1e-2, 0.0), ("sgd", 0.1, 0.0), ("sgd", 0.1, 0.9)]


@pytest.mark.parametrize("kind,lr,momentum", CASES)
def test_updates_and_state_are_torch_fused_bit_for_bit(kind, lr, momentum):
    ref_p, got_p = _params(), _params()
    ref, got = _torch(kind, ref_p, lr, momentum), _ours(kind, got_p, lr, momentum)
    _steps(ref, ref_p, 30)
    _steps(got, got_p, 30)
    assert _same(ref_p, got_p)
    a, b = ref.state_dict(), got.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i, st in a["state"].items():
        assert st.keys() == b["state"][i].keys()
        for k, v in st.items():
            assert v.dtype == b["state"][i][k].dtype and torch.equal(v, b["state"][i][k]), (i, k)


@pytest.mark.parametrize("kind,lr,momentum", CASES)
def test_negative_control_another_lr_differs(kind, lr, momentum):
    ref_p, got_p = _params(), _params()
    _steps(_torch(kind, ref_p, lr, momentum), ref_p, 30)
    _steps(_ours(kind, got_p, lr * 1.0001, momentum), got_p, 30)
    assert not _same(ref_p, got_p)


@pytest.mark.parametrize("kind,lr,momentum", CASES)
@pytest.mark.parametrize("first", ["torch", "ours"])
def test_a_checkpoint_of_either_continues_in_the_other(kind, lr, momentum, first):
    make = {"torch": _torch, "ours": _ours}
    second = "ours" if first == "torch" else "torch"
    ref_p = _params()
    ref = _torch(kind, ref_p, lr, momentum)
    _steps(ref, ref_p, 20)  # the uninterrupted run
    p1 = _params()
    o1 = make[first](kind, p1, lr, momentum)
    _steps(o1, p1, 10)
    saved = o1.state_dict()
    p2 = [p.detach().clone().requires_grad_(True) for p in p1]
    for p in p2:
        p.grad = torch.zeros_like(p)
    o2 = make[second](kind, p2, lr, momentum)
    o2.load_state_dict(saved)
    _steps(o2, p2, 10, start=10)
    assert _same(ref_p, p2)


def test_a_parameter_without_a_gradient_is_skipped_as_torch_skips_it():
    ref_p, got_p = _params(), _params()
    ref_p[1].grad = got_p[1].grad = None
    ref, got = torch.optim.Adam(ref_p, lr=1e-2, fused=True), FusedAdam(got_p, 1e-2)
    for opt, params in ((ref, ref_p), (got, got_p)):
        for _ in range(3):
            for p in params:
                if p.grad is not None:
                    p.grad.fill_(0.5)
            opt.step()
    assert _same(ref_p, got_p)
    assert ref.state_dict()["state"].keys() == got.state_dict()["state"].keys() == {0, 2, 3}


def test_a_state_of_another_size_is_refused():
    opt = FusedAdam(_params(), 1e-2)
    with pytest.raises(ValueError, match="sizes \\[2\\], expected one of 4"):
        opt.load_state_dict(torch.optim.Adam(_params()[:2], lr=1e-2).state_dict())


def test_make_optimizer_picks_the_fused_kernels_where_they_apply():
    assert type(make_optimizer("adam", _params(), 1e-2)) is FusedAdam
    assert type(make_optimizer("SGD", _params(), 1e-2, 0.9)) is FusedSGD
    ints = [torch.zeros(3, dtype=torch.int64)]
    assert not fused_supported(ints) and not fused_supported([])
    assert fused_supported(_params())


def test_training_imports_neither_dynamo_nor_symbolic_shapes():
    # building, sizing and stepping a group; then, as the control that the check sees the import,
    # a torch.optim optimiser, which does import torch._dynamo
    code = """
import sys, torch
from initlab.lab.config import load_experiment
from initlab.lab.training import group_memory, make_optimizer, plan_groups
heavy = ("torch._dynamo", "torch.fx.experimental.symbolic_shapes")
assert all(group_memory(g) > 0 for g in plan_groups(load_experiment("classic")))
p = [torch.zeros(4, 3, requires_grad=True)]
p[0].grad = torch.ones(4, 3)
opt = make_optimizer("adam", p, 1e-3)
opt.step(); opt.step()
print([m in sys.modules for m in heavy])
torch.optim.Adam(p, lr=1e-3)
print([m in sys.modules for m in heavy])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[False, False]"
    assert out[1] == "[True, True]"
