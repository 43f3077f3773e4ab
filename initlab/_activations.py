"""The activation table: one row per activation, holding every fact any part of initlab needs.

Gains, ``auto``, fx detection, theory, probe, audit and the lab all ask this table a question
(``act.auto``, ``act.bounds``, ``act.kinks``, ``act.module()``...) instead of comparing names.
Adding an activation is one :func:`register_activation` call: built-in rows are registered at
the bottom of this module, and users call the same function (``initlab.register_activation``).

A row's facts:

* the callable ``fn(x)`` (or ``fn(x, param)`` for a row with a parameter) and its ``param``
  default and keyword (``negative_slope`` of leaky ReLU, ``alpha`` of ELU/CELU);
* how to recognise it in a model: ``nn`` classes, torch functions, Tensor method names, and
  attribute/keyword values that must hold (``nn.GELU(approximate="tanh")`` is ``gelu_tanh``);
* the ``nn.Module`` the lab and ``initlab audit --mlp`` build for it;
* gains: the closed-form second moment E[phi(z)^2] for z ~ N(0, 1) where one exists, and
  ``torch.nn.init.calculate_gain``'s value; whether it is differentiable at 0 (Kumar's rule);
* for the quadrature of :mod:`initlab.theory`: the kinks to split at, whether phi is positively
  homogeneous (phi(s z) = s phi(z), s > 0), and phi' as a function of phi's output;
* for diagnostics: whether units can die (zero on the negative half-line) and the output bounds
  (a bounded activation can saturate);
* what ``auto`` does with a layer it follows (``"lecun"``, ``"kumar"`` or ``"second_moment"``)
  and what ``audit`` suggests;
* optionally torch's fused forward/backward kernels, which the lab's batched engine calls.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._errors import InitlabError, unknown_choice

__all__ = ["Activation", "ActivationRow", "Kernels", "register_activation", "resolve_activation",
           "activation_names", "activation_row", "activation_functions", "row_of_function", "row_of_method", "activation_of_call",
           "is_activation_module", "module_state", "plain_settings", "AUTO_RULES", "FAMILIES"]

# descriptive families, shown by ``initlab gains`` (no code branches on them)
FAMILIES = ("linear", "relu", "saturating", "selu", "smooth")
# what ``auto`` does with a layer followed by the activation:
#   lecun: Var[W] = 1/fan_in; kumar: Kumar's rule; second_moment: Var[W] = 1/(fan_in E[phi(z)^2])
AUTO_RULES = ("lecun", "kumar", "second_moment")
_DEFAULT_SUGGESTION = "initlab.init_model(model, 'auto')"
IDENTITY = "identity"  # the row ``None`` (no activation) resolves to


@dataclass(frozen=True)
class Kernels:
    """torch's fused kernels of an activation (the ones autograd calls), for hand-written engines.

    ``forward(z, out, param)`` writes phi(z) into ``out``; ``backward(g, z, h, param)`` multiplies
    ``g`` in place by phi'(z), given z and h = phi(z).
    """

    forward: Callable[[Tensor, Tensor, float | None], Any]
    backward: Callable[[Tensor, Tensor, Tensor, float | None], Any]


@dataclass(frozen=True, eq=False)
class ActivationRow:
    """One row of the activation table (see the module docstring for what each fact is for).

    Rows compare and hash by identity: a row re-registered with ``overwrite=True`` is a new
    row, so caches keyed on rows (gains, theory, probe) never return its predecessor's values.
    """

    name: str
    fn: Callable[..., Tensor]  # phi(x), or phi(x, param) when ``param`` is not None
    family: str = "smooth"
    param: float | None = None  # default parameter; None: the activation takes none
    param_name: str | None = None  # its keyword in the functional and module forms
    aliases: tuple[str, ...] = ()
    modules: tuple[type, ...] = ()  # nn classes computing it (subclasses count)
    match: tuple[tuple[str, Any, Any], ...] = ()  # (attribute or keyword, required value, its default)
    module: Callable[[float | None], nn.Module] | None = None  # builds one; default: modules[0](param_name=param)
    read_param: Callable[[nn.Module], float | None] | None = None  # default: getattr(m, param_name)
    functions: tuple[Callable[..., Any], ...] = ()  # torch.* / F.* functions computing it
    methods: tuple[str, ...] = ()  # Tensor method names computing it
    differentiable_at_0: bool = True
    second_moment: Callable[[float | None], float] | None = None  # closed form of E[phi(z)^2]
    torch_gain: Callable[[float | None], float] | None = None  # torch.nn.init.calculate_gain
    kinks: tuple[float, ...] = ()  # points other than 0 where phi' jumps
    homogeneous: bool = False  # phi(s z) = s phi(z) for s > 0
    derivative_from_output: Callable[[Any], Any] | None = None  # phi'(z) from y = phi(z)
    zero_on_negative: bool = False  # phi = 0 for z < 0: units can die
    bounds: tuple[float, float] | None = None  # output range of a bounded (saturating) activation
    auto: str = "second_moment"
    suggest: str = _DEFAULT_SUGGESTION
    kernels: Kernels | None = None

    def bind(self, param: float | None) -> Callable[[Tensor], Tensor]:
        """phi with its parameter bound."""
        if self.param is None:
            return self.fn
        fn = self.fn
        return lambda x: fn(x, param)

    def build_module(self, param: float | None) -> nn.Module | None:
        """An ``nn.Module`` computing this activation, or None when the row has no module."""
        if self.module is not None:
            return self.module(param)
        if not self.modules:
            return None
        kwargs = {} if self.param_name is None else {self.param_name: param}
        return self.modules[0](**kwargs)

    def param_of(self, m: nn.Module) -> float | None:
        """The parameter read off a module instance."""
        if self.read_param is not None:
            return self.read_param(m)
        return None if self.param_name is None else getattr(m, self.param_name)


@dataclass(frozen=True)
class Activation:
    """A resolved activation: ``fn(x)`` is phi applied elementwise, with ``param`` bound.

    ``row`` is the table row (None for an arbitrary callable, ``custom``); the facts are copied
    from it so that custom callables answer every question with safe defaults.
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    family: str
    param: float | None = None
    differentiable_at_0: bool = True
    second_moment: float | None = None  # closed form of E[phi(z)^2], z ~ N(0,1)
    torch_gain: float | None = None  # torch.nn.init.calculate_gain's value
    custom: bool = False  # an arbitrary callable, not a table row
    kinks: tuple[float, ...] = ()
    homogeneous: bool = False
    derivative_from_output: Callable[[Any], Any] | None = None
    zero_on_negative: bool = False
    bounds: tuple[float, float] | None = None
    auto: str = "second_moment"
    suggest: str = _DEFAULT_SUGGESTION
    kernels: Kernels | None = None
    row: ActivationRow | None = field(default=None, compare=False, repr=False)

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)

    @property
    def label(self) -> str:
        """``name``, or ``name(param)`` when a parameter is bound (``leaky_relu(0.2)``)."""
        return self.name if self.param is None else f"{self.name}({self.param:g})"

    @property
    def saturates(self) -> bool:
        """Bounded output, so "saturated" units are meaningful."""
        return self.bounds is not None

    @property
    def cache_key(self) -> Any:
        """What identifies phi for caches: ``(row, param)`` for a table activation (a row
        re-registered with ``overwrite=True`` is a new key), ``("custom", fn)`` for a custom
        callable, and for a custom ``nn.Module`` also its current settings and parameter
        versions (:func:`module_state`: a changed slope is a new key); None when the callable
        is not hashable (then nothing is cached)."""
        if self.row is not None:
            return (self.row, self.param)
        try:
            hash(self.fn)
        except TypeError:
            return None
        if isinstance(self.fn, nn.Module):
            return ("custom", self.fn, module_state(self.fn))
        return ("custom", self.fn)

    @property
    def is_identity(self) -> bool:
        """True for the identity row (no activation)."""
        return self.row is not None and self.row.name == IDENTITY

    def module(self) -> nn.Module:
        """An ``nn.Module`` computing this activation (the table's module, else a wrapper)."""
        if self.row is None and isinstance(self.fn, nn.Module):
            return self.fn
        built = None if self.row is None else self.row.build_module(self.param)
        return built if built is not None else Elementwise(self)


