"""Named initialisation schemes: a string registry usable from configs, each a one-liner.

Every fan-based scheme is a specialisation of :func:`initlab.variance_scaling_` (JAX style):
``Var[W] = scale / n`` with ``n`` picked by ``mode``, drawn from ``distribution``; the
realised variance is ``scale / n`` for every distribution (see ``initlab._engine``). The
xavier/he/lecun presets take ``distribution=`` (normal, truncated_normal, uniform) with the same
variance; docs/names.md compares every name with torch, Keras, JAX and timm.

==================== ======================================== =========================================
name                 Var[W] (default parameters)              reference
==================== ======================================== =========================================
normal               std^2 = 1 (no fan scaling)               the naive baseline
xavier_normal        2 gain^2 / (fan_in + fan_out), normal    Glorot & Bengio (2010)
xavier_uniform       2 gain^2 / (fan_in + fan_out), uniform   Glorot & Bengio (2010)
xavier_caffe         gain^2 / fan_in, uniform                 Caffe's XavierFiller (Jia et al. 2014)
he_normal            g^2 / fan_in, g = gain(activation)       He et al. (2015)
he_uniform           g^2 / fan_in, uniform                    He et al. (2015)
lecun_normal         1 / fan_in, normal                       LeCun et al. (1998); Klambauer et al. (2017)
lecun_uniform        1 / fan_in, uniform                      LeCun et al. (1998)
kumar                g^2 / fan_in, g = Kumar's gain           Kumar (2017)
kaiming_normal       calculate_gain(nl, a)^2 / fan, normal    ``torch.nn.init.kaiming_normal_`` (uniform: kaiming_uniform)
torch_default        1 / (3 fan_in), uniform; per module type PyTorch's own default (Embedding N(0,1), ...)
tf1_variance_scaling 1.3 * 0.77374 * factor / n, trunc normal TensorFlow 1 contrib initializer
orthogonal           gain^2 / max(rows, cols)                 Saxe et al. (2014); Mezzadri (2007)
delta_orthogonal     gain^2 / max(fan_in, fan_out)            Xiao et al. (2018)
identity (dirac)     identity / Dirac delta                   ``torch.nn.init.eye_`` / ``dirac_``
zeros                0
auto                 per layer, chosen by ``initlab.init_model``
==================== ======================================== =========================================

``get_scheme(name, **params)`` returns a :class:`Scheme`: call it on a tensor
(``scheme(w, fans=..., generator=...)``), read its ``name``/``params`` and its
``target_std(fans)``. ``register_scheme(name, factory)`` adds your own.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ._activations import Activation
from ._engine import (TRUNC_VAR, _check_fans, _check_generator, _check_tensor, _sample_, _sample_scaled_,
                      check_distribution, check_gain, check_mode, check_scale, check_std, is_number, planned_std,
                      target_std, variance_scaling_)
from ._errors import InitlabError, one_line_usage_errors, unknown_choice
from ._fans import fans as _fans
from ._fans import shape_of
from ._gains import gain as _gain
from ._layers import fan_rule
from ._lsuv import check_lsuv_args, run_lsuv
from ._orthogonal import delta_orthogonal_, identity_, orthogonal_

__all__ = [
    "Scheme", "get_scheme", "schemes", "register_scheme", "scheme_descriptions", "register_cli",
    "normal_", "xavier_normal_", "xavier_uniform_", "he_normal_", "he_uniform_", "lecun_normal_",
    "lecun_uniform_", "kumar_", "orthogonal_", "delta_orthogonal_", "identity_", "TF1_REALISED_FACTOR",
    "LayerChoice", "LEVELS", "scheme_parameters",
]

#: ``"tensor"``: the scheme initialises one tensor, ``scheme(w)``; ``"model"``: it needs the whole
#: model (it chooses per layer, or fits on data) and only ``init_model`` applies it
LEVELS = ("tensor", "model")

TF1_REALISED_FACTOR = 1.3 * TRUNC_VAR
"""TF1's truncated normal realises Var = 1.3 * 0.7737413 * factor / n = 1.0058637 * factor / n."""

Fans = tuple[float, float]
_Init = Callable[[Tensor, "Fans | None", "torch.Generator | None"], Tensor]
_Std = Callable[[float, float, "tuple[int, ...] | None"], "float | None"]


# --------------------------------------------------------------------------------------------
# the Scheme object

