"""The activation table: one row per activation, used by gains, theory, probe and ``auto``.

Adding an activation is one ``_register(...)`` line below. Each row carries the torch
function (elementwise on tensors), its family (which decides what ``auto`` does with it),
whether it is differentiable at 0 (Kumar's rule needs that), the closed-form second moment
E[phi(z)^2] for z ~ N(0,1) where one exists, and PyTorch's ``calculate_gain`` value.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._errors import InitlabError, unknown_choice

# family: "linear" (identity), "relu" (piecewise linear with a kink at 0),
# "saturating" (sigmoid/tanh-like, bounded), "selu", "smooth" (GELU, SiLU, ... and callables).
FAMILIES = ("linear", "relu", "saturating", "selu", "smooth")


@dataclass(frozen=True)
class Activation:
    """A resolved activation: ``fn(x)`` is ``phi`` applied elementwise, with ``param`` bound."""

    name: str
    fn: Callable[[Tensor], Tensor]
    family: str
    param: float | None = None
    differentiable_at_0: bool = True
    second_moment: float | None = None  # closed form of E[phi(z)^2], z ~ N(0,1)
    torch_gain: float | None = None  # torch.nn.init.calculate_gain's value
    saturates: bool = False  # bounded: "saturated" units are meaningful
    custom: bool = False  # an arbitrary callable, not a table row

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)

    @property
    def label(self) -> str:
        """``name``, or ``name(param)`` when a parameter is bound (``leaky_relu(0.2)``)."""
        return self.name if self.param is None else f"{self.name}({self.param:g})"


@dataclass(frozen=True)
class _Row:
    make: Callable[[float | None], Callable[[Tensor], Tensor]]
    family: str
    default_param: float | None = None
    differentiable_at_0: bool = True
    second_moment: Callable[[float | None], float] | None = None
    torch_gain: Callable[[float | None], float] | None = None
    saturates: bool = False


_TABLE: dict[str, _Row] = {}
_ALIASES: dict[str, str] = {}


def _register(name: str, row: _Row, *aliases: str) -> None:
    _TABLE[name] = row
    for a in aliases:
        _ALIASES[a] = name


def _const(v: float) -> Callable[[float | None], float]:
    return lambda _p: v


def _leaky_second_moment(a: float | None) -> float:
    return (1.0 + float(a) ** 2) / 2.0


def _leaky_torch_gain(a: float | None) -> float:
    return math.sqrt(2.0 / (1.0 + float(a) ** 2))


# name, torch fn factory, family, default param, differentiable at 0, E[phi^2] closed form, torch gain
_register("identity", _Row(lambda p: (lambda x: x), "linear", second_moment=_const(1.0), torch_gain=_const(1.0)), "linear", "none")
_register("sigmoid", _Row(lambda p: torch.sigmoid, "saturating", torch_gain=_const(1.0), saturates=True), "logistic")
_register("tanh", _Row(lambda p: torch.tanh, "saturating", torch_gain=_const(5.0 / 3.0), saturates=True))
_register("relu", _Row(lambda p: torch.relu, "relu", differentiable_at_0=False, second_moment=_const(0.5), torch_gain=_const(math.sqrt(2.0))))
_register("leaky_relu", _Row(lambda p: (lambda x: F.leaky_relu(x, p)), "relu", 0.01, False, _leaky_second_moment, _leaky_torch_gain), "leakyrelu", "lrelu")
_register("prelu", _Row(lambda p: (lambda x: F.leaky_relu(x, p)), "relu", 0.25, False, _leaky_second_moment, _leaky_torch_gain))
_register("elu", _Row(lambda p: (lambda x: F.elu(x, p)), "smooth", 1.0, True))
_register("selu", _Row(lambda p: F.selu, "selu", differentiable_at_0=False, torch_gain=_const(0.75)))
_register("celu", _Row(lambda p: (lambda x: F.celu(x, p)), "smooth", 1.0, True))
_register("gelu", _Row(lambda p: F.gelu, "smooth"))
_register("gelu_tanh", _Row(lambda p: (lambda x: F.gelu(x, approximate="tanh")), "smooth"), "gelu_approx")
_register("silu", _Row(lambda p: F.silu, "smooth"), "swish")
_register("mish", _Row(lambda p: F.mish, "smooth"))
_register("softplus", _Row(lambda p: F.softplus, "smooth"))
_register("softsign", _Row(lambda p: F.softsign, "saturating", saturates=True))
# E[hardtanh(z)^2] = E[z^2; |z|<1] + P(|z|>1) = 1 - 2*pdf(1)
_register("hardtanh", _Row(lambda p: F.hardtanh, "saturating", second_moment=_const(1.0 - 2.0 * math.exp(-0.5) / math.sqrt(2.0 * math.pi)), saturates=True))
_register("relu6", _Row(lambda p: F.relu6, "relu", differentiable_at_0=False))
_register("hardswish", _Row(lambda p: F.hardswish, "smooth"))


def activation_names() -> list[str]:
    """Canonical names of the activation table (aliases excluded)."""
    return list(_TABLE)


def _from_name(name: str, param: float | None) -> Activation:
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    row = _TABLE.get(key)
    if row is None:
        raise unknown_choice("activation", name, list(_TABLE) + list(_ALIASES))
    if param is None:
        param = row.default_param
    elif row.default_param is None:
        raise InitlabError(f"activation {key!r} takes no parameter, got param={param!r}")
    if param is not None:
        param = float(param)
        if not math.isfinite(param):
            raise InitlabError(f"activation parameter must be finite, got {param!r}")
    return Activation(
        name=key,
        fn=row.make(param),
        family=row.family,
        param=param,
        differentiable_at_0=row.differentiable_at_0,
        second_moment=row.second_moment(param) if row.second_moment else None,
        torch_gain=row.torch_gain(param) if row.torch_gain else None,
        saturates=row.saturates,
    )


# nn.Module classes -> (table name, how to read the parameter off an instance)
_MODULES: dict[type, tuple[str, Callable[[nn.Module], float | None]]] = {
    nn.Identity: ("identity", lambda m: None),
    nn.Sigmoid: ("sigmoid", lambda m: None),
    nn.Tanh: ("tanh", lambda m: None),
    nn.ReLU: ("relu", lambda m: None),
    nn.LeakyReLU: ("leaky_relu", lambda m: m.negative_slope),
    nn.PReLU: ("prelu", lambda m: float(m.weight.detach().float().mean()) if not m.weight.is_meta else 0.25),
    nn.ELU: ("elu", lambda m: m.alpha),
    nn.SELU: ("selu", lambda m: None),
    nn.CELU: ("celu", lambda m: m.alpha),
    nn.SiLU: ("silu", lambda m: None),
    nn.Mish: ("mish", lambda m: None),
    nn.Softplus: ("softplus", lambda m: None),
    nn.Softsign: ("softsign", lambda m: None),
    nn.ReLU6: ("relu6", lambda m: None),
    nn.Hardtanh: ("hardtanh", lambda m: None),
    nn.Hardswish: ("hardswish", lambda m: None),
}

# functions (torch.*, F.*, Tensor methods by name) -> table name
_FUNCTIONS: dict[object, str] = {
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh",
    torch.relu: "relu", F.relu: "relu", F.relu_: "relu", torch.relu_: "relu",
    F.leaky_relu: "leaky_relu", F.elu: "elu", F.selu: "selu", torch.selu: "selu", F.celu: "celu",
    F.gelu: "gelu", F.silu: "silu", F.mish: "mish", F.softplus: "softplus", F.softsign: "softsign",
    F.hardtanh: "hardtanh", F.relu6: "relu6", F.hardswish: "hardswish",
}
METHOD_NAMES = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu", "relu_": "relu",
                "sigmoid_": "sigmoid", "tanh_": "tanh"}


def _from_module(m: nn.Module) -> Activation:
    for cls in type(m).__mro__:
        if cls in _MODULES:
            name, read = _MODULES[cls]
            if cls is nn.Softplus and (m.beta != 1):
                return _custom(m, f"softplus(beta={m.beta})")
            if cls is nn.Hardtanh and cls is type(m) and (m.min_val, m.max_val) != (-1.0, 1.0):
                return replace(_custom(m, f"hardtanh({m.min_val},{m.max_val})"), family="saturating", saturates=True, differentiable_at_0=True)
            return _from_name(name, read(m))
    if isinstance(m, nn.GELU):
        return _from_name("gelu_tanh" if m.approximate == "tanh" else "gelu", None)
    return _custom(m, type(m).__name__)


def _custom(fn: Callable[[Tensor], Tensor], name: str | None = None) -> Activation:
    name = name or getattr(fn, "__name__", None) or type(fn).__name__
    return Activation(name=name, fn=fn, family="smooth", custom=True)


def resolve_activation(activation: object, param: float | None = None) -> Activation:
    """Turn a name, an ``nn.Module`` instance or class, or any callable into an :class:`Activation`.

    ``param`` is the slope of leaky_relu/prelu or the alpha of elu/celu (None: the default).
    ``None`` means no activation (identity). Unknown names raise an error listing valid names.
    """
    if isinstance(activation, Activation):
        return activation
    if activation is None:
        return _from_name("identity", None)
    if isinstance(activation, str):
        return _from_name(activation, param)
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        try:
            activation = activation()
        except TypeError as e:
            raise InitlabError(f"cannot instantiate activation class {activation.__name__} without arguments; pass an instance") from e
    if isinstance(activation, nn.Module):
        act = _from_module(activation)
        if param is not None and not act.custom:
            act = _from_name(act.name, param)
        return act
    if activation in _FUNCTIONS:  # type: ignore[operator]
        return _from_name(_FUNCTIONS[activation], param)  # type: ignore[index]
    if callable(activation):
        return _custom(activation)
    raise InitlabError(
        f"activation must be a name, an nn.Module, or a callable on tensors, got {type(activation).__name__}: {activation!r}. "
        f"Valid names: {', '.join(_TABLE)}"
    )