_SETTING_TYPES = (bool, int, float, str, type(None))


def plain_settings(m: nn.Module) -> tuple[tuple[str, Any], ...]:
    """A module's own public attributes that are numbers, strings, None or tuples of those
    (``negative_slope``, ``stride``, ``groups``...), ``training`` excluded."""
    return tuple((k, v) for k, v in vars(m).items()
                 if not k.startswith("_") and k != "training" and (
                     isinstance(v, _SETTING_TYPES) or (isinstance(v, tuple) and all(isinstance(x, _SETTING_TYPES) for x in v))))


def module_state(m: nn.Module) -> tuple[Any, ...]:
    """What a module computes with, cheaply: its plain settings (``negative_slope``, ``alpha``,
    ``approximate``... every public attribute that is a number, string, None or a tuple of those)
    and the identity and version counter of each of its tensors (bumped by every in-place
    change), for the whole submodule tree. Equal states mean the module computes the same
    function, so caches keyed on a module stay right after the user changes it."""
    out: list[Any] = []
    for name, sub in m.named_modules():
        settings = plain_settings(sub)
        tensors = tuple((k, id(t), t._version if not t.is_inference() else 0)
                        for k, t in (*sub._parameters.items(), *sub._buffers.items()) if t is not None)
        out.append((name, type(sub), settings, tensors))
    return tuple(out)


