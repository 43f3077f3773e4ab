"""Initialise a whole model: ``init_model`` and its report.

``init_model(model, scheme="auto")`` walks the model in registration order and initialises

* every weight layer (the layer table's :data:`initlab._layers.WEIGHT_LAYERS`: Linear, Conv1/2/3d, ConvTranspose1/2/3d,
  Bilinear, Embedding, MultiheadAttention) with module-aware fans (``initlab._fans.module_fans``):
  MultiheadAttention's fused ``in_proj_weight`` (3E, E) is initialised as three (E, E) blocks
  (q, k, v), its ``out_proj`` as the ``nn.Linear`` it is; an Embedding's ``padding_idx`` row is
  zeroed afterwards, as PyTorch does;
* every normalisation layer (BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm): weight 1,
  bias 0, running statistics reset;
* transformers' ``Conv1D`` (GPT-2) as a Linear with swapped fans, recurrent layers per gate,
  position embeddings, tokens, relative position bias tables, layer scale, custom norms and tied
  embedding/readout weights by the conventions of :mod:`initlab._conventions`; weight-normed,
  spectral-normed, parametrized and pruned layers through their effective weight
  (:mod:`initlab._reparam`); zero-initialised residual norms keep their zeros;
* any other module holding parameters of its own (PReLU, ...): its ``reset_parameters()``
  (PyTorch's default), seeded from ``generator`` when one is given; a parameter no rule covers
  is left as it is, and ``report.params`` says why (``strict`` makes that an error);
* optionally a residual-branch policy (``residual=``, :mod:`initlab._residual`).

Every parameter is accounted for: ``report.params`` has one row per fully qualified parameter
name with its ``action`` (the scheme, ``tied with X``, a convention, ``reset_parameters``,
``kept ...``) or, when left as it was, ``why``.

``scheme="auto"`` chooses per layer from the activation that consumes the layer's output
(:func:`initlab._graph.find_activations`); with ``phi`` that activation, ``n`` the fan and
Var[W] the realised weight variance:

* ReLU family (relu, leaky_relu, prelu, relu6) and smooth activations (GELU, SiLU, Mish, ELU,
  softplus, any other callable): **He normal with the second-moment gain**,
  Var[W] = g^2 / n_in with g = 1/sqrt(E[phi(z)^2]), z ~ N(0, 1). For ReLU g^2 = 2 (He et al.
  2015); for leaky ReLU g^2 = 2/(1 + a^2). For other activations this is He's argument
  generalised: it keeps E[x^2] of the next layer's input equal to Var of its pre-activation.
* tanh: **LeCun normal**, Var[W] = 1/n_in (LeCun et al. 1998). We choose LeCun over Xavier
  (Glorot & Bengio 2010) because tanh'(0) = 1 and tanh(0) = 0, so Kumar's (2017) rule for
  activations differentiable at 0 gives exactly 1/n_in; it keeps the forward pass at unit variance
  in the near-linear regime, which is what every other ``auto`` choice does, whereas Xavier's
  fan average trades forward for backward variance and differs from it whenever n_in != n_out.
* SELU: **LeCun normal**, Var[W] = 1/n_in (Klambauer et al. 2017, self-normalising networks).
* sigmoid and other saturating activations: **Kumar**, Var[W] = 1/(n_in phi'(0)^2 (1 + phi(0)^2));
  sigmoid: 12.8/n_in (Kumar 2017).
* readout (nothing follows) or identity: **LeCun normal**, Var[W] = 1/n_in.

``auto`` samples from a plain normal by default (``distribution="normal"``, as He and LeCun
did); ``distribution`` and ``mode`` may be passed as scheme parameters.

Every scheme name is looked up in the registry (``initlab.get_scheme(name, **scheme_params)``),
and the :class:`~initlab._schemes.Scheme` says what it needs: a tensor-level scheme is applied
to every layer; a model-level one (``level="model"``) chooses per layer (``for_layer``: ``auto``'s
rule above), and a data-dependent one (``needs_batch``, ``lsuv``) then fits the model on ``batch``
(``fit``: :func:`initlab.lsuv_`).
"""
from __future__ import annotations

import fnmatch
import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._activations import Activation, is_activation_module
from ._calibrate import calibrate
from ._conventions import (TOKEN_STD, Convention, conv1d_fans, init_recurrent, is_conv1d, is_position_embedding,
                           param_convention, scaled_tied_readout)
from ._engine import _version, batched, measured, needs_scratch, truncated_normal_, using_threads
from ._keys import _sharding_hooks_off, is_dtensor, is_shard_block, keyed, local, row_blocks
from ._errors import InitlabError, is_out_of_memory, memory_error
from ._fans import module_fans
from ._graph import LayerLink, find_activations
from ._layers import WEIGHT_LAYERS, attr, init_biases, init_weights, is_weight_layer, kind_name, layer_row
from ._residual import apply_policy, check_policy, find_branches
from ._reparam import commit, computed_kind, scratch_for
from ._schemes import LayerChoice, Scheme, _write_planned, get_scheme, scheme_parameters, schemes
from ._text import text_table
from ._undo import Undo, all_or_nothing, check_memory, deferred_interrupt, tensor_bytes

__all__ = ["InitReport", "init_model"]

#: realised std is measured on at most this many leading entries of a tensor (relative standard
#: error 1/sqrt(2 * 2**16) = 0.28 %); with 2**20 entries the report's stds took ~40 % of
#: ``init_model``'s time on resnet50 (bench/bench_real_models.py --full).
STD_SAMPLE = 1 << 16

#: the parameters of ``auto`` (read by the lab's config check)
_COLUMNS = ("name", "kind", "shape", "fan_in", "fan_out", "activation", "scheme", "target_std",
            "realised_std")
_TABLE = ("name", "kind", "shape", "fan_in", "fan_out", "activation", "scheme", "gain", "target_std",
          "realised_std")
_NUMERIC = {3, 4, 7, 8, 9}  # right-aligned columns of _TABLE
_PARAM_COLUMNS = ("name", "kind", "shape", "fan_in", "fan_out", "activation", "scheme", "gain", "target_std",
                  "realised_std", "why")

Selector = str | Callable[[str, nn.Module], bool]


# --------------------------------------------------------------------------------------------
# the report

def _after_trace(attr: str, doc: str) -> property:
    """A report attribute read and written after its deferred trace has run."""
    def get(self: "InitReport") -> Any:
        self._resolve()
        return getattr(self, attr)

    def put(self: "InitReport", value: Any) -> None:
        self._resolve()
        setattr(self, attr, value)
    return property(get, put, doc=doc)


