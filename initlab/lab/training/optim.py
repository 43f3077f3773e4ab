"""The lab's optimisers: Adam and SGD over the engines' tensors, stepped by torch's fused kernels.

Why not ``torch.optim``: constructing any ``torch.optim`` optimiser imports ``torch._dynamo`` (its
``add_param_group`` is wrapped by ``torch._disable_dynamo``), about a second of each lab process's
start-up, more than pandas, matplotlib and TensorBoard together. :class:`FusedAdam` and
:class:`FusedSGD` run the kernels that ``torch.optim.Adam(fused=True).step()`` and
``torch.optim.SGD(fused=True).step()`` run, on the same tensors, so the updates are bit-identical
(tested), and their ``state_dict`` has ``torch.optim``'s format: a checkpoint written by either
loads into the other.

Adam (Kingma & Ba 2015), per tensor, at step t with gradient g:
``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
``w <- w - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``; SGD: ``w <- w - lr g``, with
momentum ``b <- momentum b + g`` (``b = g`` at the first step), ``w <- w - lr b``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["FusedAdam", "FusedSGD", "fused_supported"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fused_supported(params: Sequence[Tensor]) -> bool:
    """Whether torch's fused Adam/SGD kernels take these tensors: dense floating tensors on the CPU or CUDA."""
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in _DTYPES and not p.is_sparse for p in params)


class _Fused:
    """One parameter group over ``params``; ``state`` maps a parameter to its state, as in ``torch.optim``."""

    def __init__(self, params: Sequence[Tensor], group: dict[str, Any]) -> None:
        self.params = list(params)
        self.param_groups = [{**group, "params": self.params}]
        self.state: dict[Tensor, dict[str, Any]] = {}
        self._lists: tuple[list[Tensor], ...] | None = None  # the step's tensor lists, built at the first step

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict``'s format: state by parameter index, one group."""
        index = {id(p): i for i, p in enumerate(self.params)}
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        # a step count shared by every tensor is given to each as its own copy: torch.optim adds 1 to
        # each tensor's count, so loading shared counts there would add several per step
        return {"state": {index[id(p)]: {k: (v.clone() if k == "step" else v) for k, v in st.items()}
                          for p, st in self.state.items() if st},
                "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state written by :meth:`state_dict` or by the same ``torch.optim`` optimiser (the
        group's hyperparameters included); tensors are moved to their parameter's device, and cast
        to its dtype except step counts."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            sizes = [len(g["params"]) for g in groups]
            raise ValueError(f"optimizer state has parameter groups of sizes {sizes}, expected one of "
                             f"{len(self.params)}")
        self.param_groups[0].update({k: v for k, v in groups[0].items() if k != "params"})
        by_index = dict(zip(groups[0]["params"], self.params))
        self.state = {}
        for i, st in state_dict["state"].items():
            p = by_index[i]
            self.state[p] = {k: (v.to(device=p.device, dtype=(torch.float32 if k == "step" else p.dtype))
                                 if isinstance(v, Tensor) else v) for k, v in st.items()}
        self._lists = None

    def _with_grads(self) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters that have a gradient, and their gradients (torch skips the others)."""
        params = [p for p in self.params if p.grad is not None]
        return params, [p.grad for p in params]  # type: ignore[misc]


class FusedAdam(_Fused):
    """Adam with ``torch.optim.Adam(params, lr, fused=True)``'s defaults (betas (0.9, 0.999),
    eps 1e-8, no weight decay), one ``torch._fused_adam_`` call per step over every tensor.
    The step counts are one shared fp32 tensor while they are equal (one ``add_`` per step)."""

    def __init__(self, params: Sequence[Tensor], lr: float) -> None:
        super().__init__(params, dict(lr=float(lr), betas=(0.9, 0.999), eps=1e-08, weight_decay=0, amsgrad=False,
                                      maximize=False, foreach=None, capturable=False, differentiable=False,
                                      fused=True, decoupled_weight_decay=False))

    def _prepare(self, params: list[Tensor]) -> tuple[list[Tensor], ...]:
        states = []
        for p in params:
            st = self.state.setdefault(p, {})
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states.append(st)
        steps = [st["step"] for st in states]
        if len({t.device for t in steps}) == 1 and all(torch.equal(t, steps[0]) for t in steps):
            for st in states:  # equal counts: one tensor for all
                st["step"] = steps[0]
            steps = [steps[0]] * len(steps)
        return params, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], steps

    def step(self) -> None:
        params, grads = self._with_grads()
        lists = self._lists
        if lists is None or len(lists[0]) != len(params) or any(a is not b for a, b in zip(lists[0], params)):
            lists = self._lists = self._prepare(params)
        _, exp_avgs, exp_avg_sqs, steps = lists
        g = self.param_groups[0]
        with torch.no_grad():
            if steps and steps[0] is steps[-1]:
                steps[0].add_(1)
            else:
                torch._foreach_add_(steps, 1)
            torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=float(g["lr"]),
                               beta1=float(g["betas"][0]), beta2=float(g["betas"][1]),
                               weight_decay=float(g["weight_decay"]), eps=float(g["eps"]), maximize=False)


class FusedSGD(_Fused):
    """SGD as ``torch.optim.SGD(params, lr, momentum=momentum, fused=True)``: one
    ``torch._fused_sgd_`` call per step over every tensor."""

    def __init__(self, params: Sequence[Tensor], lr: float, momentum: float = 0.0) -> None:
        super().__init__(params, dict(lr=float(lr), momentum=momentum or 0, dampening=0, weight_decay=0,
                                      nesterov=False, maximize=False, foreach=None, differentiable=False, fused=True))

    def step(self) -> None:
        params, grads = self._with_grads()
        g = self.param_groups[0]
        momentum = float(g["momentum"])
        bufs: list[Tensor] = []
        first = False
        if momentum != 0:
            old = [self.state.get(p, {}).get("momentum_buffer") for p in params]
            first = all(b is None for b in old)
            bufs = [torch.empty_like(gr) for gr in grads] if first else old  # type: ignore[assignment]
        with torch.no_grad():
            torch._fused_sgd_(params, grads, bufs, weight_decay=float(g["weight_decay"]), momentum=momentum,
                              lr=float(g["lr"]), dampening=float(g["dampening"]), nesterov=bool(g["nesterov"]),
                              maximize=False, is_first_step=first)
        if first:
            for p, b in zip(params, bufs):
                self.state.setdefault(p, {})["momentum_buffer"] = b
