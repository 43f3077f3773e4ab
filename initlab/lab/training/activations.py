"""Elementwise activations as the training engines run them: which module is which activation
(:func:`activation_key`), and torch's own forward and backward kernels for the ones the stacked
engine fuses (the activation table's ``kernels``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..._activations import Activation, Kernels, activation_row, resolve_activation
from ..._errors import InitlabError

__all__ = ["ActKey", "SegmentAct", "activation_key", "IDENTITY"]

#: (table name, parameter, function) of an elementwise activation, as the engines key it
ActKey = tuple[str, "float | None", Callable[[Tensor], Tensor]]
IDENTITY: ActKey = ("identity", None, lambda x: x)


def _kernels(name: str) -> Kernels | None:
    """The activation table's fused kernels of a row (forward ``(z, out, param)``, in-place backward
    ``(g, z, h, param)``; the ones autograd uses), or None: that activation then runs its torch
    function under autograd."""
    try:
        return activation_row(name).kernels
    except InitlabError:
        return None


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
    _kernels: Kernels | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._kernels = _kernels(self.name)

    @property
    def is_identity(self) -> bool:
        return self.name == IDENTITY[0]

    def forward(self, z: Tensor, out: Tensor, track: bool) -> None:
        self.forward_slice(z[self.start:self.stop], out[self.start:self.stop], track)

    def forward_slice(self, z: Tensor, out: Tensor, track: bool) -> None:
        """:meth:`forward` on this segment's slices themselves (``z[start:stop]``, ``out[start:stop]``)."""
        if self._kernels is not None:
            self._kernels.forward(z, out, self.param)
        elif track:
            with torch.enable_grad():
                zs = z.detach().requires_grad_(True)
                hs = self.fn(zs.clone() if self.inplace else zs)
            out.copy_(hs.detach())
            self._saved = (zs, hs)
        else:
            out.copy_(self.fn(z.clone() if self.inplace else z))

    def backward_slice(self, gs: Tensor, zs: Tensor, hs: Tensor) -> None:
        """``gs *= phi'(zs)`` in place, on this segment's slices (``g[start:stop]``, ...; ``hs`` = phi(zs))."""
        if self._kernels is not None:
            self._kernels.backward(gs, zs, hs, self.param)
            return
        assert self._saved is not None
        zs, hs = self._saved
        (gz,) = torch.autograd.grad(hs, zs, gs)
        gs.copy_(gz)
        self._saved = None


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
    return IDENTITY if act.is_identity else (act.name, act.param, module)