class InitReport:
    """What ``init_model`` did: ``rows``, one per initialised module (one per parameter for
    recurrent layers and modules handled by a convention), and ``params``, one per parameter;
    ``str(report)`` and ``frame(per="parameter")`` show one line per parameter tensor
    (:meth:`param_rows`: what was done, with the sampling numbers, or why it was left).

    ``rows``: dicts with keys name, kind, shape, fan_in, fan_out, activation, scheme, target_std,
    realised_std (plus gain and bias). ``target_std`` is the std the scheme aims at given the fans,
    ``realised_std`` the sample std measured after sampling (on at most the first ``STD_SAMPLE``
    entries; None on the meta device): sqrt((S2 - S1^2/n) / (n - 1)) from the sums S1, S2 of the
    entries and their squares, which is ``torch.std`` of them up to rounding (relative ~1e-6; see
    :func:`_std_samples`). ``params``: dicts with keys name (fully qualified), module,
    kind, shape, action (None when left as it was) and why. ``traced`` is False when the model could not be traced
    with torch.fx and activations were found in module registration order (``note`` says why).

    A scheme that does not choose by activation (a named scheme, a function) writes without
    tracing the model: the ``activation`` column is found when ``rows``, ``traced``, ``note`` or
    the table are first read, by the same :func:`~initlab._graph.find_activations` an eager trace
    runs, so the rows are the same. Until then the report holds the model. If the model changed
    in between (a module replaced or added, its training mode, or a parameter of a module other
    than a weight layer written, e.g. a PReLU slope trained), the column stays empty, ``traced``
    is False and ``note`` says why: the rows never describe a model other than the one written.
    """

    def __init__(self, rows: list[dict[str, Any]], traced: bool = True, scheme: str = "auto", note: str = "",
                 extra: dict[str, Any] | None = None, params: list[dict[str, Any]] | None = None) -> None:
        self._rows, self._traced, self._note = rows, traced, note
        self.scheme = scheme
        self.extra: dict[str, Any] = {} if extra is None else extra
        self.params: list[dict[str, Any]] = [] if params is None else params
        self._pending: _DeferredTrace | None = None
        self._stale = False  # the deferred trace found the model changed: no activations, a note

    def _resolve(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._traced, self._note, self._stale = pending.fill(self._rows)

    @property
    def rows(self) -> list[dict[str, Any]]:
        self._resolve()
        return self._rows

    @rows.setter
    def rows(self, value: list[dict[str, Any]]) -> None:
        self._pending, self._rows = None, value

    traced = _after_trace("_traced", "False when the model could not be traced (``note`` says why)")
    note = _after_trace("_note", "why the model was not traced, or ''")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, InitReport):
            return NotImplemented
        return (self.rows, self.traced, self.scheme, self.note, self.extra, self.params) == \
            (other.rows, other.traced, other.scheme, other.note, other.extra, other.params)

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it was

    def __getstate__(self) -> dict[str, Any]:
        self._resolve()  # a copy or a pickle carries the rows, not the model
        return self.__dict__.copy()

    @property
    def untouched(self) -> list[str]:
        """The names of the parameters left as they were (``params`` rows without an action)."""
        return [p["name"] for p in self.params if p["action"] is None]

    def param(self, name: str) -> dict[str, Any]:
        """The ``params`` row of a fully qualified parameter name (``"blocks.0.attn.qkv.weight"``)."""
        for p in self.params:
            if p["name"] == name:
                return p
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self._rows)  # the rows are there; only their activation column may wait

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, name: str) -> dict[str, Any]:
        """The row of module ``name``."""
        for row in self.rows:
            if row["name"] == name:
                return row
        raise KeyError(name)

    def frame(self, per: str = "module"):  # -> pandas.DataFrame
        """The rows as a pandas DataFrame (pandas is imported only here): ``per="module"`` the
        module rows, ``per="parameter"`` :meth:`param_rows`."""
        import pandas as pd

        if per == "parameter":
            return pd.DataFrame(self.param_rows(), columns=list(_PARAM_COLUMNS))
        if per != "module":
            raise InitlabError(f"per must be 'module' or 'parameter', got {per!r}")
        return pd.DataFrame(self.rows, columns=list(_COLUMNS) + ["gain", "bias"])

    def param_rows(self) -> list[dict[str, Any]]:
        """One row per parameter tensor (``params``), with the numbers of the module row that
        sampled it (fans, activation, gain, target and realised std) where there is one: keys
        name, kind, shape, fan_in, fan_out, activation, scheme (what was done; ``untouched`` when
        nothing), gain, target_std, realised_std, why."""
        by_name = {r["name"]: r for r in self.rows}
        out = []
        for p in self.params:
            mname, _, pname = p["name"].rpartition(".")
            row = by_name.get(p["name"])
            if row is None and pname in ("weight", "in_proj_weight"):
                row = by_name.get(mname)
            nums = {k: (row or {}).get(k) for k in ("fan_in", "fan_out", "activation", "gain", "target_std",
                                                     "realised_std")}
            if row is not None and tuple(row["shape"]) != tuple(p["shape"]):
                nums = dict.fromkeys(nums)  # a row of another tensor (MultiheadAttention's blocks agree)
            out.append({"name": p["name"], "kind": p["kind"], "shape": p["shape"], **nums,
                        "scheme": p["action"] or "untouched", "why": p["why"]})
        return out

    def __repr__(self) -> str:
        return f"InitReport({len(self.rows)} modules, scheme={self.scheme!r}, traced={self.traced})"

    def __str__(self) -> str:
        """The table users see: one line per parameter tensor (:meth:`param_rows`; the module rows
        when there are no parameter rows), then what was left untouched and why."""
        rows = self.param_rows() if self.params else self.rows
        self._resolve()
        cells = [[
            r["name"] or "<model>", r["kind"], "x".join(map(str, r["shape"])) if r["shape"] else "-",
            _fmt(r["fan_in"]), _fmt(r["fan_out"]), r["activation"] or "-", r["scheme"],
            _fmt(r.get("gain")), _fmt(r["target_std"]), _fmt(r["realised_std"]),
        ] for r in rows]
        lines = [f"init_model: scheme={self.scheme}, {len(self.rows)} modules"]
        if self._stale:
            lines.append(f"note: {self._note}")
        elif not self._traced:
            lines.append(f"note: {self._note or 'tracing failed'}; activations were found in module "
                         "registration order (functional activations are invisible)")
        res = self.extra.get("residual")
        if res:
            lines.append(f"residual: {res['policy']} on {res['branches']} branches, found by {res['found_by']}")
        cal = self.extra.get("calibration")
        if cal:
            on = "the given batch" if cal["batch"] == "batch" else "a synthetic N(0, 1) batch"
            lines.append(f"calibrated: {len(cal['factors'])} layers rescaled on {on} to pre-activation second "
                         "moment 1 (gain and target_std include the factor)")
        lines.append(text_table(_TABLE, cells, right=_NUMERIC))
        left = [p for p in self.params if p["action"] is None]
        if self.params:
            lines[0] += f", {len(self.params)} parameters ({len(left)} untouched)"
        lines += [f"untouched: {p['name']} ({p['why']})" for p in left]
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _row(name: str, module: nn.Module, shape: tuple[int, ...], fan_in: float | None = None,
         fan_out: float | None = None, act: Activation | None = None, scheme: str = "", target: float | None = None,
         gain: float | None = None, bias: str | float | None = None, why: str | None = None) -> dict[str, Any]:
    return {"name": name, "kind": kind_name(module), "shape": shape, "fan_in": fan_in, "fan_out": fan_out,
            "activation": None if act is None else act.label, "scheme": scheme, "target_std": target,
            "realised_std": None, "gain": gain, "bias": bias, "why": why}


# --------------------------------------------------------------------------------------------
# the deferred trace: a scheme that does not choose by activation writes without one

_STALE = ("the model changed between init_model and the first read of this report (a module replaced, its "
          "training mode, or an activation's parameter), so the activation column was not filled; read the "
          "report right after init_model, or call initlab.find_activations(model)")


def _trace_inputs(model: nn.Module, modules: Iterable[tuple[str, nn.Module]] | None = None) -> tuple[Any, ...]:
    """What :func:`find_activations` reads that is commonly changed after ``init_model``: every
    module (name, identity, type, training mode) and the parameters of activation modules
    (identity, in-place version: a PReLU slope). Weight values, norms and buffers are not read.
    ``modules``: ``model.named_modules()``, when the caller has them."""
    out = []
    for name, m in model.named_modules() if modules is None else modules:
        own = m._parameters
        ps = tuple((id(p), p._version) for p in own.values() if p is not None) \
            if own and not is_weight_layer(m) and is_activation_module(m) else ()
        out.append((name, id(m), type(m), m.training, ps))
    return tuple(out)


class _DeferredTrace:
    """The activation column of a report written without a trace: ``fill`` traces the model
    (:func:`find_activations`, FSDP hooks set aside as under ``init_model``) and fills the rows
    of the weight layers, unless :func:`_trace_inputs` changed since the writes."""

    def __init__(self, model: nn.Module, layers: list[tuple[int, str]],
                 modules: Iterable[tuple[str, nn.Module]] | None = None) -> None:
        self.model: nn.Module | None = model
        self.layers = layers  # (index into the report's rows, the weight layer's module name)
        self.seen = _trace_inputs(model, modules)

    def fill(self, rows: list[dict[str, Any]]) -> tuple[bool, str, bool]:
        """(traced, note, stale) after filling ``rows``' activation column."""
        model, self.model = self.model, None  # the report no longer holds the model
        if model is None or _trace_inputs(model) != self.seen:
            return False, _STALE, True
        with _sharding_hooks_off(model):
            links = find_activations(model)
        for i, name in self.layers:
            link = links.get(name)
            rows[i]["activation"] = None if link is None or link.activation is None else link.activation.label
        return _trace_facts(links)


def _trace_facts(links: dict[str, LayerLink]) -> tuple[bool, str, bool]:
    """(traced, note, stale) of a set of links: traced unless a link fell back to module order."""
    return all(link.traced for link in links.values()), \
        next((link.note for link in links.values() if not link.traced), ""), False


def _needs_trace(scheme: Any, policy: str | None, targets: list[tuple[str, nn.Module, str]]) -> bool:
    """Whether ``init_model`` must trace before writing: a scheme that chooses by activation
    (``for_layer``: auto, lsuv), a residual policy, or an activation module whose parameters a
    convention writes (an eager trace reads them before that write)."""
    if getattr(scheme, "for_layer", None) is not None or policy:
        return True
    return any(what == "conv" and is_activation_module(m) for _, m, what in targets)


# --------------------------------------------------------------------------------------------
# argument checks

def _check_bias(bias: object) -> str | float:
    if isinstance(bias, str):
        if bias in ("zeros", "keep"):
            return bias
        raise InitlabError(f"bias must be 'zeros', 'keep' or a number, got {bias!r}")
    if isinstance(bias, (int, float)) and not isinstance(bias, bool) and math.isfinite(bias):
        return float(bias)
    raise InitlabError(f"bias must be 'zeros', 'keep' or a finite number, got {bias!r}")


def _selectors(arg: object, what: str) -> list[Selector] | None:
    if arg is None:
        return None
    if isinstance(arg, str) or callable(arg):
        items: Sequence[object] = [arg]
    elif isinstance(arg, Iterable) and not isinstance(arg, (bytes, bytearray, Tensor)):
        items = list(arg)
    else:
        items = [arg]
    if not items:
        raise InitlabError(f"{what} is empty; give module-name glob patterns (e.g. {what}=['head*']) or "
                           f"predicates f(name, module) -> bool, or leave {what} out")
    for s in items:
        if not (isinstance(s, str) and s) and not callable(s):
            raise InitlabError(f"{what} must be module-name glob patterns or predicates (non-empty strings, "
                               f"or f(name, module) -> bool), got {type(s).__name__}: {s!r}")
    return list(items)  # type: ignore[arg-type]


