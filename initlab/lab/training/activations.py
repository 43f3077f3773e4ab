"""Elementwise activations as the training engines run them: which module is which activation,
and torch's own forward and backward kernels for the ones the stacked engine fuses.

Every activation-name special case of the trainer is here, each in one small function:
:func:`_kernels` (the fused kernels per table name), :func:`_stacked_name` (PReLU's slope runs
as leaky ReLU's kernel) and :func:`activation_key` (which leaf module computes which activation).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..._activations import Activation, resolve_activation
from ..._errors import InitlabError

__all__ = ["ActKey", "SegmentAct", "activation_key", "IDENTITY"]

#: (table name, parameter, function) of an elementwise activation, as the engines key it
ActKey = tuple[str, "float | None", Callable[[Tensor], Tensor]]
IDENTITY: ActKey = ("identity", None, lambda x: x)

Forward = Callable[[Tensor, Tensor, "float | None"], Any]
Backward = Callable[[Tensor, Tensor, Tensor, "float | None"], Any]


def _kernels(name: str) -> tuple[Forward, Backward] | None:
    """torch's forward ``(z, out, param)`` and in-place backward ``(g, z, h, param)`` kernels of a table
    activation (the ones autograd uses: sigmoid'(z) = h(1-h), tanh'(z) = 1-h^2, relu'(z) = [h > 0]),
    or None: that activation then runs its torch function under autograd."""
    return _KERNELS.get(name)


_KERNELS: dict[str, tuple[Forward, Backward]] = {
    "sigmoid": (lambda z, out, p: torch.sigmoid(z, out=out),
                lambda g, z, h, p: torch.ops.aten.sigmoid_backward.grad_input(g, h, grad_input=g)),
    "tanh": (lambda z, out, p: torch.tanh(z, out=out),
             lambda g, z, h, p: torch.ops.aten.tanh_backward.grad_input(g, h, grad_input=g)),
    "relu": (lambda z, out, p: torch.clamp_min(z, 0, out=out),
             lambda g, z, h, p: torch.ops.aten.threshold_backward.grad_input(g, h, 0, grad_input=g)),
    "leaky_relu": (lambda z, out, p: torch.ops.aten.leaky_relu.out(z, p, out=out),
                   lambda g, z, h, p: torch.ops.aten.leaky_relu_backward.grad_input(g, z, p, False, grad_input=g)),
    "identity": (lambda z, out, p: out.copy_(z), lambda g, z, h, p: None),
}


@dataclass
class SegmentAct:
    """An elementwise activation applied to the slice ``[start, stop)`` of the member axis.

    Table activations with fused kernels (:func:`_kernels`) use them; any other elementwise
    activation runs its torch function under autograd on the slice.
    """

    name: str
    param: float | None
    fn: Callable[[Tensor], Tensor]
    start: int
    stop: int
    inplace: bool = False
    _saved: tuple[Tensor, Tensor] | None = None
    _kernels: tuple[Forward, Backward] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._kernels = _kernels(self.name)

    @property
    def is_identity(self) -> bool:
        return self.name == "identity"

    def forward(self, z: Tensor, out: Tensor, track: bool) -> None:
        z, out = z[self.start:self.stop], out[self.start:self.stop]
        if self._kernels is not None:
            self._kernels[0](z, out, self.param)
        elif track:
            with torch.enable_grad():
                zs = z.detach().requires_grad_(True)
                hs = self.fn(zs.clone() if self.inplace else zs)
            out.copy_(hs.detach())
            self._saved = (zs, hs)
        else:
            out.copy_(self.fn(z.clone() if self.inplace else z))

    def backward(self, g: Tensor, z: Tensor, h: Tensor) -> None:
        """``g[slice] *= phi'(z[slice])`` in place (``h`` = phi(z))."""
        s = slice(self.start, self.stop)
        gs = g[s]
        if self._kernels is not None:
            self._kernels[1](gs, z[s], h[s], self.param)
            return
        assert self._saved is not None
        zs, hs = self._saved
        (gz,) = torch.autograd.grad(hs, zs, gs)
        gs.copy_(gz)
        self._saved = None


def _stacked_name(act: Activation) -> tuple[str, float | None]:
    """The kernel name and parameter an activation runs with: PReLU's (initial) slope as leaky ReLU."""
    if act.name in ("leaky_relu", "prelu"):
        return "leaky_relu", float(act.param if act.param is not None else 0.01)
    return act.name, act.param


def _same_function(module: nn.Module, cand: Activation) -> bool:
    """Whether ``module`` computes exactly ``cand`` on a test tensor."""
    t = torch.linspace(-5.0, 5.0, 2 * 3 * 11, dtype=torch.float64).view(2, 3, 11)
    try:
        with torch.no_grad():
            return torch.equal(module(t.clone()), cand.fn(t.clone()))
    except Exception:  # noqa: BLE001 - any failure means "not a plain elementwise activation"
        return False


def _resolve(value: object) -> Activation | None:
    try:
        return resolve_activation(value)
    except (InitlabError, TypeError):
        return None


def activation_key(module: nn.Module, scenario_activation: object, *, allow_params: bool = False) -> ActKey | None:
    """(name, param, fn) of an elementwise activation module, or None if it is not one we know.

    A module from the activation table is recognised directly. A wrapper module (e.g. a
    builder's own ``nn.Module`` around a function) is accepted when it computes exactly the
    scenario's activation on a test tensor.
    """
    if isinstance(module, nn.Identity):
        return IDENTITY
    if not allow_params and (any(True for _ in module.parameters()) or any(True for _ in module.buffers())):
        return None  # e.g. PReLU: a trainable slope is not part of the stacked engine
    act = _resolve(module)
    if act is None:
        return None
    if act.custom:
        cand = _resolve(scenario_activation)
        if cand is None or cand.custom or not _same_function(module, cand):
            return None
        act = cand
    name, param = _stacked_name(act)
    return (name, param, act.fn if name == "leaky_relu" else module)