class Elementwise(nn.Module):
    """An ``nn.Module`` around an elementwise activation that has no module of its own."""

    def __init__(self, act: Activation) -> None:
        super().__init__()
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act.fn(x)

    def extra_repr(self) -> str:
        return self.act.label


# classes that can never be activations (the layer table's weight and norm layers live above this
# module; these are their torch bases)
_LAYER_CLASSES: tuple[type, ...] = (nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention,
                                    nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)

_TABLE: dict[str, ActivationRow] = {}
_ALIASES: dict[str, str] = {}
_BY_MODULE: dict[type, list[ActivationRow]] = {}
_BY_FUNCTION: dict[Any, list[ActivationRow]] = {}
_BY_METHOD: dict[str, ActivationRow] = {}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _check_row(row: ActivationRow) -> None:
    if not row.name or not isinstance(row.name, str):
        raise InitlabError(f"activation name must be a non-empty string, got {row.name!r}")
    if not callable(row.fn):
        raise InitlabError(f"activation {row.name!r}: fn must be callable, got {type(row.fn).__name__}")
    if row.auto not in AUTO_RULES:
        raise unknown_choice("auto rule", row.auto, AUTO_RULES)
    if row.family not in FAMILIES:
        raise unknown_choice("activation family", row.family, FAMILIES)
    if row.bounds is not None and not (len(row.bounds) == 2 and row.bounds[0] < row.bounds[1]):
        raise InitlabError(f"activation {row.name!r}: bounds must be (low, high) with low < high, got {row.bounds!r}")
    for cls in row.modules:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise InitlabError(f"activation {row.name!r}: modules must be nn.Module classes, got {cls!r}")
        if cls in _LAYER_CLASSES or issubclass(cls, _LAYER_CLASSES):
            raise InitlabError(f"activation {row.name!r}: {cls.__name__} is a weight or normalisation layer, "
                               "not an activation; modules must be the activation's own nn.Module classes")
    if row.param is not None and not math.isfinite(row.param):
        raise InitlabError(f"activation {row.name!r}: default param must be finite, got {row.param!r}")


def _unregister(name: str) -> None:
    old = _TABLE.pop(name)
    for table in (_BY_MODULE, _BY_FUNCTION):
        for k in [k for k, rows in table.items() if old in rows]:
            table[k] = [r for r in table[k] if r is not old]
            if not table[k]:
                del table[k]
    for k in [k for k, r in _BY_METHOD.items() if r is old]:
        del _BY_METHOD[k]
    for k in [k for k, v in _ALIASES.items() if v == name]:
        del _ALIASES[k]


def _add(row: ActivationRow, overwrite: bool = False) -> ActivationRow:
    _check_row(row)
    key = _key(row.name)
    names = [key, *(_key(a) for a in row.aliases)]
    taken = [n for n in names if n in _TABLE or n in _ALIASES]
    if taken and not overwrite:
        raise InitlabError(f"activation {taken[0]!r} is already registered; pass overwrite=True to replace it")
    if key in _TABLE:
        _unregister(key)
    row = replace(row, name=key)
    _TABLE[key] = row
    for a in names[1:]:
        _ALIASES[a] = key
    for cls in row.modules:
        _BY_MODULE.setdefault(cls, []).append(row)
    for f in row.functions:
        _BY_FUNCTION.setdefault(f, []).append(row)
    for meth in row.methods:
        _BY_METHOD[meth] = row
    return row