def _matches(sel: Selector, name: str, module: nn.Module, what: str = "include") -> bool:
    if callable(sel):
        try:
            return bool(sel(name, module))
        except Exception as e:  # noqa: BLE001 - the user's predicate, reported in one line
            raise InitlabError(f"{what} predicate {getattr(sel, '__name__', sel)!r} failed on module {name!r} "
                               f"({type(e).__name__}: {e}); a predicate is called as f(name, module) -> bool") from e
    # a pattern matches a module or any of its ancestors ("head" selects "head.0" too)
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), sel) for i in range(1, len(parts) + 1))


# --------------------------------------------------------------------------------------------
# the scheme

def _scheme_label(scheme: Any, fallback: str) -> str:
    name = getattr(scheme, "name", None)
    return str(name) if isinstance(name, str) else str(fallback)


def _model_level_params(name: str) -> tuple[str, ...] | None:
    """The parameters of a model-level scheme, None for any other name (unknown ones included)."""
    try:
        return scheme_parameters(name) if get_scheme(name).level == "model" else None
    except InitlabError:
        return None


def _named_scheme(name: str, params: dict[str, Any]) -> Scheme:
    """``get_scheme(name, **params)``; a model-level scheme given parameters it does not take says
    which it takes (``init_model(model, 'auto', gain=2)``)."""
    try:
        return get_scheme(name, **params)
    except InitlabError:
        accepted = _model_level_params(name)
        unknown = sorted(set(params) - set(accepted or ()))
        if accepted is None or not unknown:
            raise
        takes = f"takes the parameters {', '.join(accepted)}" if accepted else "takes no parameters"
        raise InitlabError(f"scheme {get_scheme(name).name!r} {takes}; got {', '.join(map(repr, unknown))}") from None


def _resolve_scheme(scheme: Any, params: dict[str, Any]) -> tuple[Any, str]:
    """(the scheme: a :class:`Scheme` or any callable ``f(tensor, *, fans, generator)``, its report label)."""
    if isinstance(scheme, Scheme) and scheme.level == "model":  # get_scheme("auto", distribution=...)
        scheme, params = scheme.name, {**scheme.params, **params}
    if isinstance(scheme, str):
        obj = _named_scheme(scheme, params)
        return obj, _scheme_label(obj, scheme)
    if callable(scheme):
        if params:
            raise InitlabError("scheme parameters are only accepted with a scheme name; "
                               f"got a {type(scheme).__name__} and {sorted(params)}")
        if isinstance(scheme, Scheme):
            return scheme, scheme.name
        label = _scheme_label(scheme, getattr(scheme, "__name__", type(scheme).__name__))
        return Scheme(name=label, init=_adapt_callable(scheme, label)), label
    raise InitlabError(f"scheme must be a name (see initlab.schemes()), 'auto', 'lsuv', a Scheme or a function "
                       f"f(tensor) that fills a tensor in place, got {type(scheme).__name__}: {scheme!r}. "
                       f"Valid names: {', '.join(schemes())}")


def _adapt_callable(fn: Callable[..., Any], label: str) -> Callable[[Tensor, Any, Any], Any]:
    """``init(tensor, fans, generator)`` calling a user function with what it takes: ``fans=`` and
    ``generator=`` when its signature names them (``torch.nn.init.xavier_normal_`` takes a
    generator but no fans), else the tensor alone."""
    try:
        sig: inspect.Signature | None = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    takes: set[str] = set()
    if sig is not None:
        params = sig.parameters.values()
        any_kw = any(p.kind is p.VAR_KEYWORD for p in params)
        takes = {k for k in ("fans", "generator") if any_kw or k in sig.parameters}
        try:
            sig.bind(None, **dict.fromkeys(takes))
        except TypeError:
            raise InitlabError(f"scheme {label!r} must be a function f(tensor) (optionally with fans= and "
                               f"generator= keywords) that fills the tensor in place; its signature is "
                               f"{label}{sig}") from None

    def init(t: Tensor, fans: Any, generator: Any) -> Any:
        kw = {"fans": fans, "generator": generator}
        return fn(t, **{k: v for k, v in kw.items() if k in takes})
    init.takes_fans = "fans" in takes  # type: ignore[attr-defined]
    return init


def _check_block_fans(p: "_Planned") -> None:
    """A sharded fused weight (MultiheadAttention's in_proj on a DTensor) is written block by block
    on the local shard; a user function without ``fans=`` would take the fans of the local block
    (the shard's rows or columns), not the layer's, so it is refused before any write."""
    init = getattr(p.choice.scheme, "init", None)
    if getattr(init, "takes_fans", True) or not any(is_shard_block(part) for part in p.parts):
        return
    raise InitlabError(f"layer {p.label!r} ({kind_name(p.module)} {tuple(p.tensor.shape)}): scheme "
                       f"{p.choice.label!r} is a function without a fans= keyword, and this sharded (DTensor) weight "
                       "is written block by block on its local shard, so it would compute the fans of the local block; "
                       "give it a fans= keyword (init_model passes the layer's fans) or use a named scheme")


def _check_needs(scheme: Any, label: str, batch: Tensor | None, inc: object, exc: object) -> None:
    """A data-dependent scheme needs ``batch`` and initialises every layer."""
    if getattr(scheme, "needs_batch", False) and batch is None:
        raise InitlabError(f"scheme {label!r} is data-dependent and needs an input batch: "
                           f"init_model(model, {label!r}, batch=x)")
    if getattr(scheme, "fit", None) is not None and (inc is not None or exc is not None):
        raise InitlabError(f"scheme {label!r} initialises every layer; include/exclude are not supported with it")
    if getattr(scheme, "level", "tensor") == "model" and getattr(scheme, "for_layer", None) is None:
        raise InitlabError(f"scheme {label!r} is a model-level scheme without a per-layer rule (for_layer)")


def _scheme_target(scheme: Any, fan_in: float, fan_out: float, shape: tuple[int, ...]) -> float | None:
    """The scheme's target std for these fans (None for a callable without ``target_std``)."""
    fn = getattr(scheme, "target_std", None)
    if not callable(fn):
        return None
    v = fn((fan_in, fan_out), shape=shape)
    return None if v is None else float(v)


def _choices(targets: list[tuple[str, nn.Module, str]], links: dict[str, LayerLink], scheme: Any,
             label: str, input_sq_mean: float = 1.0) -> dict[str, LayerChoice]:
    """What the scheme does to each weight layer: the scheme itself, or a model-level scheme's
    choice from the activation that follows (computed once per activation)."""
    weights = [(name, module) for name, module, what in targets if what == "weight"]
    for_layer = getattr(scheme, "for_layer", None)
    if for_layer is None:
        same = LayerChoice(scheme, label)
        return {name: same for name, _ in weights}
    by_act: dict[Any, LayerChoice] = {}
    out: dict[str, LayerChoice] = {}
    for_link = getattr(for_layer, "for_link", None)  # auto's depth-exact rule (initlab._schemes._AutoRule)
    for name, module in weights:
        act = links[name].activation if name in links else None
        key = ("readout",) if act is None else act.cache_key
        choice = by_act.get(key) if key is not None and for_link is None else None
        if choice is None:
            try:
                choice = for_layer(act) if for_link is None else for_link(links.get(name), input_sq_mean)
            except InitlabError as e:
                raise InitlabError(f"layer {name!r} ({kind_name(module)}): {e}") from e
            except Exception as e:  # noqa: BLE001 - a user scheme's rule, reported in one line
                raise InitlabError(f"layer {name!r} ({kind_name(module)}): scheme {label!r} failed to choose "
                                   f"for activation {getattr(act, 'label', None)!r} ({type(e).__name__}: {e})") from e
            if key is not None and for_link is None:
                by_act[key] = choice
        out[name] = choice
    return out


# --------------------------------------------------------------------------------------------
# the walk: reset the other modules, plan every write (all checks), then write

def _std_sample(t: Tensor) -> Tensor | None:
    """The sample std of the first ``STD_SAMPLE`` entries (row-major): a view of a contiguous
    tensor; of a non-contiguous one, only its leading rows are copied. Computed on one intra-op
    thread: the same number for any ``torch.get_num_threads()``, and no OpenMP team woken for a
    64k-entry reduction (on two busy cores that made init_model 5-10x slower)."""
    with using_threads(1):
        flat = _sample_of(t)
        return None if flat is None else torch.std(flat)


