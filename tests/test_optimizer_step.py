"""The training loop's optimiser step (initlab.lab.training.loop.optimizer_step): the same update as
``torch.optim.Adam(fused=True).step()``, bit for bit, without the Python around the kernel."""
from __future__ import annotations

import pytest
import torch

from initlab.lab.training.loop import make_optimizer, optimizer_step

# shapes of a stacked 5-member MLP: sizes with and without a tail that the kernel's vector loop leaves over
SHAPES = [(5, 37, 11), (5, 1, 11), (5, 11, 3), (5, 1, 3)]


def _tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _run(step_of, lr: float = 1e-2, steps: int = 30) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    params = [t.requires_grad_(True) for t in _tensors(0)]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = make_optimizer("adam", params, lr)
    step = step_of(opt)
    g = torch.Generator().manual_seed(1)
    for k in range(steps):
        for p in params:  # gradients over many scales, some exactly zero
            p.grad.copy_(torch.randn(p.shape, generator=g) * 10.0 ** (k % 9 - 6))
            p.grad[0].zero_()
        step()
    return [p.detach().clone() for p in params], opt


def _fused_available() -> bool:
    try:
        torch.optim.Adam([torch.zeros(2, requires_grad=True)], lr=1e-3, fused=True)
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


@pytest.mark.skipif(not _fused_available(), reason="no fused Adam in this torch build")
def test_direct_fused_adam_is_torch_adam_bit_for_bit():
    ref, ref_opt = _run(lambda opt: opt.step)
    calls = []

    def counted(opt):
        real = opt.step
        opt.step = lambda: (calls.append(1), real())  # the first step only: torch creates the state
        return optimizer_step(opt)

    got, opt = _run(counted)
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    for p_ref, p in zip(ref_opt.param_groups[0]["params"], opt.param_groups[0]["params"], strict=True):
        a, b = ref_opt.state[p_ref], opt.state[p]
        assert float(a["step"]) == float(b["step"]) == 30.0
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    # the state it leaves is torch's: a checkpoint round trip continues the same
    assert opt.state_dict()["param_groups"] == ref_opt.state_dict()["param_groups"]


@pytest.mark.skipif(not _fused_available(), reason="no fused Adam in this torch build")
def test_direct_fused_adam_negative_control_wrong_lr_differs():
    ref, _ = _run(lambda opt: opt.step)

    def wrong_lr(opt):
        opt.param_groups[0]["lr"] = 1.0001e-2
        return optimizer_step(opt)

    got, _ = _run(wrong_lr)
    assert not all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))


def test_other_optimisers_step_as_torch_does():
    params = [torch.zeros(3, requires_grad=True)]
    sgd = make_optimizer("sgd", params, 0.1)
    assert optimizer_step(sgd) == sgd.step
    foreach = torch.optim.Adam(params, lr=0.1, foreach=True)
    assert optimizer_step(foreach) == foreach.step
    amsgrad = torch.optim.Adam(params, lr=0.1, amsgrad=True)
    assert optimizer_step(amsgrad) == amsgrad.step