def register_activation(name: str, fn: Callable[..., Tensor], *, param: float | None = None,
                        param_name: str | None = None, aliases: tuple[str, ...] = (),
                        modules: tuple[type, ...] = (), module: Callable[[float | None], nn.Module] | None = None,
                        functions: tuple[Callable[..., Any], ...] = (), methods: tuple[str, ...] = (),
                        differentiable_at_0: bool = True, second_moment: float | None = None,
                        kinks: tuple[float, ...] = (), homogeneous: bool = False, zero_on_negative: bool = False,
                        bounds: tuple[float, float] | None = None, auto: str = "second_moment",
                        suggest: str | None = None, overwrite: bool = False) -> ActivationRow:
    """Make an activation known to every part of initlab at once: gains, ``auto``, fx detection
    (``modules``, ``functions``, ``methods``), theory, probe, audit and the lab.

    ``fn(x)`` computes phi elementwise (``fn(x, param)`` when ``param`` gives a default
    parameter). ``second_moment`` is a closed form of E[phi(z)^2], z ~ N(0, 1), if you know one;
    otherwise gains integrate it numerically. ``auto`` is the rule ``init_model(..., "auto")``
    applies to a layer followed by phi: ``"second_moment"`` (default; Var[W] = 1/(fan_in E[phi^2]),
    He et al. 2015 generalised), ``"kumar"`` (Kumar 2017; phi differentiable at 0) or ``"lecun"``
    (Var[W] = 1/fan_in). ``kinks`` are points other than 0 where phi' jumps (the quadrature
    splits there), ``bounds`` the output range of a saturating activation, ``zero_on_negative``
    marks activations whose units can die. Returns the table row.

    Example: ``register_activation("squareplus", lambda x: 0.5 * (x + torch.sqrt(x * x + 4)))``.
    """
    if not isinstance(name, str) or not name.strip():
        raise InitlabError(f"activation name must be a non-empty string, got {name!r}")
    where = f"register_activation({name!r})"
    if param is not None:
        param = _number(param, f"{where}: param")
    sm = None
    if second_moment is not None:
        m2 = _number(second_moment, f"{where}: second_moment")
        if m2 <= 0:
            raise InitlabError(f"{where}: second_moment is E[phi(z)^2], which is > 0; got {second_moment!r}")
        sm = _const(m2)
    for flag, value in (("differentiable_at_0", differentiable_at_0), ("homogeneous", homogeneous),
                        ("zero_on_negative", zero_on_negative), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise InitlabError(f"{where}: {flag} must be True or False, got {value!r}")
    row = ActivationRow(
        name=name, fn=fn, param=param, param_name=_optional_str(param_name, f"{where}: param_name"),
        aliases=_names(aliases, f"{where}: aliases"), modules=_seq(modules, f"{where}: modules"),
        module=module, functions=_callables(functions, f"{where}: functions"), methods=_names(methods, f"{where}: methods"),
        differentiable_at_0=differentiable_at_0, second_moment=sm,
        kinks=tuple(_number(k, f"{where}: kinks") for k in _seq(kinks, f"{where}: kinks")), homogeneous=homogeneous,
        zero_on_negative=zero_on_negative, bounds=_bounds(bounds, where),
        auto=auto, suggest=_optional_str(suggest, f"{where}: suggest") or _DEFAULT_SUGGESTION,
        family="saturating" if bounds is not None else "smooth",
    )
    if module is not None and not callable(module):
        raise InitlabError(f"{where}: module must be a function param -> nn.Module, got {type(module).__name__}")
    return _add(row, overwrite)


def _number(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise InitlabError(f"{what} must be a finite number, got {type(v).__name__}: {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise InitlabError(f"{what} must be a finite number, got {v!r}")
    return f


def _seq(v: object, what: str) -> tuple[Any, ...]:
    if isinstance(v, (str, bytes)) or not isinstance(v, (tuple, list, set, frozenset)):
        raise InitlabError(f"{what} must be a tuple or list, got {type(v).__name__}: {v!r}")
    return tuple(v)


def _names(v: object, what: str) -> tuple[str, ...]:
    items = (v,) if isinstance(v, str) else _seq(v, what)
    for x in items:
        if not isinstance(x, str) or not x.strip():
            raise InitlabError(f"{what} must be non-empty strings, got {x!r}")
    return items  # type: ignore[return-value]


def _callables(v: object, what: str) -> tuple[Callable[..., Any], ...]:
    items = _seq(v, what)
    for f in items:
        if not callable(f):
            raise InitlabError(f"{what} must be functions, got {type(f).__name__}: {f!r}")
    return items


def _optional_str(v: object, what: str) -> str | None:
    if v is not None and (not isinstance(v, str) or not v.strip()):
        raise InitlabError(f"{what} must be a non-empty string or None, got {v!r}")
    return v  # type: ignore[return-value]


def _bounds(bounds: object, where: str) -> tuple[float, float] | None:
    if bounds is None:
        return None
    items = _seq(bounds, f"{where}: bounds")
    if len(items) != 2:
        raise InitlabError(f"{where}: bounds must be (low, high), got {bounds!r}")
    return _number(items[0], f"{where}: bounds"), _number(items[1], f"{where}: bounds")


def unregister_activation(name: str) -> None:
    """Remove a row added by :func:`register_activation` (built-in rows included: use with care)."""
    key = _ALIASES.get(_key(name), _key(name))
    if key not in _TABLE:
        raise unknown_choice("activation", name, list(_TABLE))
    _unregister(key)


def activation_names() -> list[str]:
    """Canonical names of the activation table (aliases excluded)."""
    return list(_TABLE)


def activation_row(name: str) -> ActivationRow:
    """The table row of ``name`` (aliases accepted); unknown names raise an error listing valid ones."""
    key = _key(name)
    key = _ALIASES.get(key, key)
    row = _TABLE.get(key)
    if row is None:
        raise unknown_choice("activation", name, list(_TABLE) + list(_ALIASES))
    return row


def _check_param(row: ActivationRow, param: float | None) -> float | None:
    if param is None:
        return row.param
    if row.param is None:
        raise InitlabError(f"activation {row.name!r} takes no parameter, got param={param!r}")
    try:
        value = float(param)
    except (TypeError, ValueError):
        raise InitlabError(f"activation parameter must be a number, got {param!r}") from None
    if not math.isfinite(value):
        raise InitlabError(f"activation parameter must be finite, got {param!r}")
    return value


def _from_row(row: ActivationRow, param: float | None) -> Activation:
    param = _check_param(row, param)
    return Activation(
        name=row.name, fn=row.bind(param), family=row.family, param=param,
        differentiable_at_0=row.differentiable_at_0,
        second_moment=row.second_moment(param) if row.second_moment else None,
        torch_gain=row.torch_gain(param) if row.torch_gain else None,
        kinks=row.kinks, homogeneous=row.homogeneous, derivative_from_output=row.derivative_from_output,
        zero_on_negative=row.zero_on_negative, bounds=row.bounds, auto=row.auto, suggest=row.suggest,
        kernels=row.kernels, row=row,
    )


def _matches(row: ActivationRow, get: Callable[[str, Any], Any]) -> bool:
    return all(get(key, default) == value for key, value, default in row.match)


def _pick(rows: list[ActivationRow], get: Callable[[str, Any], Any]) -> ActivationRow | None:
    """The most specific row whose ``match`` holds."""
    hits = [r for r in rows if _matches(r, get)]
    return max(hits, key=lambda r: len(r.match)) if hits else None


def _custom(fn: Callable[[Tensor], Tensor], name: str | None = None, **facts: Any) -> Activation:
    name = name or getattr(fn, "__name__", None) or type(fn).__name__
    return Activation(name=name, fn=fn, family=facts.pop("family", "smooth"), custom=True, **facts)


def _module_rows(m: nn.Module) -> list[ActivationRow] | None:
    for cls in type(m).__mro__:
        if cls in _BY_MODULE:
            return _BY_MODULE[cls]
    return None


def is_activation_module(m: nn.Module) -> bool:
    """True when ``m`` is an instance of a class the table knows, the :class:`Elementwise`
    wrapper that :meth:`Activation.module` builds for a row without a module of its own, or
    ``nn.GLU`` (:func:`glu_activation`)."""
    return isinstance(m, (Elementwise, nn.GLU)) or _module_rows(m) is not None


def _sigmoid_sq_mean() -> float:
    """E[sigmoid(z)^2], z ~ N(0, 1), by composite Simpson quadrature on [-12, 12] (4001 nodes;
    the tails beyond contribute < 1e-30 resp. are bounded by P(z > 12) < 2e-33)."""
    z = torch.linspace(-12.0, 12.0, 4001, dtype=torch.float64)
    f = torch.sigmoid(z) ** 2 * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    w = torch.ones_like(z)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return float((w * f).sum() * (z[1] - z[0]) / 3.0)


#: E[sigmoid(z)^2] = 0.29338 (quadrature), the GLU's output second moment at unit input variance
GLU_SECOND_MOMENT = _sigmoid_sq_mean()


def _glu_surrogate(x: Tensor) -> Tensor:
    """The elementwise stand-in of GLU for elementwise callers (theory, probe): sqrt(E[sigmoid(z)^2]) x,
    the same second moment at q = 1 (the true one is q E[sigmoid(sqrt(q) z)^2])."""
    return x * math.sqrt(GLU_SECOND_MOMENT)


def glu_activation() -> Activation:
    """``nn.GLU`` (Dauphin et al. 2017): GLU(x) = a * sigmoid(b), (a, b) the two halves of x along
    ``dim``, so it halves the width. For halves with independent N(0, q) entries,
    E[GLU^2] = E[a^2] E[sigmoid(b)^2] = q E[sigmoid(sqrt(q) z)^2]; at q = 1 that is
    E[sigmoid(z)^2] = 0.2934 by quadrature (:data:`GLU_SECOND_MOMENT`), so the second-moment gain
    is 1/sqrt(0.2934) = 1.846. Fans need no correction: the layer feeding a GLU has fan_out = 2x
    the GLU's width and its weight variance is set by its own fan_in; the next layer's fan_in is
    the halved width (its ``in_features``). Not a table row (it is not elementwise): ``fn`` is
    the linear stand-in with the same second moment at q = 1, exact for ``auto``'s recursion at
    q* = 1, approximate for theory predictions at other q."""
    return Activation(name="glu", fn=_glu_surrogate, family="smooth", second_moment=GLU_SECOND_MOMENT,
                      differentiable_at_0=True)


def _from_module(m: nn.Module) -> Activation:
    if isinstance(m, Elementwise):
        return m.act
    if isinstance(m, nn.GLU):
        return glu_activation()
    rows = _module_rows(m)
    if rows is None:
        return _custom(m, type(m).__name__)
    row = _pick(rows, lambda key, default: getattr(m, key, default))
    if row is not None:
        return _from_row(row, row.param_of(m))
    # a known class with non-default settings (Softplus(beta=2), Hardtanh(-2, 2)): integrate it
    base = rows[0]
    settings = ", ".join(f"{key}={getattr(m, key, default)}" for key, _, default in base.match)
    facts: dict[str, Any] = {}
    lo, hi = getattr(m, "min_val", None), getattr(m, "max_val", None)
    if base.bounds is not None and isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo < hi:
        facts = {"family": "saturating", "bounds": (float(lo), float(hi))}
    return _custom(m, f"{base.name}({settings})", **facts)


def row_of_function(fn: object) -> ActivationRow | None:
    """The row a torch function (``torch.relu``, ``F.gelu``...) computes with default keywords."""
    try:
        rows = _BY_FUNCTION.get(fn)
    except TypeError:  # unhashable
        return None
    return None if rows is None else _pick(rows, lambda key, default: default)


def activation_functions() -> list[Callable[..., Any]]:
    """Every function the table recognises in a traced graph (``torch.relu``, ``F.gelu``, a
    registered user function...)."""
    return list(_BY_FUNCTION)


def row_of_method(name: object) -> ActivationRow | None:
    """The row a Tensor method name (``"relu"``, ``"sigmoid_"``...) computes, or None."""
    return _BY_METHOD.get(name) if isinstance(name, str) else None


def activation_of_call(fn: object, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Activation, str] | None:
    """The activation computed by the call ``fn(x, *args, **kwargs)`` found in a traced graph,
    with a note when its parameter is not a constant (the default is used then); None when
    ``fn`` is not a table function. ``args`` excludes the input ``x``."""
    try:
        rows = _BY_FUNCTION.get(fn)
    except TypeError:
        return None
    if rows is None:
        return None
    row = _pick(rows, lambda key, default: kwargs.get(key, default))
    note = ""
    if row is None:  # e.g. F.softplus(x, beta=2): the table has no row for these settings
        row = min(rows, key=lambda r: len(r.match))
        note = f"{getattr(fn, '__name__', fn)} with {dict(kwargs)} is not in the table; treated as {row.name}"
    if row.param_name is None:
        return _from_row(row, None), note
    raw = args[0] if args else kwargs.get(row.param_name)
    if raw is None:
        return _from_row(row, None), ""
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return _from_row(row, float(raw)), ""
    return _from_row(row, None), f"activation parameter is not a constant ({raw}); used the default {row.param}"


def resolve_activation(activation: object, param: float | None = None) -> Activation:
    """Turn a name, an ``nn.Module`` instance or class, or any callable into an :class:`Activation`.

    ``param`` is the slope of leaky_relu/prelu or the alpha of elu/celu (None: the default).
    ``None`` means no activation (identity). Unknown names raise an error listing valid names.
    """
    if isinstance(activation, Activation):
        return activation
    if activation is None:
        return _from_row(_TABLE[IDENTITY], None)
    if isinstance(activation, str):
        if _key(activation) == "glu" and "glu" not in _TABLE:
            return glu_activation()
        return _from_row(activation_row(activation), param)
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        try:
            activation = activation()
        except TypeError as e:
            raise InitlabError(f"cannot instantiate activation class {activation.__name__} without arguments; "
                               "pass an instance") from e
    if isinstance(activation, nn.Module):
        act = _from_module(activation)
        if param is not None and act.row is not None:
            act = _from_row(act.row, param)
        return act
    row = row_of_function(activation)
    if row is not None:
        return _from_row(row, param)
    if callable(activation):
        return _custom(activation)
    raise InitlabError(
        f"activation must be a name, an nn.Module, or a callable on tensors, got {type(activation).__name__}: "
        f"{activation!r}. Valid names: {', '.join(_TABLE)}"
    )


# --------------------------------------------------------------------------------------------
# the built-in rows


def _const(v: float) -> Callable[[float | None], float]:
    return lambda _p: v


def _leaky_second_moment(a: float | None) -> float:
    return (1.0 + float(a) ** 2) / 2.0  # type: ignore[arg-type]


def _leaky_torch_gain(a: float | None) -> float:
    return math.sqrt(2.0 / (1.0 + float(a) ** 2))  # type: ignore[arg-type]


def _prelu_slope(m: nn.Module) -> float:
    w = m.weight  # type: ignore[union-attr]
    return 0.25 if w.is_meta else float(w.detach().float().mean())


def _rrelu_slope(m: nn.Module) -> float:
    return (float(m.lower) + float(m.upper)) / 2.0  # type: ignore[arg-type]


def _quick_gelu(x: Tensor) -> Tensor:
    """QuickGELU: x sigmoid(1.702 x) (Radford et al. 2021, CLIP)."""
    return x * torch.sigmoid(1.702 * x)


class QuickGELU(nn.Module):
    """QuickGELU as a module: x sigmoid(1.702 x) (Radford et al. 2021)."""

    def forward(self, x: Tensor) -> Tensor:
        return _quick_gelu(x)


def _copy(z: Tensor, out: Tensor, _p: float | None) -> None:
    out.copy_(z)


def _pass(g: Tensor, z: Tensor, h: Tensor, _p: float | None) -> None:
    return None


_K_IDENTITY = Kernels(_copy, _pass)
_K_SIGMOID = Kernels(lambda z, out, p: torch.sigmoid(z, out=out),
                     lambda g, z, h, p: torch.ops.aten.sigmoid_backward.grad_input(g, h, grad_input=g))
_K_TANH = Kernels(lambda z, out, p: torch.tanh(z, out=out),
                  lambda g, z, h, p: torch.ops.aten.tanh_backward.grad_input(g, h, grad_input=g))
_K_RELU = Kernels(lambda z, out, p: torch.clamp_min(z, 0, out=out),
                  lambda g, z, h, p: torch.ops.aten.threshold_backward.grad_input(g, h, 0, grad_input=g))
_K_LEAKY = Kernels(lambda z, out, p: torch.ops.aten.leaky_relu.out(z, p, out=out),
                   lambda g, z, h, p: torch.ops.aten.leaky_relu_backward.grad_input(g, z, p, False, grad_input=g))

_SATURATING_SUGGESTION = "xavier_normal or lecun_normal"
_RELU_FAMILY = dict(family="relu", differentiable_at_0=False, auto="second_moment", suggest="he_normal")

for _row in (
    ActivationRow(IDENTITY, lambda x: x, family="linear", aliases=("linear", "none"), modules=(nn.Identity,),
                  second_moment=_const(1.0), torch_gain=_const(1.0), homogeneous=True, auto="lecun",
                  suggest="lecun_normal or xavier_normal", kernels=_K_IDENTITY),
    ActivationRow("sigmoid", torch.sigmoid, family="saturating", aliases=("logistic",), modules=(nn.Sigmoid,),
                  functions=(torch.sigmoid, F.sigmoid), methods=("sigmoid", "sigmoid_"), torch_gain=_const(1.0),
                  derivative_from_output=lambda y: (1.0 - y) * y, bounds=(0.0, 1.0), auto="kumar",
                  suggest="xavier_normal or kumar", kernels=_K_SIGMOID),
    ActivationRow("tanh", torch.tanh, family="saturating", modules=(nn.Tanh,), functions=(torch.tanh, F.tanh),
                  methods=("tanh", "tanh_"), torch_gain=_const(5.0 / 3.0), derivative_from_output=lambda y: 1.0 - y * y,
                  bounds=(-1.0, 1.0), auto="lecun", suggest=_SATURATING_SUGGESTION, kernels=_K_TANH),
    ActivationRow("relu", torch.relu, modules=(nn.ReLU,), functions=(torch.relu, F.relu, F.relu_, torch.relu_),
                  methods=("relu", "relu_"), second_moment=_const(0.5), torch_gain=_const(math.sqrt(2.0)),
                  homogeneous=True, zero_on_negative=True, kernels=_K_RELU, **_RELU_FAMILY),
    ActivationRow("leaky_relu", lambda x, a: F.leaky_relu(x, a), param=0.01, param_name="negative_slope",
                  aliases=("leakyrelu", "lrelu"), modules=(nn.LeakyReLU,), functions=(F.leaky_relu,),
                  second_moment=_leaky_second_moment, torch_gain=_leaky_torch_gain, homogeneous=True,
                  kernels=_K_LEAKY, **_RELU_FAMILY),
    ActivationRow("prelu", lambda x, a: F.leaky_relu(x, a), param=0.25, modules=(nn.PReLU,),
                  module=lambda a: nn.PReLU(init=float(a)), read_param=_prelu_slope,  # type: ignore[arg-type]
                  second_moment=_leaky_second_moment, torch_gain=_leaky_torch_gain, homogeneous=True,
                  kernels=_K_LEAKY, **_RELU_FAMILY),
    ActivationRow("elu", lambda x, a: F.elu(x, a), param=1.0, param_name="alpha", modules=(nn.ELU,),
                  functions=(F.elu,)),
    ActivationRow("selu", F.selu, family="selu", modules=(nn.SELU,), functions=(F.selu, torch.selu),
                  differentiable_at_0=False, torch_gain=_const(0.75), auto="lecun", suggest="lecun_normal"),
    ActivationRow("celu", lambda x, a: F.celu(x, a), param=1.0, param_name="alpha", modules=(nn.CELU,),
                  functions=(F.celu,)),
    ActivationRow("gelu", F.gelu, modules=(nn.GELU,), functions=(F.gelu,)),
    ActivationRow("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), aliases=("gelu_approx",), modules=(nn.GELU,),
                  match=(("approximate", "tanh", "none"),), module=lambda p: nn.GELU(approximate="tanh"),
                  functions=(F.gelu,)),
    ActivationRow("silu", F.silu, aliases=("swish",), modules=(nn.SiLU,), functions=(F.silu,)),
    ActivationRow("mish", F.mish, modules=(nn.Mish,), functions=(F.mish,)),
    ActivationRow("softplus", F.softplus, modules=(nn.Softplus,), match=(("beta", 1, 1),), functions=(F.softplus,)),
    ActivationRow("softsign", F.softsign, family="saturating", modules=(nn.Softsign,), functions=(F.softsign,),
                  bounds=(-1.0, 1.0), auto="kumar", suggest=_SATURATING_SUGGESTION),
    # E[hardtanh(z)^2] = E[z^2; |z|<1] + P(|z|>1) = 1 - 2*pdf(1)
    ActivationRow("hardtanh", F.hardtanh, family="saturating", modules=(nn.Hardtanh,),
                  match=(("min_val", -1.0, -1.0), ("max_val", 1.0, 1.0)), functions=(F.hardtanh,),
                  second_moment=_const(1.0 - 2.0 * math.exp(-0.5) / math.sqrt(2.0 * math.pi)), kinks=(-1.0, 1.0),
                  bounds=(-1.0, 1.0), auto="kumar", suggest=_SATURATING_SUGGESTION),
    ActivationRow("relu6", F.relu6, modules=(nn.ReLU6,), functions=(F.relu6,), kinks=(6.0,), zero_on_negative=True,
                  **_RELU_FAMILY),
    ActivationRow("hardswish", F.hardswish, modules=(nn.Hardswish,), functions=(F.hardswish,), kinks=(-3.0, 3.0)),
    # QuickGELU, x sigmoid(1.702 x): CLIP's GELU approximation (Radford et al. 2021)
    ActivationRow("quick_gelu", _quick_gelu, aliases=("quickgelu",), modules=(QuickGELU,)),
    ActivationRow("hardsigmoid", F.hardsigmoid, family="saturating", modules=(nn.Hardsigmoid,),
                  functions=(F.hardsigmoid,), kinks=(-3.0, 3.0), bounds=(0.0, 1.0), auto="kumar",
                  suggest=_SATURATING_SUGGESTION),
    # RReLU (Xu et al. 2015) in eval mode: leaky ReLU with slope (lower + upper) / 2
    ActivationRow("rrelu", lambda x, a: F.leaky_relu(x, a), param=(1.0 / 8.0 + 1.0 / 3.0) / 2.0, modules=(nn.RReLU,),
                  module=lambda a: nn.RReLU(float(a), float(a)), read_param=_rrelu_slope,  # type: ignore[arg-type]
                  second_moment=_leaky_second_moment, torch_gain=_leaky_torch_gain, homogeneous=True,
                  kernels=_K_LEAKY, **_RELU_FAMILY),
):
    _add(_row)
del _row