@dataclass(frozen=True, eq=False)
class Scheme:
    """A configured initialisation scheme: ``scheme(tensor, *, fans=None, generator=None)``.

    Attributes:
        name: registry name (``"he_normal"``).
        params: the parameters it was built with, defaults included.
        description: one line with the formula and the paper.
        scale, mode, distribution: the engine's arguments for variance-scaling schemes
            (``Var[W] = scale / n``), None for the others.
        level: ``"tensor"`` (callable on a tensor) or ``"model"`` (``init_model`` only; calling
            it on a tensor raises an error that says so).
        needs_batch: the scheme fits the weights on a batch of data (``init_model(..., batch=x)``).
        for_layer: for a model-level scheme, ``for_layer(act)`` gives the :class:`LayerChoice` for
            a weight layer followed by activation ``act`` (None: a readout).
        fit: for a data-dependent scheme, ``fit(model, batch, generator)`` runs after the per-layer
            initialisation; it returns a result with ``row_updates()`` for ``init_model``'s report.
        for_module: ``for_module(module, param_name)`` gives the scheme to use for that parameter of
            that module (None: this scheme itself); ``init_model`` asks it for every weight.
            ``torch_default`` uses it to follow PyTorch's own per-module-type default.
        check: for a scheme that cannot fail once its checks pass (the variance-scaling engine),
            ``check(tensor, fans, generator)`` raises what calling the scheme on that tensor would
            raise, without writing. ``init_model`` runs every check before its first write and then
            keeps no copy of the weights (it holds Ctrl-C back instead); the tensors of any other
            scheme are copied first, so that a failure part-way can be undone.
        write: for a scheme with ``check``, ``write(tensor, checked)`` writes what calling the scheme
            writes, from what ``check`` returned for that tensor (``init_model`` then checks once).
    """

    name: str
    init: _Init = field(repr=False)
    std: _Std | None = field(default=None, repr=False)
    params: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    scale: float | None = None
    mode: str | None = None
    distribution: str | None = None
    level: str = "tensor"
    needs_batch: bool = False
    for_layer: Callable[[Activation | None], LayerChoice] | None = field(default=None, repr=False)
    fit: Callable[..., Any] | None = field(default=None, repr=False)
    check: Callable[[Tensor, "Fans | None", "torch.Generator | None"], Any] | None = field(default=None, repr=False)
    for_module: Callable[[nn.Module, str], "Scheme | None"] | None = field(default=None, repr=False)
    write: Callable[[Tensor, Any], Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise unknown_choice("scheme level", self.level, LEVELS)

    def __call__(self, tensor: Tensor, *, fans: Fans | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Initialise ``tensor`` in place and return it. ``fans`` overrides the shape-based
        ``(fan_in, fan_out)`` (pass ``initlab.fans(w, module=layer)`` for module-aware fans)."""
        if not isinstance(tensor, Tensor):
            raise InitlabError(f"scheme {self.name!r} initialises a torch.Tensor in place, got {type(tensor).__name__}: "
                               f"{tensor!r:.80}")
        _check_generator(generator, tensor)
        if fans is not None:
            _check_fans(fans)
        return self.init(tensor, fans, generator)

    def target_std(self, fans: Fans | None = None, *, tensor: Tensor | None = None,
                   shape: Sequence[int] | None = None) -> float | None:
        """The std this scheme realises for a layer with these ``(fan_in, fan_out)`` (or the
        fans of ``tensor`` / ``shape``); None where it does not depend on fans alone."""
        if self.std is None:
            return None
        src = tensor if tensor is not None else shape
        shp = shape_of(src) if src is not None else None
        if fans is None:
            if shp is None:
                raise InitlabError("target_std needs fans=(fan_in, fan_out), tensor= or shape=")
            try:
                fans = _fans(shp)
            except InitlabError:
                fans = (0.0, 0.0)
        fi, fo = _check_fans(fans)
        return self.std(fi, fo, shp)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"Scheme({self.name!r}{', ' if args else ''}{args})"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable through the registry
        return (_rebuild, (self.name, dict(self.params)))


@dataclass(frozen=True)
class LayerChoice:
    """What a scheme does to one weight layer: the tensor-level ``scheme`` applied to its weight,
    the ``label`` shown in ``init_model``'s report and the ``gain`` it used (None: no gain)."""

    scheme: Scheme
    label: str
    gain: float | None = None


def _rebuild(name: str, params: dict[str, Any]) -> Scheme:
    return get_scheme(name, **params)


def _vs(scale: float, mode: str, distribution: str) -> Scheme:
    """A variance-scaling scheme: ``variance_scaling_(t, scale, mode, distribution)``."""
    scale, mode, distribution = check_scale(scale), check_mode(mode), check_distribution(distribution)
    return Scheme(
        name="variance_scaling",
        init=lambda t, f, g: variance_scaling_(t, scale, mode, distribution, generator=g, fans=f),
        std=lambda fi, fo, shp: target_std(scale, mode, (fi, fo)),
        scale=scale, mode=mode, distribution=distribution,
        check=lambda t, f, g: planned_std(t, scale, mode, distribution, generator=g, fans=f),
        write=_write_planned,
    )


def _write_planned(t: Tensor, planned: tuple[float | None, str, torch.Generator | None]) -> Tensor:
    """``variance_scaling_``'s write from what :func:`planned_std` returned for ``t``."""
    std, distribution, gen = planned
    return t if std is None else _sample_scaled_(t, std, distribution, gen)


def _plain(init: _Init, std: _Std | None) -> Scheme:
    return Scheme(name="custom", init=init, std=std)


# --------------------------------------------------------------------------------------------
# in-place functions

def _check_mean(mean: object) -> None:
    if not is_number(mean) or isinstance(mean, Tensor) or not math.isfinite(mean):  # type: ignore[arg-type]
        raise InitlabError(f"mean must be a finite number, got {mean!r}")


def normal_(tensor: Tensor, std: float = 1.0, *, mean: float = 0.0,
            generator: torch.Generator | None = None) -> Tensor:
    """N(mean, std^2), no fan scaling (the naive baseline of the classic MNIST study: with
    std = 1 a sigmoid network saturates). Any shape, biases included. Note the argument order
    differs from ``torch.nn.init.normal_(tensor, mean, std)``: ``std`` comes first here."""
    _check_tensor(tensor, "normal_")
    std = check_scale(std, "std")
    _check_mean(mean)
    gen = _check_generator(generator, tensor)
    check_std(std, tensor.dtype, "normal", mean=float(mean))
    _sample_(tensor, "normal", std, gen)
    if mean and not tensor.is_meta:
        with torch.no_grad():
            tensor.add_(mean)
    return tensor


def xavier_normal_(tensor: Tensor, gain: float = 1.0, *, generator: torch.Generator | None = None,
                   fans: Fans | None = None) -> Tensor:
    """Glorot & Bengio (2010): N(0, 2 gain^2 / (fan_in + fan_out)); realised variance as stated."""
    return variance_scaling_(tensor, check_gain(gain) ** 2, "fan_avg", "normal", generator=generator, fans=fans)


def xavier_uniform_(tensor: Tensor, gain: float = 1.0, *, generator: torch.Generator | None = None,
                    fans: Fans | None = None) -> Tensor:
    """Glorot & Bengio (2010): U(-a, a), a = gain sqrt(6 / (fan_in + fan_out)); Var = 2 gain^2 / (fan_in + fan_out)."""
    return variance_scaling_(tensor, check_gain(gain) ** 2, "fan_avg", "uniform", generator=generator, fans=fans)


def he_normal_(tensor: Tensor, activation: object = "relu", param: float | None = None, *, mode: str = "fan_in",
               distribution: str = "normal", generator: torch.Generator | None = None,
               fans: Fans | None = None) -> Tensor:
    """He et al. (2015): Var = g^2 / fan with g = ``gain(activation, param)`` (second moment):
    2 / fan_in for ReLU, 2 / ((1 + a^2) fan_in) for leaky ReLU / PReLU with slope a."""
    g = _gain(activation, param)
    return variance_scaling_(tensor, g * g, mode, distribution, generator=generator, fans=fans)


def he_uniform_(tensor: Tensor, activation: object = "relu", param: float | None = None, *, mode: str = "fan_in",
                generator: torch.Generator | None = None, fans: Fans | None = None) -> Tensor:
    """He et al. (2015), uniform: U(-a, a), a = g sqrt(3 / fan); Var = g^2 / fan."""
    return he_normal_(tensor, activation, param, mode=mode, distribution="uniform", generator=generator, fans=fans)


def lecun_normal_(tensor: Tensor, *, distribution: str = "normal", generator: torch.Generator | None = None,
                  fans: Fans | None = None) -> Tensor:
    """LeCun et al. (1998): Var = 1 / fan_in (SELU's choice, Klambauer et al. 2017)."""
    return variance_scaling_(tensor, 1.0, "fan_in", distribution, generator=generator, fans=fans)


def lecun_uniform_(tensor: Tensor, *, generator: torch.Generator | None = None,
                   fans: Fans | None = None) -> Tensor:
    """LeCun et al. (1998), uniform: U(-sqrt(3 / fan_in), sqrt(3 / fan_in)); Var = 1 / fan_in."""
    return variance_scaling_(tensor, 1.0, "fan_in", "uniform", generator=generator, fans=fans)


def kumar_(tensor: Tensor, activation: object = "sigmoid", param: float | None = None, *, mode: str = "fan_in",
           distribution: str = "normal", generator: torch.Generator | None = None,
           fans: Fans | None = None) -> Tensor:
    """Kumar (2017): Var = 1 / (fan phi'(0)^2 (1 + phi(0)^2)); sigmoid: 12.8 / fan_in, tanh: 1 / fan_in.
    Activations not differentiable at 0 (ReLU family) raise: use :func:`he_normal_`."""
    g = _gain(activation, param, method="kumar")
    return variance_scaling_(tensor, g * g, mode, distribution, generator=generator, fans=fans)


def _ortho_std(gain: float) -> _Std:
    def std(fi: float, fo: float, shp: tuple[int, ...] | None) -> float | None:
        if shp is not None and len(shp) >= 2:
            rows = shp[0]
            cols = math.prod(shp[1:])
            return gain / math.sqrt(max(rows, cols, 1))
        return gain / math.sqrt(max(fi, fo)) if max(fi, fo) > 0 else None
    return std


def _delta_std(gain: float) -> _Std:
    def std(fi: float, fo: float, shp: tuple[int, ...] | None) -> float | None:
        if shp is not None and len(shp) >= 2:
            fi, fo = _fans(shp)
        return gain / math.sqrt(max(fi, fo)) if max(fi, fo) > 0 else None
    return std


def _identity_std(gain: float) -> _Std:
    def std(fi: float, fo: float, shp: tuple[int, ...] | None) -> float | None:
        if shp is not None and len(shp) >= 2:
            fi, fo = _fans(shp)
        n = max(fi, fo)
        if n <= 0:
            return None
        p = 1.0 / n  # fraction of entries equal to gain
        return gain * math.sqrt(p * (1.0 - p))
    return std


# --------------------------------------------------------------------------------------------
# model-level schemes: ``auto`` chooses per layer, ``lsuv`` also fits on a batch

class _AutoRule:
    """``auto``'s per-layer rule, exact at every depth (the variance recursion of
    :mod:`initlab.theory`; Poole et al. 2016, Schoenholz et al. 2017).

    Each layer's weight variance keeps the second moment of its pre-activations at the target
    q* = 1: Var[W_l] = q* / (n_l E[x_l^2]), with x_l the layer's input. ``for_link(link, q0)``
    reads the input from the graph (``LayerLink.fed``): the model's input, E[x^2] = q0 (1, or
    measured on ``init_model(..., batch=x)``); the output of activation phi applied to
    pre-activations at q*, E[phi(h)^2] by quadrature at q* (= 1 / g^2 for the second-moment gain
    g, so a layer fed by ReLU gets sqrt(2), by tanh 1/sqrt(E[tanh(z)^2]) = 1.59, by sigmoid 1.85);
    anything else (a norm, a residual sum, an embedding's indices): E[x^2] = 1, LeCun.

    The label stays that of the activation that *follows* the layer (``he_*`` for the ReLU
    family and smooth activations, ``lecun_*`` for tanh/SELU/readouts, ``kumar`` for sigmoid-like
    rows); the gain is the recursion's. ``__call__(act)`` is the label's old fixed-gain rule
    (Var = g(phi)^2 / n, phi the following activation), kept for callers without a graph, and
    what ``auto`` does with ``exact=False`` (``init_model(model, "auto", exact=False)``).

    ``calibrate`` (default True, with ``exact``): after the draw, one forward pass rescales each
    layer so that its measured pre-activation second moment is q* (:mod:`initlab._calibrate`:
    the recursion is exact at infinite width; the correction removes the finite-width drift).
    """

    def __init__(self, distribution: str, mode: str, exact: bool = True, calibrate: bool = True) -> None:
        self.distribution, self.mode = distribution, mode
        self.calibrate = bool(exact and calibrate)
        if not exact:  # init_model then uses __call__ (the fixed-gain rule) per following activation
            self.for_link = None  # type: ignore[assignment]

    def _label(self, act: Activation | None) -> str:
        if act is None or act.auto == "lecun":
            return f"lecun_{self.distribution}"
        return "kumar" if act.auto == "kumar" else f"he_{self.distribution}"

    def __call__(self, act: Activation | None) -> LayerChoice:
        label = self._label(act)
        if act is None or act.auto == "lecun":
            return LayerChoice(_vs(1.0, self.mode, self.distribution), label, 1.0)
        g = float(_gain(act, method="kumar" if act.auto == "kumar" else "second_moment"))
        return LayerChoice(_vs(g * g, self.mode, self.distribution), label, g)

    def for_link(self, link: Any, input_sq_mean: float = 1.0) -> LayerChoice:
        """The choice for the layer of ``link`` (a :class:`initlab.LayerLink`; None: a readout fed
        by something unknown), whose model input has second moment ``input_sq_mean``."""
        act = getattr(link, "activation", None)
        fed, fed_by = getattr(link, "fed", "other"), getattr(link, "fed_by", None)
        if isinstance(getattr(link, "module", None), (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            fed = "other"  # its input is indices: Var[W] is the output's second moment
        sq = 1.0
        if fed == "input":
            sq = float(input_sq_mean)
        elif fed == "activation" and fed_by is not None and not fed_by.is_identity:
            sq = 1.0 / float(_gain(fed_by, method="second_moment")) ** 2  # E[phi(z)^2], z ~ N(0, q* = 1)
        g = math.sqrt(1.0 / sq)
        return LayerChoice(_vs(g * g, self.mode, self.distribution), self._label(act), g)


def _auto_rule(distribution: str, mode: str, exact: bool = True, calibrate: bool = True) -> _AutoRule:
    """``auto``'s rule (see :class:`_AutoRule`)."""
    return _AutoRule(distribution, mode, exact, calibrate)


def _auto(distribution: str = "normal", mode: str = "fan_in", exact: bool = True, calibrate: bool = True) -> Scheme:
    distribution, mode = check_distribution(distribution), check_mode(mode)
    for what, v in (("exact", exact), ("calibrate", calibrate)):
        if not isinstance(v, bool):
            raise InitlabError(f"auto: {what} must be True or False, got {v!r}")

    def init(t: Tensor, f: Fans | None, g: torch.Generator | None) -> Tensor:
        raise InitlabError(
            "scheme 'auto' chooses a scheme per layer from the activation that consumes the layer's output, "
            "so it needs the whole model: use initlab.init_model(model, 'auto'). For a single tensor pick a "
            "scheme yourself, e.g. get_scheme('he_normal', activation='relu')")
    return Scheme(name="auto", init=init, level="model", for_layer=_auto_rule(distribution, mode, exact, calibrate))


def _lsuv(tol: float = 0.1, max_iter: int = 10, target_var: float = 1.0, center: bool = False) -> Scheme:
    check_lsuv_args(tol, max_iter, target_var)

    def init(t: Tensor, f: Fans | None, g: torch.Generator | None) -> Tensor:
        raise InitlabError(
            "scheme 'lsuv' rescales each layer on a batch of data, so it needs the model and a batch: "
            "use initlab.init_model(model, 'lsuv', batch=x) or initlab.lsuv_(model, x)")

    def fit(model: Any, batch: Any, generator: torch.Generator | None) -> Any:
        return run_lsuv(model, batch, tol=tol, max_iter=max_iter, target_var=target_var, center=center,
                        generator=generator, undo=False)  # init_model keeps the copies and rolls back
    # the layers LSUV does not cover (Embedding, Bilinear, MultiheadAttention in_proj) keep auto's choice
    return Scheme(name="lsuv", init=init, level="model", needs_batch=True,
                  for_layer=_auto_rule("normal", "fan_in"), fit=fit)


# --------------------------------------------------------------------------------------------
# the registry

@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., Any]
    description: str


_REGISTRY: dict[str, _Entry] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_scheme(name: str, factory: Callable[..., Any], description: str = "", *,
                    aliases: Sequence[str] = (), overwrite: bool = False) -> None:
    """Add a scheme to the registry.

    ``factory(**params)`` returns a :class:`Scheme` (e.g. ``lambda k=1.0: get_scheme(
    "lecun_normal")``), or any callable ``f(tensor, *, fans=None, generator=None) -> tensor``,
    which is wrapped. ``description`` is the one line shown by ``initlab schemes``.
    """
    if not isinstance(name, str) or not name.strip():
        raise InitlabError(f"a scheme name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise InitlabError(f"factory for scheme {name!r} must be callable, got {type(factory).__name__}")
    if not isinstance(description, str):
        raise InitlabError(f"description of scheme {name!r} must be a string, got {type(description).__name__}")
    if not isinstance(overwrite, bool):
        raise InitlabError(f"overwrite must be True or False, got {overwrite!r}")
    if isinstance(aliases, str):
        aliases = (aliases,)
    if not isinstance(aliases, (tuple, list)) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise InitlabError(f"aliases of scheme {name!r} must be a list of non-empty names, got {aliases!r}")
    key = _key(name)
    names = [key, *(_key(a) for a in aliases)]
    if len(set(names)) != len(names):
        raise InitlabError(f"scheme {key!r}: its name and aliases repeat a name: {names}")
    for n in names:  # every check before the registry changes; another scheme's name or alias is never taken over
        owner = n if n in _REGISTRY else _ALIASES.get(n)
        if owner is not None and not (overwrite and owner == key):
            if owner == n == key:
                raise InitlabError(f"scheme {key!r} is already registered; pass overwrite=True to replace it")
            raise InitlabError(f"scheme name {n!r} is already registered (by scheme {owner!r}); pick another name")
    for a in [a for a, k in _ALIASES.items() if k == key]:
        del _ALIASES[a]
    _REGISTRY[key] = _Entry(factory, description)
    for a in names[1:]:
        _ALIASES[a] = key


def schemes() -> list[str]:
    """Names of all registered schemes, in registration order (aliases excluded)."""
    return list(_REGISTRY)


def scheme_descriptions() -> list[tuple[str, str, str]]:
    """(name, parameters with defaults, description) for every registered scheme."""
    out = []
    for name, e in _REGISTRY.items():
        try:
            sig = inspect.signature(e.factory)
            params = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}"
                               for p in sig.parameters.values())
        except (TypeError, ValueError):
            params = "..."
        out.append((name, params, e.description))
    return out


def _entry(name: str) -> tuple[str, _Entry]:
    """(canonical name, registry entry) of a scheme name or alias; unknown names raise an error."""
    key = _key(name)
    key = _ALIASES.get(key, key)
    entry = _REGISTRY.get(key)
    if entry is None:
        raise unknown_choice("scheme", name, list(_REGISTRY) + list(_ALIASES))
    return key, entry


def scheme_parameters(name: str) -> tuple[str, ...] | None:
    """The names of a registered scheme's parameters (``("distribution", "mode")`` for ``auto``);
    None when its factory takes any keyword (``**kwargs``) or has no readable signature."""
    try:
        sig = inspect.signature(_entry(name)[1].factory)
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return tuple(p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _signature(factory: Callable[..., Any]) -> inspect.Signature | None:
    """``inspect.signature`` of a scheme factory (None where it has none), read once per hashable
    factory (~15 us a call, once per ``init_model``)."""
    try:
        return _cached_signature(factory)
    except TypeError:  # an unhashable callable
        return _read_signature(factory)


def _read_signature(factory: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):
        return None


_cached_signature = functools.lru_cache(maxsize=256)(_read_signature)


def get_scheme(name: str | Scheme, **params: Any) -> Scheme:
    """The scheme ``name`` configured with ``params`` (see ``initlab.schemes()``).

    Raises InitlabError for an unknown name (listing the valid names and the closest one) and
    for parameters the scheme does not take or rejects (naming them and the valid ones).
    """
    if isinstance(name, Scheme):
        if params:
            return get_scheme(name.name, **{**name.params, **params})
        return name
    if not isinstance(name, str):
        raise InitlabError(f"a scheme name must be a string, got {type(name).__name__}: {name!r}. "
                           f"Valid schemes: {', '.join(_REGISTRY)}")
    key, entry = _entry(name)
    sig = _signature(entry.factory)
    bound: dict[str, Any] = dict(params)
    if sig is not None:
        try:
            b = sig.bind(**params)
        except TypeError:
            accepted = [p.name for p in sig.parameters.values()
                        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            bad = sorted(set(params) - set(accepted))
            what = f"does not take {', '.join(map(repr, bad))}" if bad else "is missing a parameter"
            shown = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}"
                              for p in sig.parameters.values())
            raise InitlabError(f"scheme {key!r} {what}; its parameters: {shown or 'none'}") from None
        b.apply_defaults()
        bound = dict(b.arguments)
    try:
        made = entry.factory(**params)
    except InitlabError as e:
        raise InitlabError(f"scheme {key!r}: {e}") from e
    except Exception as e:  # noqa: BLE001 - a user factory's own error, in one line
        raise InitlabError(f"scheme {key!r}: its factory raised {type(e).__name__}: {e} "
                           f"(parameters {dict(params) or 'none'})") from e
    if isinstance(made, Scheme):
        return replace(made, name=key, params=bound, description=made.description or entry.description)
    if callable(made):
        fn = made
        return Scheme(name=key, init=lambda t, f, g: fn(t, fans=f, generator=g), params=bound,
                      description=entry.description)
    raise InitlabError(f"factory of scheme {key!r} returned {type(made).__name__}, not a Scheme or a callable")


# one line each over the engine
register_scheme("normal", lambda std=1.0, mean=0.0: _normal(std, mean),
                "N(mean, std^2) with no fan scaling (default N(0, 1): the naive baseline)")
register_scheme("xavier_normal", lambda gain=1.0, distribution="normal":
                _vs(check_gain(gain) ** 2, "fan_avg", distribution),
                "Glorot & Bengio (2010): N(0, 2 gain^2 / (fan_in + fan_out)) (plain normal; Keras/JAX/timm: "
                "truncated, same variance: distribution='truncated_normal')", aliases=("glorot_normal",))
register_scheme("xavier_uniform", lambda gain=1.0, distribution="uniform":
                _vs(check_gain(gain) ** 2, "fan_avg", distribution),
                "Glorot & Bengio (2010): uniform, Var = 2 gain^2 / (fan_in + fan_out)", aliases=("glorot_uniform",))
register_scheme("xavier_caffe", lambda gain=1.0, distribution="uniform": _vs(check_gain(gain) ** 2, "fan_in", distribution),
                "Caffe's 'xavier' filler: uniform, Var = gain^2 / fan_in")
register_scheme("he_normal", lambda activation="relu", param=None, mode="fan_in", distribution="normal":
                _vs(_gain(activation, param) ** 2, mode, distribution),
                "He et al. (2015): N(0, g^2 / fan_in), g = gain(activation) (2/fan_in for ReLU; plain normal, "
                "Keras/JAX: truncated, same variance: distribution='truncated_normal')")
register_scheme("he_uniform", lambda activation="relu", param=None, mode="fan_in", distribution="uniform":
                _vs(_gain(activation, param) ** 2, mode, distribution),
                "He et al. (2015): uniform, Var = g^2 / fan_in")
register_scheme("kaiming_normal", lambda a=0.0, mode="fan_in", nonlinearity="leaky_relu":
                _vs(_torch_gain(nonlinearity, a) ** 2, mode, "normal"),
                "torch.nn.init.kaiming_normal_(a, mode, nonlinearity): N(0, g^2 / fan), g = torch's calculate_gain "
                "(tanh 5/3, selu 3/4, sigmoid 1: not he_normal's second-moment gain)")
register_scheme("kaiming_uniform", lambda a=0.0, mode="fan_in", nonlinearity="leaky_relu":
                _vs(_torch_gain(nonlinearity, a) ** 2, mode, "uniform"),
                "torch.nn.init.kaiming_uniform_(a, mode, nonlinearity): U(-g sqrt(3/fan), g sqrt(3/fan)), "
                "g = torch's calculate_gain")
register_scheme("lecun_normal", lambda distribution="normal": _vs(1.0, "fan_in", distribution),
                "LeCun et al. (1998): N(0, 1 / fan_in) (SELU: Klambauer et al. 2017; plain normal, Keras/JAX: "
                "truncated, same variance: distribution='truncated_normal')")
register_scheme("lecun_uniform", lambda distribution="uniform": _vs(1.0, "fan_in", distribution),
                "LeCun et al. (1998): uniform, Var = 1 / fan_in")
register_scheme("kumar", lambda activation="sigmoid", param=None, mode="fan_in", distribution="normal":
                _vs(_gain(activation, param, method="kumar") ** 2, mode, distribution),
                "Kumar (2017): Var = 1 / (fan_in phi'(0)^2 (1 + phi(0)^2)); sigmoid 12.8 / fan_in")
register_scheme("torch_default", lambda: _torch_default(),
                "PyTorch's own default per module type: Linear/Conv/ConvTranspose U(+-1/sqrt(torch fan_in)), "
                "Embedding N(0, 1), MultiheadAttention in_proj xavier_uniform, Bilinear U(+-1/sqrt(in1))",
                aliases=("pytorch_default", "torch"))
register_scheme("tf1_variance_scaling", lambda factor=2.0, mode="fan_in", uniform=False: _tf1(factor, mode, uniform),
                "TF1 contrib variance_scaling_initializer: truncated normal, sigma = sqrt(1.3 factor / n)")
register_scheme("orthogonal", lambda gain=1.0: _plain(
    lambda t, f, g: orthogonal_(t, gain, generator=g), _ortho_std(check_gain(gain))),
    "Saxe et al. (2014): Haar-random (semi-)orthogonal matrix times gain")
register_scheme("delta_orthogonal", lambda gain=1.0: _plain(
    lambda t, f, g: delta_orthogonal_(t, gain, generator=g), _delta_std(check_gain(gain))),
    "Xiao et al. (2018): orthogonal matrix at the kernel centre, zeros elsewhere")
register_scheme("identity", lambda gain=1.0, groups=1: _plain(
    lambda t, f, g: identity_(t, gain, groups=groups), _identity_std(check_gain(gain))),
    "identity matrix / Dirac delta at the kernel centre (torch eye_ / dirac_)", aliases=("dirac", "eye"))
register_scheme("zeros", lambda: _plain(lambda t, f, g: _zeros_(t), lambda fi, fo, s: 0.0),
                "all zeros (biases; a layer that must start silent)")
register_scheme("auto", _auto,
                "per layer from the activation that follows (He / LeCun / Kumar / second moment): init_model only")
register_scheme("lsuv", _lsuv,
                "Mishkin & Matas (2016): orthogonal, then each layer rescaled to unit output variance on a batch: "
                "init_model(..., batch=x) only")


def _torch_gain(nonlinearity: object, a: object) -> float:
    """``torch.nn.init.calculate_gain(nonlinearity, a)`` (``a``: leaky_relu's slope), errors in one line."""
    if not isinstance(nonlinearity, str):
        raise InitlabError(f"nonlinearity must be a string as torch.nn.init.calculate_gain takes, got {nonlinearity!r}")
    if not is_number(a) or isinstance(a, Tensor) or not math.isfinite(a):  # type: ignore[arg-type]
        raise InitlabError(f"a (the leaky_relu slope) must be a finite number, got {a!r}")
    try:
        return float(torch.nn.init.calculate_gain(nonlinearity, float(a) if nonlinearity == "leaky_relu" else None))
    except ValueError as e:
        raise InitlabError(f"{e}; kaiming_* follow torch (linear, conv*, sigmoid, tanh, relu, leaky_relu, selu). "
                           "For initlab's gain of any activation use he_normal(activation=...)") from None


def _fixed_var(var: float, distribution: str) -> Scheme:
    """A scheme with ``Var[W] = var`` whatever the fans (``variance_scaling_`` with n = 1)."""
    one = (1.0, 1.0)
    return Scheme(name="torch_default", init=lambda t, f, g: variance_scaling_(t, var, "fan_in", distribution,
                                                                                  generator=g, fans=one),
                  std=lambda fi, fo, shp: math.sqrt(var), scale=var, mode="fan_in", distribution=distribution,
                  check=lambda t, f, g: planned_std(t, var, "fan_in", distribution, generator=g, fans=one),
                  write=_write_planned)


def _torch_default_for(module: nn.Module, pname: str) -> Scheme | None:
    """PyTorch's ``reset_parameters`` for ``module.<pname>`` as a scheme (torch 2.x source):

    * Linear, Conv*, ConvTranspose*: ``kaiming_uniform_(w, a=sqrt(5))``, i.e. U(-b, b) with
      b = 1/sqrt(fan_in) and torch's shape fan_in ``w.shape[1] * prod(kernel)`` (for ConvTranspose
      that is out/groups * prod(kernel): torch swaps the roles), Var = 1 / (3 fan_in);
    * Embedding: ``normal_(w)``, N(0, 1);
    * MultiheadAttention: ``xavier_uniform_`` on the fused (3E, E) in_proj (Var = 2 / (4E)) or
      on each separate q/k/v weight (Var = 2 / (rows + cols)); out_proj is a Linear;
    * Bilinear: U(-b, b), b = 1/sqrt(in1 = w.shape[1]), Var = 1 / (3 in1).
    """
    w = getattr(module, pname, None)
    if not isinstance(w, Tensor) or w.dim() < 2:
        return None
    shape, rule = tuple(w.shape), fan_rule(module)
    if rule == "embedding":
        return _fixed_var(1.0, "normal")
    if rule == "attention":
        return _fixed_var(2.0 / (shape[0] + math.prod(shape[1:])), "uniform")
    if rule == "bilinear":
        return _fixed_var(1.0 / (3.0 * shape[1]), "uniform")
    return _fixed_var(1.0 / (3.0 * math.prod(shape[1:])), "uniform")


def _torch_default() -> Scheme:
    """On a bare tensor: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (Linear's default); in ``init_model``
    each module gets PyTorch's own default for its type (:func:`_torch_default_for`)."""
    return replace(_vs(1.0 / 3.0, "fan_in", "uniform"), for_module=_torch_default_for)


def _normal(std: float, mean: float) -> Scheme:
    std = check_scale(std, "std")
    _check_mean(mean)
    return _plain(lambda t, f, g: normal_(t, std, mean=mean, generator=g), lambda fi, fo, s: std)


def _zeros_(t: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        raise InitlabError(f"zeros expects a torch.Tensor, got {type(t).__name__}")
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise InitlabError("zeros cannot write into an inference tensor (made under torch.inference_mode()) "
                           "outside inference mode; clone it first (tensor.clone())")
    if not t.is_meta:
        with torch.no_grad():
            t.zero_()
    return t


def _tf1(factor: float, mode: str, uniform: bool) -> Scheme:
    """TF1's ``tf.contrib.layers.variance_scaling_initializer(factor, mode, uniform)``.

    n = fan_in / fan_out / (fan_in + fan_out) / 2 by ``mode`` (``FAN_IN``, ``FAN_OUT``,
    ``FAN_AVG``; case-insensitive). ``uniform=True``: U(-sqrt(3 factor / n), sqrt(3 factor / n)),
    Var = factor / n. ``uniform=False``: a normal with sigma = sqrt(1.3 factor / n) truncated at
    +-2 sigma, **not** exactly variance-corrected: the realised variance is
    1.3 * 0.7737413 * factor / n = 1.0058637 factor / n (std 0.29% above sqrt(factor / n);
    the exact correction would be 1 / 0.7737413 = 1.2924217 instead of 1.3).
    """
    valid = ("fan_in", "fan_out", "fan_avg")
    key = _key(mode) if isinstance(mode, str) else mode
    if key not in valid:
        raise unknown_choice("mode", mode, valid)
    if not isinstance(uniform, bool):
        raise InitlabError(f"uniform must be True or False, got {uniform!r}")
    factor = check_scale(factor, "factor")
    return _vs(factor, key, "uniform") if uniform else _vs(1.3 * factor * TRUNC_VAR, key, "truncated_normal")


# --------------------------------------------------------------------------------------------
# CLI: ``initlab schemes``

def _cli_schemes(args: argparse.Namespace) -> int:
    rows = scheme_descriptions()
    aliases: dict[str, list[str]] = {}
    for a, k in _ALIASES.items():
        aliases.setdefault(k, []).append(a)
    width = max(len(n) for n, _, _ in rows)
    print("Initialisation schemes (initlab.get_scheme(name, **params); init_model(model, name, **params)):")
    print()
    for name, params, desc in rows:
        print(f"{name.ljust(width)}  {desc}")
        if args.verbose:
            print(f"{'':{width}}    params: {params or 'none'}")
            if name in aliases:
                print(f"{'':{width}}    aliases: {', '.join(sorted(aliases[name]))}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``initlab schemes [-v]``."""
    p = subparsers.add_parser("schemes", help="list the named initialisation schemes",
                              description="List the registry of named initialisation schemes.")
    p.add_argument("-v", "--verbose", action="store_true", help="also show parameters and aliases")
    p.set_defaults(func=_cli_schemes)
    one_line_usage_errors(p)