def _sample_of(t: Tensor) -> Tensor | None:
    """The entries :func:`_std_sample` measures, as a 1-d fp32/fp64 tensor (None: fewer than two, or meta)."""
    d = local(t).detach()  # a DTensor: its local shard (no collective)
    n = d.numel()
    if n < 2 or d.is_meta:
        return None
    if n <= STD_SAMPLE and d.is_contiguous():
        flat = d.view(-1)
    else:
        if not d.is_contiguous() and d.dim() > 1:
            per_row = max(1, n // d.shape[0])
            d = d[: -(-STD_SAMPLE // per_row)]
        flat = d.reshape(-1)[:STD_SAMPLE]
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return flat


#: :func:`_std_samples` falls back to ``torch.std`` where its sums could lose precision: a mean that
#: holds more than this share of the second moment (a constant fill), or a root mean square outside
#: [1e-15, 1e15] (squares near the dtype's range)
_MEAN_SHARE, _RMS_RANGE = 0.5, (1e-15, 1e15)
_FLOATS = (torch.float32, torch.float64)


def _std_samples(tensors: Sequence[Tensor], known: dict[Any, Any] | None = None) -> list[float | None]:
    """:func:`_std_sample` of many tensors as Python floats, with two reductions per tensor that
    vectorise (``torch.std``'s single pass does not: it took ~70 % of init_model's own time on
    efficientnet_b0): s = sqrt((S2 - S1^2 / n) / (n - 1)) from S1 = sum(x) and S2 = sum(x^2)
    (``torch._foreach_norm``, one call for all). Equal to ``torch.std`` up to rounding (relative
    ~1e-7 for zero-mean weights); where the sums could lose precision (see :data:`_MEAN_SHARE`) or
    are not finite, ``torch.std`` itself. One host transfer per device and dtype. ``known``: the
    sums :func:`initlab._engine.batched` took while sampling (``measure=STD_SAMPLE``), used for a
    tensor not written since (the same operations on the same entries: the same numbers)."""
    out: list[float | None] = [None] * len(tensors)
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[int, Tensor, Any]]] = {}
    with using_threads(1), torch.no_grad():
        for i, t in enumerate(tensors):
            d = local(t)
            # a small contiguous fp32/fp64 tensor is reduced as it is (no view: these reductions read it in order)
            flat = d if d.numel() <= STD_SAMPLE and not d.is_meta and d.dtype in _FLOATS and d.is_contiguous() \
                and d.numel() >= 2 else _sample_of(d)
            if flat is not None:
                hit = measured(flat, _version(d), known) if known else None
                groups.setdefault((flat.device, flat.dtype), []).append((i, flat, hit))
        for items in groups.values():
            flats = [f for _, f, hit in items if hit is None]
            norms_left = iter(torch._foreach_norm(flats)) if flats else iter(())
            sums = torch.stack([f.sum() if hit is None else hit[0] for _, f, hit in items]).tolist()
            norms = torch.stack([next(norms_left) if hit is None else hit[1] for _, _, hit in items]).tolist()
            for (i, f, _), s1, r in zip(items, sums, norms):
                n = f.numel()
                s2 = r * r
                share = s1 * s1 / n
                rms = r / math.sqrt(n)
                if math.isfinite(s2) and math.isfinite(s1) and share <= _MEAN_SHARE * s2 and \
                        _RMS_RANGE[0] <= rms <= _RMS_RANGE[1]:
                    out[i] = math.sqrt(max(0.0, (s2 - share) / (n - 1)))
                else:
                    out[i] = float(torch.std(f))
    return out


def _constant_std(t: Tensor) -> float | None:
    """The sample std of a tensor just filled with one constant (a norm's ones or kept zeros):
    0.0, as :func:`_std_sample` measures it (None where that gives None)."""
    d = local(t)
    return None if d.numel() < 2 or d.is_meta else 0.0


def _to_floats(stds: list[Tensor | float | None]) -> list[float | None]:
    """One host transfer per device and dtype for all the measured stds (a float32 std converts
    to the same Python float as its float64 cast)."""
    out: list[float | None] = [None] * len(stds)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, s in enumerate(stds):
        if isinstance(s, float):
            out[i] = s
        elif s is not None:
            groups.setdefault((s.device, s.dtype), []).append(i)
    for idx in groups.values():
        values = torch.stack([stds[i] for i in idx]).tolist()  # type: ignore[misc]
        for i, v in zip(idx, values):
            out[i] = float(v)
    return out


def _any_nonzero(tensors: list[Tensor]) -> list[bool]:
    """``bool(torch.any(t))`` for each tensor (its local shard); floating tensors on one device
    with one call: the largest |entry| (``torch._foreach_norm`` with ord inf) is 0 exactly when
    every entry is 0 or -0 (a NaN gives NaN, an inf inf: not 0, as ``any`` finds)."""
    ts = [local(t) for t in tensors]
    if len(ts) > 1 and all(t.is_floating_point() and t.numel() and t.device == ts[0].device for t in ts):
        with using_threads(1):
            return [v != 0.0 for v in torch.stack(torch._foreach_norm(ts, math.inf)).tolist()]
    return [bool(torch.any(t)) for t in ts]


def _reset_other(module: nn.Module, generator: torch.Generator | None) -> bool:
    """Call ``module.reset_parameters()`` (PyTorch's default init); seeded from ``generator``."""
    reset = getattr(module, "reset_parameters", None)
    if not callable(reset):
        return False
    if generator is None:
        reset()
        return True
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    cuda = sorted({p.device.index or 0 for p in module.parameters(recurse=False) if p.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for i in cuda:
            torch.cuda.default_generators[i].manual_seed(seed)
        reset()
    return True


def _norm_tensors(module: nn.Module) -> list[Tensor]:
    """What :meth:`_Fills.norm` writes: the norm's weight and bias, its running statistics."""
    out = [t for t in (attr(module, "weight"), attr(module, "bias")) if isinstance(t, Tensor)]
    if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
        out += [t for t in module.buffers(recurse=False)]
    return out


class _Fills:
    """Constant fills (norms' ones and zeros and running statistics, biases), queued and written
    together: ``torch._foreach_zero_`` on all of them, then ``torch._foreach_add_`` of each
    non-zero value (0 + c is c exactly), two calls where ~5 per norm layer were made. A value that
    this would not give bit for bit (-0.0, or a constant for a half-precision tensor, which the
    addition would round twice) is filled at once instead."""

    def __init__(self) -> None:
        self.zero: list[Tensor] = []
        self.add: dict[float, list[Tensor]] = {}

    def put(self, t: Tensor, value: float) -> None:
        if is_dtensor(t):  # sharded: its own fill, not mixed with plain tensors in one call
            t.fill_(value)
        elif value == 0.0 and math.copysign(1.0, value) > 0:
            self.zero.append(t)
        elif value != 0.0 and (value == 1.0 or t.dtype in (torch.float32, torch.float64)):
            self.zero.append(t)
            self.add.setdefault(value, []).append(t)
        else:
            t.fill_(value)

    def norm(self, module: nn.Module, keep_weight: bool = False) -> list[Tensor]:
        """A norm's weight 1 (unless ``keep_weight``), bias 0 and running statistics reset, queued (a
        norm type with its own ``reset_running_stats`` runs it now); returns the tensors it will write."""
        w, b = attr(module, "weight"), attr(module, "bias")
        out = []
        if isinstance(w, Tensor) and not keep_weight:
            out.append(w)
            self.put(w, 1.0)
        if isinstance(b, Tensor):
            out.append(b)
            self.put(b, 0.0)
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            stats = [module._buffers.get(k) for k in ("running_mean", "running_var", "num_batches_tracked")]
            if type(module).reset_running_stats is not nn.modules.batchnorm._NormBase.reset_running_stats or \
                    not all(isinstance(t, Tensor) for t in stats):
                self.write()
                module.reset_running_stats()
            else:  # what it does: running mean 0, running variance 1, the counter 0
                for t, v in zip(stats, (0.0, 1.0, 0.0)):
                    out.append(t)
                    self.put(t, v)
        return out

    def write(self) -> None:
        if self.zero:
            torch._foreach_zero_(self.zero)
        for value, ts in self.add.items():
            torch._foreach_add_(ts, value)
        self.zero, self.add = [], {}


@dataclass
class _Planned:
    """One weight tensor to write, checked: the layer, the scheme's choice, the parts it is
    sampled as (MultiheadAttention's in_proj: three blocks), its fans and the report's facts."""

    name: str
    module: nn.Module
    act: Activation | None
    choice: LayerChoice
    pname: str
    tensor: Tensor
    parts: tuple[Tensor, ...]
    fans: tuple[float, float]
    label: str
    blocks: int = 1
    target: float | None = None
    safe: bool = False  # written by a scheme that cannot fail once its check passed
    tied_to: str | None = None
    computed: str | None = None  # a weight computed from others (initlab._reparam): sampled into a scratch tensor
    underlying: list[Tensor] = field(default_factory=list)
    checked: list[Any] | None = None  # what the scheme's check returned per part (its write takes it)
    written: bool = False  # sampled by Walk._presample


def _computed(module: nn.Module, pname: str) -> str | None:
    """:func:`~initlab._reparam.computed_kind`: a parameter registered under ``pname`` is plain (a
    parametrization removes it from ``_parameters``), so only the other weights are looked at."""
    return None if module._parameters.get(pname) is not None else computed_kind(module, pname)


def _weight_slot(name: str, module: nn.Module, pname: str, tensor: Tensor, computed: str | None) -> None:
    """The tensor must be a parameter init_model can fill in place (not lazy, not computed)."""
    if isinstance(tensor, nn.parameter.UninitializedParameter):
        raise InitlabError(f"layer {name!r} ({kind_name(module)}) has uninitialised lazy parameters; "
                           "run one forward pass before init_model")
    if computed == "unknown":
        raise InitlabError(
            f"layer {name!r} ({kind_name(module)}): its {pname} is computed from other tensors (a "
            "parametrization or torch.nn.utils.weight_norm/spectral_norm), so init_model cannot set it in place; "
            f"initialise the underlying parameters yourself, or leave the layer out (exclude=[{name!r}])")


def _engine_check_key(scheme: Any, part: Tensor, fans: tuple[float, float]) -> tuple[Any, ...] | None:
    """What the engine's check (:func:`~initlab._engine.planned_std`, the ``check`` of every scheme
    that writes with :func:`~initlab._schemes._write_planned`) reads of a tensor, as a key: equal
    keys give the same result (the generator is the walk's own). None for any other check."""
    if getattr(scheme, "write", None) is not _write_planned or type(part) is not Tensor and \
            type(part) is not nn.Parameter:
        return None
    return (id(scheme), fans, part.dtype, part.device.type, part.is_meta, part.numel() == 0, part.is_inference(),
            torch.is_inference_mode_enabled())


def _check_write(p: _Planned, generator: torch.Generator | None, memo: dict[tuple[Any, ...], Any]) -> None:
    """Run the scheme's checks on every part without writing (``Scheme.check``); a part that needs a
    scratch copy of its size could still run out of memory, so it is not safe. ``memo``: this walk's
    results of the engine's own check and of target stds (many layers share their fans)."""
    scheme = p.choice.scheme
    check = getattr(scheme, "check", None)
    _check_block_fans(p)
    try:
        if check is not None:
            checked = []
            for part in p.parts:
                key = _engine_check_key(scheme, part, p.fans)
                got = memo.get(key) if key is not None else None
                if got is None:
                    got = check(part, p.fans, generator)
                    if key is not None:
                        memo[key] = got
                checked.append(got)
            p.checked = checked
        block_shape = (p.tensor.shape[0] // p.blocks, *p.tensor.shape[1:])
        key = ("target", id(scheme), p.fans, block_shape)
        if key not in memo:
            memo[key] = _scheme_target(scheme, p.fans[0], p.fans[1], block_shape)
        p.target = memo[key]
    except InitlabError as e:
        raise InitlabError(f"layer {p.label!r} ({kind_name(p.module)} {tuple(p.tensor.shape)}): {e}") from e
    p.safe = check is not None and not any(needs_scratch(part) for part in p.parts)


def _uninitialised(t: Tensor) -> bool:
    """On the meta device, or holding NaN/inf (memory from ``to_empty()``, or a NaN fill)."""
    t = local(t)  # a DTensor: its local shard (no collective)
    return t.is_meta or (t.is_floating_point() and t.numel() > 0 and not bool(torch.isfinite(t.detach()).all()))


def _check_strict(table: list[dict[str, Any]], tensors: list[Tensor], strict: bool | None) -> None:
    """``strict=True``: no parameter may be left as it is (unless include/exclude left its module
    out); ``strict=None`` (default): none of those may be detectably uninitialised (meta, NaN, inf)."""
    if strict is False:
        return
    bad = [row for row in table if row["action"] is None and not row["why"].startswith("left out")]
    if strict is None:
        by_name = {row["name"]: t for row, t in zip(table, tensors)}
        bad = [row for row in bad if _uninitialised(by_name[row["name"]])]
        what = "uninitialised (on the meta device or not finite) and has no rule"
    else:
        what = "would be left as it is (strict=True)"
    if bad:
        shown = "; ".join(f"{r['name']} ({r['why']})" for r in bad[:8]) + ("; ..." if len(bad) > 8 else "")
        raise InitlabError(f"{len(bad)} parameter(s) {what}: {shown}. Initialise them yourself, leave their "
                           "modules out (exclude=[...]), or pass strict=False")


def _check_bias_fits(name: str, module: nn.Module, bias_mode: str | float) -> None:
    if not isinstance(bias_mode, float):
        return
    for b in init_biases(module):
        info = torch.finfo(b.dtype) if b.is_floating_point() else None
        if info is not None and abs(bias_mode) > info.max:
            raise InitlabError(f"bias={bias_mode:g} does not fit layer {name!r}'s {str(b.dtype).replace('torch.', '')} "
                               f"bias (largest number {info.max:.4g}): it would be inf")


def _weight_label(name: str, pname: str) -> str:
    return name if pname in ("weight", "in_proj_weight") else f"{name}.{pname}"


def _tie_owners(targets: list[tuple[str, nn.Module, str]], embedding_role: bool = False) -> dict[int, str]:
    """id(weight) -> the label of the layer that writes it. A weight shared by an Embedding and a
    Linear readout (tied input/output embeddings, Press & Wolf 2017) is written in the readout's
    role: ``auto`` then gives LeCun normal, std 1/sqrt(d), so the logits h.W of a unit-variance
    hidden state h are O(1); the embedding's N(0, 1) role would give logits of std sqrt(d).
    Other weights, and all with ``embedding_role`` (T5: :func:`scaled_tied_readout`): the first
    layer holding them."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module, what in targets:
        if what == "weight":
            for pname, t, _ in init_weights(module):
                holders.setdefault(id(t), []).append((_weight_label(name, pname), module))
    out: dict[int, str] = {}
    for key, hs in holders.items():
        readout = [lab for lab, m in hs if isinstance(m, nn.Linear)]
        tied_embedding = len(hs) > 1 and readout and any(isinstance(m, nn.Embedding) for _, m in hs) \
            and not embedding_role
        out[key] = readout[0] if tied_embedding else hs[0][0]
    return out


class _Walk:
    """One ``init_model`` walk: the generator and bias rule, the undo log, the planned writes and
    the report rows written so far with their std samples (tied weights are initialised once)."""

    def __init__(self, generator: torch.Generator | None, bias_mode: str | float, undo: Undo) -> None:
        self.generator, self.bias_mode, self.undo = generator, bias_mode, undo
        self.rows: list[dict[str, Any]] = []
        self.stds: list[Tensor | float | None] = []
        self.reset: dict[str, bool] = {}  # other modules: whether reset_parameters() ran
        self.planned: dict[str, list[_Planned]] = {}
        self.scheme: Any = None  # the resolved scheme (recurrent layers' input weights use it)
        self.embedding_role = False  # a tied embedding/readout keeps the embedding's role (T5)
        self.zero_norms: set[str] = set()  # norms kept at zero (zero-init residual branches)
        self.conventions: dict[tuple[str, str], Convention | None] = {}
        self.fate: dict[int, str] = {}  # id(parameter) -> what init_model does to it
        self.pads: list[nn.Embedding] = []  # tied Embeddings whose padding row is zeroed last
        self.calibration: dict[str, Any] = {}  # auto's correction pass: the batch it ran on, the factors
        self.layers: list[tuple[int, str]] = []  # rows of weight layers: (row index, module name)
        self.deferred: list[tuple[int, Tensor]] = []  # rows whose std is measured with the next ones (_flush)
        self.deferred_ids: set[int] = set()
        self.memo: dict[tuple[Any, ...], Any] = {}  # _check_write's results, by what they depend on
        self.fills = _Fills()  # constant fills of norms and biases, written together
        self.known: dict[Any, Any] = {}  # the sampler's sums of what it wrote (initlab._engine.batched)

    def _add(self, row: dict[str, Any], std: Tensor | float | None) -> None:
        self.rows.append(row)
        self.stds.append(std)

    def _defer(self, row: dict[str, Any], t: Tensor) -> None:
        """A row whose realised std is measured in one batch with the others (:func:`_std_samples`),
        before anything could write ``t`` again (:meth:`_flush`)."""
        self.deferred.append((len(self.rows), t))
        self.deferred_ids.add(id(t))
        self._add(row, None)

    def _flush(self, before: Iterable[Tensor] | None = None) -> None:
        """Measure the deferred stds now; with ``before``, only if one of those tensors (about to be
        written) is among them."""
        if not self.deferred or (before is not None and self.deferred_ids.isdisjoint(map(id, before))):
            return
        for (i, _), v in zip(self.deferred, _std_samples([t for _, t in self.deferred], self.known)):
            self.stds[i] = v
        self.deferred, self.deferred_ids = [], set()

    def reset_others(self, targets: list[tuple[str, nn.Module, str]]) -> None:
        """``reset_parameters()`` of the other parameter-holding modules, first: an activation
        parameter (PReLU's slope) must be initialised before ``auto`` reads it (after
        ``to_empty()`` it is uninitialised memory). Their own code runs: their state is saved."""
        others = [(name, m) for name, m, what in targets if what == "other" and callable(getattr(m, "reset_parameters", None))]
        check_memory([(f"module {name!r}", t) for name, m in others
                      for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))], self.undo.purpose)
        with torch.no_grad():
            for name, module, what in targets:
                if what != "other":
                    continue
                self.undo.save_module(module, f"module {name!r}")
                try:
                    self.reset[name] = _reset_other(module, self.generator)
                except Exception as e:  # noqa: BLE001 - the module's own code, reported in one line
                    raise InitlabError(f"module {name!r} ({type(module).__name__}): reset_parameters() failed "
                                       f"({type(e).__name__}: {e}); leave it out with exclude=[{name!r}]") from e

    def plan(self, targets: list[tuple[str, nn.Module, str]], links: dict[str, LayerLink],
             choices: dict[str, LayerChoice]) -> bool:
        """Check every weight write before any is made; True when all of them are safe."""
        seen = _tie_owners(targets, self.embedding_role)
        for name, module, what in targets:
            if what != "weight":
                continue
            link = links.get(name)
            act = link.activation if link is not None else None
            self.planned[name] = [self._plan_one(name, module, act, choices[name], pname, tensor, blocks, seen)
                                  for pname, tensor, blocks in init_weights(module)]
            _check_bias_fits(name, module, self.bias_mode)
        self._plan_norms(targets)
        return all(p.safe or p.tied_to is not None for ps in self.planned.values() for p in ps)

    def _plan_one(self, name: str, module: nn.Module, act: Activation | None, choice: LayerChoice, pname: str,
                  tensor: Tensor, blocks: int, seen: dict[int, str]) -> _Planned:
        computed, underlying = _computed(module, pname), []
        _weight_slot(name, module, pname, tensor, computed)
        label = _weight_label(name, pname)
        if computed is not None:  # weight norm, spectral norm, pruning: the effective weight is sampled
            tensor, underlying = scratch_for(module, pname, computed)
        try:
            fans = conv1d_fans(module) if is_conv1d(module) else module_fans(module, pname)
        except InitlabError as e:
            raise InitlabError(f"layer {label!r} ({kind_name(module)} {tuple(tensor.shape)}): {e}") from e
        parts = () if tensor.is_meta else row_blocks(tensor, blocks) if blocks > 1 else (tensor,)
        per_module = getattr(choice.scheme, "for_module", None)  # torch_default: torch's rule for this module type
        own = per_module(module, pname) if per_module is not None else None
        choice = choice if own is None else LayerChoice(own, choice.label, choice.gain)
        p = _Planned(name, module, act, choice, pname, tensor, parts, (fans[0], fans[1]), label, blocks,
                     computed=computed, underlying=underlying)
        if seen.get(id(tensor), label) != label:  # written in another role (the readout of a tied pair)
            p.tied_to = seen[id(tensor)]
            return p
        seen[id(tensor)] = label
        _check_write(p, self.generator, self.memo)
        p.safe = p.safe and computed is None
        return p

    def written(self, targets: list[tuple[str, nn.Module, str]]) -> list[tuple[str, Tensor]]:
        """Every tensor the walk will write, labelled, for the undo log."""
        out: list[tuple[str, Tensor]] = []
        for name, module, what in targets:
            if what == "norm":
                out += [(f"norm {name!r}", t) for t in _norm_tensors(module)]
            elif what == "weight":
                out += [(f"layer {p.label!r}", t) for p in self.planned[name] if p.tied_to is None
                        for t in (p.underlying or [p.tensor])]
                if self.bias_mode != "keep":
                    out += [(f"layer {name!r}'s bias", b) for b in init_biases(module)]
        return out

    def _presample(self) -> None:
        """The engine's checked in-place writes, first and together (:func:`initlab._engine.batched`:
        the small tensors fill in parallel, whole); :meth:`_weight` then only reports them."""
        with batched(measure=STD_SAMPLE) as self.known:
            for ps in self.planned.values():
                for p in ps:
                    write = getattr(p.choice.scheme, "write", None)
                    if p.safe and p.tied_to is None and write is not None and p.checked is not None:
                        for part, c in zip(p.parts, p.checked):
                            write(part, c)
                        p.written = True

    def write(self, targets: list[tuple[str, nn.Module, str]]) -> None:
        with torch.no_grad():
            self._presample()
            biases: set[int] = set()
            for name, module, what in targets:
                if what not in ("norm", "weight"):
                    self._settle()  # a module's own code or a convention: it may read or write any tensor
                if what == "norm":
                    self.norm(name, module)
                elif what == "other":
                    self.other(name, module)
                elif what == "pos":
                    self.position(name, module)
                elif what == "rnn":
                    self.recurrent(name, module)
                elif what == "conv":
                    self.convention(name, module)
                else:
                    for p in self.planned[name]:
                        self._weight(p)
                    self._biases(name, module, biases)
            self._settle()
            for m in self.pads:  # a tied Embedding's padding row, after its readout role wrote the weight
                if not m.weight.is_meta:
                    m.weight[m.padding_idx].zero_()

    def _settle(self) -> None:
        """The queued constant fills, then the deferred stds: everything written so far is in place
        and measured (before code that may read or write any tensor runs)."""
        self.fills.write()
        self._flush()

    def norm(self, name: str, module: nn.Module) -> None:
        zero = name in self.zero_norms
        queued = self.fills.norm(module, keep_weight=zero)
        self._flush(queued)  # a deferred std of a tensor about to be filled is measured first
        w = attr(module, "weight")
        has_w = isinstance(w, Tensor)
        label = "kept zeros (zero-init residual)" if zero else "ones/zeros"
        self._add(_row(name, module, tuple(w.shape) if has_w else (), scheme=label,
                       target=0.0 if has_w else None), _constant_std(w) if has_w else None)

    def position(self, name: str, module: nn.Module) -> None:
        """A position Embedding: truncated normal, std 0.02 (see initlab._conventions)."""
        w = module.weight
        if not w.is_meta:
            truncated_normal_(w, TOKEN_STD, generator=self.generator)
            if getattr(module, "padding_idx", None) is not None:
                w[module.padding_idx].zero_()
        self._add(_row(name, module, tuple(w.shape), scheme=self.fate[id(w)], target=TOKEN_STD), _std_sample(w))

    def recurrent(self, name: str, module: nn.Module) -> None:
        """An LSTM/GRU/RNN per gate block (see initlab._conventions); one row per parameter."""
        level = getattr(self.scheme, "level", "tensor")
        sch = get_scheme("lecun_normal") if level == "model" else self.scheme
        bias = None if self.bias_mode == "keep" else float(self.bias_mode) if isinstance(self.bias_mode, float) else 0.0
        params = dict(module.named_parameters(recurse=False))
        if any(t.is_meta for t in params.values()):
            labels = {k: "per gate (meta: not sampled)" for k in params}
        else:
            labels = init_recurrent(module, lambda t, fans: sch(t, fans=fans, generator=self.generator), bias,
                                    self.generator)
        for pname, t in params.items():
            self._add(_row(f"{name}.{pname}", module, tuple(t.shape), scheme=labels[pname]), _std_sample(t))

    def convention(self, name: str, module: nn.Module) -> None:
        """A module without a layer rule or reset_parameters(): each parameter's convention, or untouched."""
        for pname, t in module.named_parameters(recurse=False):
            qual = f"{name}.{pname}" if name else pname
            c = self.conventions.get((name, pname))
            if c is None:
                self._add(_row(qual, module, tuple(t.shape), scheme="untouched", why=self.why(module, pname)), None)
                continue
            if c.apply is not None and not t.is_meta:
                c.apply(t, self.generator)
            target = TOKEN_STD if c.label.startswith("trunc_normal") else None
            self._add(_row(qual, module, tuple(t.shape), scheme=c.label, target=target), _std_sample(t))

    @staticmethod
    def why(module: nn.Module, pname: str) -> str:
        return (f"no rule: {type(module).__name__} is not a known layer, has no reset_parameters() and no "
                f"convention matches {pname!r}")

    def other(self, name: str, module: nn.Module) -> None:
        did = self.reset.get(name, False)
        p = next(module.parameters(recurse=False))
        self._add(_row(name, module, tuple(p.shape), scheme="reset_parameters" if did else "untouched"),
                  _std_sample(p) if did else None)

    def _biases(self, name: str, module: nn.Module, done: set[int]) -> None:
        if self.bias_mode == "keep":
            return
        own = init_biases(module)
        self._flush(own)
        for b in own:
            if id(b) not in done:
                self.fills.put(b, self.bias_mode if isinstance(self.bias_mode, float) else 0.0)
                done.add(id(b))

    def _weight(self, p: _Planned) -> None:
        shape = tuple(p.tensor.shape)
        self.layers.append((len(self.rows), p.name))
        if p.tied_to is not None:
            if isinstance(p.module, nn.Embedding) and p.module.padding_idx is not None:
                self.pads.append(p.module)
            self._add(_row(p.label, p.module, shape, p.fans[0], p.fans[1], p.act, f"tied with {p.tied_to}"), None)
            return
        try:
            write = getattr(p.choice.scheme, "write", None)
            if not p.written:
                self._settle()  # the scheme's own code runs: what came before it is written
            if p.written:
                returned = []
            elif write is not None and p.checked is not None:  # checked in plan: write without checking again
                returned = [write(part, c) for part, c in zip(p.parts, p.checked)]
            else:
                returned = [p.choice.scheme(part, fans=p.fans, generator=self.generator) for part in p.parts]
            self._filled_in_place(p, returned)
        except InitlabError as e:
            raise InitlabError(f"layer {p.label!r} ({kind_name(p.module)} {shape}): {e}") from e
        except Exception as e:  # noqa: BLE001 - a user scheme: one line naming the layer (the model is rolled back)
            if is_out_of_memory(e):
                raise memory_error(f"initialising layer {p.label!r} ({kind_name(p.module)} {shape})",
                                   tensor_bytes(p.tensor), e) from e
            raise InitlabError(f"layer {p.label!r} ({kind_name(p.module)} {shape}): scheme {p.choice.label!r} "
                               f"failed ({type(e).__name__}: {e})") from e
        m = p.module
        if isinstance(m, nn.Embedding) and m.padding_idx is not None and p.pname == "weight" and not p.tensor.is_meta:
            p.tensor[m.padding_idx].zero_()  # as PyTorch does
        bias = self.bias_mode if init_biases(m) else None
        label, effective = p.choice.label, p.tensor
        if p.computed is not None:
            effective = commit(m, p.pname, p.computed, p.tensor)
            label += " (effective weight)"
        self._defer(_row(p.label, m, shape, p.fans[0], p.fans[1], p.act, label, p.target, p.choice.gain, bias),
                    effective)

    def _filled_in_place(self, p: _Planned, returned: list[Any]) -> None:
        """A scheme that returned new tensors and left the weight as it was did nothing: say so."""
        new = [r for r, part in zip(returned, p.parts) if isinstance(r, Tensor) and r.data_ptr() != part.data_ptr()]
        saved = self.undo.saved(p.tensor)
        if new and saved is not None and torch.equal(p.tensor, saved):
            raise InitlabError(f"scheme {p.choice.label!r} returned a new tensor and left the weight unchanged; a scheme "
                               "must fill the tensor it is given in place (e.g. torch.nn.init.normal_, not torch.randn_like)")

    def _plan_norms(self, targets: list[tuple[str, nn.Module, str]]) -> None:
        """Zero-initialised residual norms (torchvision's ``zero_init_residual=True``, timm's
        ``zero_init_last``; Goyal et al. 2017): a norm whose weight and bias are all zeros keeps its
        zeros, unless every norm of the model is zero (uninitialised memory, not a choice). A sharded
        (DTensor) norm always gets ones: each rank sees only its own shard, and after ``to_empty()``
        one rank's memory may hold zeros where another's does not, so a choice made from local values
        could differ between ranks (and deciding from the whole tensor would need a collective)."""
        ws = [(name, w, attr(m, "bias")) for name, m, what in targets
              if what == "norm" and isinstance(w := attr(m, "weight"), Tensor) and not w.is_meta and not is_dtensor(w)]
        nonzero = _any_nonzero([w for _, w, _ in ws])
        zero = {name for (name, w, b), nz in zip(ws, nonzero) if not nz
                and (not isinstance(b, Tensor) or not bool(torch.any(local(b))))}
        self.zero_norms = zero if len(zero) < len(ws) else set()

    def account(self, model: nn.Module, targets: list[tuple[str, nn.Module, str]], left_out: set[str],
                strict: bool | None, modules: Iterable[tuple[str, nn.Module]] | None = None) -> list[dict[str, Any]]:
        """Before any write: what happens to every parameter (one row per parameter name). Raises
        when ``strict`` and a parameter would be left as it is (``strict=None``: only when such a
        parameter is still on the meta device or holds NaN/inf, i.e. is detectably uninitialised).
        ``modules``: ``model.named_modules(remove_duplicate=False)``, when the caller has them."""
        fate = self.fate
        for name, module, what in targets:
            own = dict(module.named_parameters(recurse=False)) if what == "conv" else \
                {k: t for k, t in module._parameters.items() if t is not None}  # only their identities are read
            if what == "weight":
                for p in self.planned[name]:
                    for t in p.underlying or [p.tensor]:
                        fate[id(t)] = f"tied with {p.tied_to}" if p.tied_to else p.choice.label
                bias = "kept (bias='keep')" if self.bias_mode == "keep" else f"bias {self.bias_mode}"
                for b in init_biases(module):
                    fate.setdefault(id(b), bias)
            elif what == "norm":
                for t in own.values():
                    fate[id(t)] = "kept zeros (zero-init residual)" if name in self.zero_norms else "ones/zeros"
            elif what in ("other", "rnn", "pos"):
                label = {"other": "reset_parameters", "rnn": f"per gate ({type(module).__name__})",
                         "pos": "trunc_normal(0.02) (position embedding)"}[what]
                for t in own.values():
                    fate.setdefault(id(t), label)
            else:
                for pname, t in own.items():
                    c = self.conventions[(name, pname)] = param_convention(pname, t, module)
                    if c is not None:
                        fate[id(t)] = c.label
        table = self._param_table(model, left_out, {name: what for name, _, what in targets}, modules)
        _check_strict(table, self._tensors, strict)
        self.undo.save_all([(f"parameter {row['name']!r}", t) for row, t in zip(table, self._tensors)
                            if row["module_kind"] in ("rnn", "pos", "conv") and row["action"] is not None])
        return table

    def _param_table(self, model: nn.Module, left_out: set[str], kinds: dict[str, str],
                     modules: Iterable[tuple[str, nn.Module]] | None = None) -> list[dict[str, Any]]:
        table: list[dict[str, Any]] = []
        self._tensors: list[Tensor] = []
        first: dict[int, str] = {}
        for mname, m in model.named_modules(remove_duplicate=False) if modules is None else modules:
            for pname, t in m._parameters.items():
                if t is None:
                    continue
                qual = f"{mname}.{pname}" if mname else pname
                action = self.fate.get(id(t))
                if action is not None and first.setdefault(id(t), qual) != qual:
                    action = f"{action} (tied with {first[id(t)]})"
                why = None
                if action is None:
                    why = "left out by include/exclude" if mname in left_out else self.why(m, pname)
                table.append({"name": qual, "module": mname, "kind": type(m).__name__, "shape": tuple(t.shape),
                              "action": action, "why": why, "module_kind": kinds.get(mname)})
                self._tensors.append(t)
        return table

    def calibrate(self, model: nn.Module, links: dict[str, LayerLink], batch: Tensor | None) -> None:
        """``auto``'s correction pass (:mod:`initlab._calibrate`) on the layers it drew; their rows
        get the factor (``calibrated``), the corrected gain and target std, the new realised std."""
        only = {name for name, ps in self.planned.items()
                if len(ps) == 1 and ps[0].tied_to is None and ps[0].computed is None and ps[0].pname == "weight"}
        done, kind = calibrate(model, links, only, batch)
        if not done:
            return
        self.calibration = {"batch": kind, "factors": done}
        measured: list[tuple[int, Tensor]] = []
        for i, row in enumerate(self.rows):
            a = done.get(row["name"])
            if a is None:
                continue
            row["calibrated"] = a
            for key in ("gain", "target_std"):
                if isinstance(row.get(key), float):
                    row[key] *= a
            measured.append((i, self.planned[row["name"]][0].tensor))
        for (i, _), v in zip(measured, _std_samples([t for _, t in measured])):
            self.stds[i] = v

    def residual(self, done: dict[str, str], modules: dict[str, nn.Module], params: list[dict[str, Any]]) -> None:
        """The report after a residual policy: the rows and parameters it changed say so."""
        measured: list[tuple[int, Tensor]] = []
        for i, row in enumerate(self.rows):
            if row["name"] in done:
                row["scheme"] = f"{row['scheme']} + {done[row['name']]}"
                measured.append((i, modules[row["name"]].weight))
        for (i, _), v in zip(measured, _std_samples([t for _, t in measured])):
            self.stds[i] = v
        for prow in params:
            mname, _, pname = prow["name"].rpartition(".")
            if pname == "weight" and mname in done and prow["action"] is not None:
                prow["action"] = f"{prow['action']} + {done[mname]}"

    def finish(self) -> list[dict[str, Any]]:
        """The rows, with their realised stds (one host transfer)."""
        for row, s in zip(self.rows, _to_floats(self.stds)):
            row["realised_std"] = s
        return self.rows


_OWN = ("parameters", "named_parameters", "buffers", "named_buffers")


@lru_cache(maxsize=None)
def _plain_members(cls: type) -> bool:
    """Whether a module type lists its own parameters and buffers as ``nn.Module`` does (then
    ``_parameters`` and ``_buffers`` say whether it has any, without building generators)."""
    return all(getattr(cls, f) is getattr(nn.Module, f) for f in _OWN)


def _has_own(m: nn.Module, buffers: bool = False) -> bool:
    """``any(m.parameters(recurse=False))`` (or ``buffers=True``: any parameter or buffer)."""
    if not _plain_members(type(m)):
        return any(True for _ in m.parameters(recurse=False)) or \
            (buffers and any(True for _ in m.buffers(recurse=False)))
    return any(p is not None for p in m._parameters.values()) or \
        (buffers and any(b is not None for b in m._buffers.values()))


def _kind(name: str, m: nn.Module) -> str | None:
    """What the walk does with a module: "weight" (fan-based), "pos" (a position Embedding),
    "norm", "rnn" (per gate), "other" (its reset_parameters), "conv" (a convention per parameter)."""
    row = layer_row(m)
    role = None if row is None else row.role
    if role == "weight" or (type(m).__name__ == "Conv1D" and is_conv1d(m)):
        return "pos" if is_position_embedding(name, m) else "weight"
    if isinstance(m, parametrize.ParametrizationList):  # the originals of a parametrized weight: its layer's
        return None
    if role == "norm":
        return "norm" if _has_own(m, buffers=True) else None
    if not _has_own(m):
        return None
    if isinstance(m, nn.RNNBase):
        return "rnn"
    return "other" if callable(getattr(m, "reset_parameters", None)) else "conv"


def _targets(model: nn.Module, inc: list[Selector] | None, exc: list[Selector] | None,
             modules: Iterable[tuple[str, nn.Module]] | None = None) -> tuple[list[tuple[str, nn.Module, str]], set[str]]:
    """(name, module, kind) in registration order, after include/exclude (see :func:`_kind`), and
    the names of the modules include/exclude left out. ``modules``: ``model.named_modules()``."""
    found = [(name, m, what) for name, m in (model.named_modules() if modules is None else modules)
             if (what := _kind(name, m)) is not None]
    if not found:
        kinds = ", ".join(sorted({c.__name__ for c in WEIGHT_LAYERS}))
        raise InitlabError(f"model {type(model).__name__} has nothing to initialise: no weight layer ({kinds}), "
                           "no normalisation layer and no module with parameters of its own")
    if inc is None and exc is None:
        return found, set()
    out = []
    left_out: set[str] = set()
    inc_used: set[int] = set()
    exc_used: set[int] = set()
    for name, m, what in found:
        inc_hits = {i for i, s in enumerate(inc or ()) if _matches(s, name, m, "include")}
        exc_hits = {i for i, s in enumerate(exc or ()) if _matches(s, name, m, "exclude")}
        inc_used |= inc_hits
        exc_used |= exc_hits
        if (inc is None or inc_hits) and not exc_hits:
            out.append((name, m, what))
        else:
            left_out.add(name)
    names = [n or "<model>" for n, _, _ in found]
    for sels, used_idx, what in ((inc, inc_used, "include"), (exc, exc_used, "exclude")):
        for i, s in enumerate(sels or ()):
            if isinstance(s, str) and i not in used_idx:
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise InitlabError(f"{what} pattern {s!r} matches no initialisable module; modules: {shown}")
    return out, left_out


def _fit(model: nn.Module, batch: Tensor, generator: torch.Generator | None, scheme: Scheme,
         report: InitReport) -> None:
    """A data-dependent scheme's fit (LSUV), after the per-layer initialisation; the rows of the
    layers it fitted say so, with their new realised stds."""
    result = scheme.fit(model, batch, generator)  # type: ignore[misc]
    updates = result.row_updates()
    modules = dict(model.named_modules())
    rows = [row for row in report.rows if row["name"] in updates]
    for row, v in zip(rows, _std_samples([modules[row["name"]].weight for row in rows])):
        row.update(scheme=scheme.name, **updates[row["name"]])
        row["realised_std"] = v
    report.extra[scheme.name] = result


def _branches(model: nn.Module, residual: object) -> tuple[str | None, list[Any], str]:
    """The residual policy, the branches it applies to (an error when none is found) and how they
    were found (the traced graph, or module names when tracing failed)."""
    policy = check_policy(residual)
    branches, how = find_branches(model) if policy else ([], "")
    if policy and not branches:
        raise InitlabError(f"residual={policy!r}: no residual branch found in {type(model).__name__} (by {how}; see "
                           "initlab._residual for what is recognised)")
    return policy, branches, how


def _report(walk: _Walk, links: dict[str, LayerLink], label: str, params: list[dict[str, Any]],
            residual: tuple[str | None, int, str],
            untraced: tuple[nn.Module, list[tuple[str, nn.Module]]] | None = None) -> InitReport:
    """The report; ``extra`` says how auto's correction pass ran and where residual branches came from.
    ``untraced``: the model, written without a trace (its activation column is found on first read),
    and its ``named_modules()``."""
    traced, note, _ = _trace_facts(links)
    report = InitReport(walk.finish(), traced, label, note, params=params)
    if untraced is not None:
        report._pending = _DeferredTrace(untraced[0], walk.layers, untraced[1])
    if walk.calibration:
        report.extra["calibration"] = walk.calibration
    if residual[0]:
        report.extra["residual"] = dict(zip(("policy", "branches", "found_by"), residual))
    return report


def _first_seen(modules: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` from ``model.named_modules(remove_duplicate=False)``: each module
    once, under its first name (a repeated module's subtree holds only modules seen before)."""
    seen: set[int] = set()
    out = []
    for name, m in modules:
        if id(m) not in seen:
            seen.add(id(m))
            out.append((name, m))
    return out


def _check_args(model: object, bias: object, generator: object) -> str | float:
    if not isinstance(model, nn.Module):
        raise InitlabError(f"init_model expects an nn.Module, got {type(model).__name__}")
    bias_mode = _check_bias(bias)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InitlabError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return bias_mode


def init_model(model: nn.Module, scheme: Any = "auto", *, generator: torch.Generator | None = None,
               bias: str | float = "zeros", include: Any = None, exclude: Any = None,
               batch: Tensor | None = None, strict: bool | None = None, residual: str | None = None,
               **scheme_params: Any) -> InitReport:
    """Initialise every weight layer of ``model`` in place and report what was done.

    Args:
        model: any ``nn.Module`` (also one built on ``device="meta"`` and moved with
            ``to_empty()``; on a model still on the meta device nothing is sampled, but the report
            lists the target stds).
        scheme: ``"auto"`` (per-layer choice from the activation that follows, see the module
            docstring), any registry name (``initlab.schemes()``), a ``Scheme`` from
            ``initlab.get_scheme``, ``"lsuv"`` (needs ``batch``), or a function ``f(tensor)``
            filling a tensor in place (given ``fans=`` and ``generator=`` if it takes them, e.g.
            ``torch.nn.init.xavier_normal_``).
        generator: a ``torch.Generator`` for reproducible sampling: the same seed gives identical
            weights whatever ``torch.get_num_threads()``.
        bias: ``"zeros"`` (default), a float constant, or ``"keep"`` for weight-layer biases
            (MultiheadAttention's in_proj_bias, bias_k and bias_v included). Norm layers always get
            weight 1 and bias 0.
        include, exclude: module-name glob patterns (a pattern also selects the module's children:
            ``"head"`` selects ``"head.0"``) or predicates ``f(name, module) -> bool``, or lists of
            them. Each pattern must match at least one module.
        batch: input batch for data-dependent schemes (``"lsuv"``).
        strict: ``True``: raise (nothing written) when any parameter would be left as it is
            (one that include/exclude left out excepted); ``None`` (default): raise only when such
            a parameter is detectably uninitialised: still on the meta device, or holding NaN/inf
            (a meta build moved with ``to_empty()`` and filled with NaN; plain ``to_empty()``
            memory may look finite, so pass ``strict=True`` for meta builds); ``False``: never.
            ``report.params`` says what was done to every parameter, and why any was left.
        residual: a residual-branch policy applied after the per-layer initialisation:
            ``"skipinit"`` (De & Smith 2020: each branch's last norm, else its last projection, is
            zeroed), ``"fixup"`` (Zhang et al. 2019: last layer 0, the others x L^(-1/(2m-2))),
            ``"gpt2"`` (Radford et al. 2019: last projections x 1/sqrt(N), N = 2 n_layer); branches
            from the traced graph, else by module names (:mod:`initlab._residual`).
        **scheme_params: parameters of the scheme (``auto`` takes ``distribution`` and ``mode``).

    All or nothing: every check runs before the first write, and on any failure (or Ctrl-C) the
    model and ``generator`` are left exactly as they were. Writes by initlab's own
    variance-scaling sampler cannot fail once checked, so they are not copied; Ctrl-C during them
    is held back until the model is done (then ``KeyboardInterrupt`` is raised). Other writers
    (orthogonal, LSUV, your own schemes, ``reset_parameters()``) get a copy of what they write.

    Returns:
        An :class:`InitReport`; each row gives the target std sqrt(scale/fan) and the realised one.
    """
    bias_mode = _check_args(model, bias, generator)
    inc, exc = _selectors(include, "include"), _selectors(exclude, "exclude")
    scheme_obj, label = _resolve_scheme(scheme, scheme_params)
    _check_needs(scheme_obj, label, batch, inc, exc)
    unique = _first_seen(every := list(model.named_modules(remove_duplicate=False)))  # one walk for all below
    targets, left_out = _targets(model, inc, exc, unique)
    policy, branches, found_by = _branches(model, residual)
    undo = Undo("undoing init_model on failure")
    undo.save_generator(generator)
    held = deferred_interrupt(release=False)
    with all_or_nothing(undo), keyed(model, generator, modules=every):  # one draw of generator keys every parameter by name
        walk = _Walk(generator, bias_mode, undo)
        walk.scheme, walk.embedding_role = scheme_obj, scaled_tied_readout(model)
        walk.reset_others(targets)
        links = find_activations(model) if (trace := _needs_trace(scheme_obj, policy, targets)) else {}  # else: lazily
        # choices first, outside no_grad (a gain may be computed with autograd)
        sq = 1.0 if not isinstance(batch, Tensor) or not batch.is_floating_point() else float(batch.double().square().mean())
        choices = _choices(targets, links, scheme_obj, label, sq)
        fit, calib = getattr(scheme_obj, "fit", None), bool(getattr(getattr(scheme_obj, "for_layer", None), "calibrate", False))
        safe = walk.plan(targets, links, choices) and fit is None and not (calib and batch is not None)
        params = walk.account(model, targets, left_out, strict, every)
        if not safe:
            undo.save_all(walk.written(targets))
        with held if safe else nullcontext():
            walk.write(targets)
            if calib:
                walk.calibrate(model, links, batch)
            if policy:
                walk.residual(apply_policy(model, policy, branches), dict(model.named_modules()), params)
            report = _report(walk, links, label, params, (policy, len(branches), found_by), None if trace else (model, unique))
        if fit is not None:
            _fit(model, batch, generator, scheme_obj, report)  # type: ignore[arg-type]
    held.release()  # a Ctrl-C held back during the writes: the model is finished, now stop
    return report
