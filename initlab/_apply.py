"""Initialise a whole model: ``init_model`` and its report.

``init_model(model, scheme="auto")`` walks the model in registration order and initialises

* every weight layer (the layer table's :data:`initlab._layers.WEIGHT_LAYERS`: Linear, Conv1/2/3d, ConvTranspose1/2/3d,
  Bilinear, Embedding, MultiheadAttention) with module-aware fans (``initlab._fans.module_fans``):
  MultiheadAttention's fused ``in_proj_weight`` (3E, E) is initialised as three (E, E) blocks
  (q, k, v), its ``out_proj`` as the ``nn.Linear`` it is; an Embedding's ``padding_idx`` row is
  zeroed afterwards, as PyTorch does;
* every normalisation layer (BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm): weight 1,
  bias 0, running statistics reset;
* any other module holding parameters of its own (PReLU, LSTM, ...): its ``reset_parameters()``
  (PyTorch's default), seeded from ``generator`` when one is given; without one the row says
  ``untouched``.

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

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._activations import Activation
from ._errors import InitlabError
from ._fans import module_fans
from ._graph import LayerLink, find_activations
from ._layers import init_biases, init_weights, is_norm, is_weight_layer, kind_name
from ._schemes import LayerChoice, Scheme, get_scheme, scheme_parameters
from ._text import text_table

__all__ = ["InitReport", "init_model"]

#: realised std is measured on at most this many leading entries of a tensor (relative standard
#: error 1/sqrt(2 * 2**20) = 0.07 %); a full pass over a 4096 x 4096 weight costs ~18 % of sampling it.
STD_SAMPLE = 1 << 20

#: the parameters of ``auto`` (read by the lab's config check)
_COLUMNS = ("name", "kind", "shape", "fan_in", "fan_out", "activation", "scheme", "target_std",
            "realised_std")
_TABLE = ("name", "kind", "shape", "fan_in", "fan_out", "activation", "scheme", "gain", "target_std",
          "realised_std")
_NUMERIC = {3, 4, 7, 8, 9}  # right-aligned columns of _TABLE

Selector = str | Callable[[str, nn.Module], bool]


# --------------------------------------------------------------------------------------------
# the report

@dataclass
class InitReport:
    """What ``init_model`` did, one row per initialised module.

    ``rows``: dicts with keys name, kind, shape, fan_in, fan_out, activation, scheme, target_std,
    realised_std (plus gain and bias). ``target_std`` is the std the scheme aims at given the fans,
    ``realised_std`` the sample std measured after sampling (on at most the first ``STD_SAMPLE``
    entries; None on the meta device). ``traced`` is False when the model could not be traced
    with torch.fx and activations were found in module registration order (``note`` says why).
    """

    rows: list[dict[str, Any]]
    traced: bool = True
    scheme: str = "auto"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, name: str) -> dict[str, Any]:
        """The row of module ``name``."""
        for row in self.rows:
            if row["name"] == name:
                return row
        raise KeyError(name)

    def frame(self):  # -> pandas.DataFrame
        """The rows as a pandas DataFrame (pandas is imported only here)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=list(_COLUMNS) + ["gain", "bias"])

    def __repr__(self) -> str:
        return f"InitReport({len(self.rows)} modules, scheme={self.scheme!r}, traced={self.traced})"

    def __str__(self) -> str:
        cells = [[
            r["name"] or "<model>", r["kind"], "x".join(map(str, r["shape"])) if r["shape"] else "-",
            _fmt(r["fan_in"]), _fmt(r["fan_out"]), r["activation"] or "-", r["scheme"],
            _fmt(r.get("gain")), _fmt(r["target_std"]), _fmt(r["realised_std"]),
        ] for r in self.rows]
        lines = [f"init_model: scheme={self.scheme}, {len(self.rows)} modules"]
        if not self.traced:
            lines.append(f"note: {self.note or 'tracing failed'}; activations were found in module "
                         "registration order (functional activations are invisible)")
        lines.append(text_table(_TABLE, cells, right=_NUMERIC))
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _row(name: str, module: nn.Module, shape: tuple[int, ...], fan_in: float | None = None,
         fan_out: float | None = None, act: Activation | None = None, scheme: str = "", target: float | None = None,
         gain: float | None = None, bias: str | float | None = None) -> dict[str, Any]:
    return {"name": name, "kind": kind_name(module), "shape": shape, "fan_in": fan_in, "fan_out": fan_out,
            "activation": None if act is None else act.label, "scheme": scheme, "target_std": target,
            "realised_std": None, "gain": gain, "bias": bias}


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
    elif isinstance(arg, Iterable):
        items = list(arg)
    else:
        items = [arg]
    for s in items:
        if not (isinstance(s, str) or callable(s)):
            raise InitlabError(f"{what} must be module-name glob patterns or predicates "
                               f"f(name, module) -> bool, got {s!r}")
    return list(items)  # type: ignore[arg-type]


def _matches(sel: Selector, name: str, module: nn.Module) -> bool:
    if callable(sel):
        return bool(sel(name, module))
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
        return scheme, _scheme_label(scheme, getattr(scheme, "__name__", type(scheme).__name__))
    raise InitlabError(f"scheme must be a name (see initlab.schemes()), 'auto', 'lsuv' or a Scheme, "
                       f"got {type(scheme).__name__}: {scheme!r}")


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
             label: str) -> dict[str, LayerChoice]:
    """What the scheme does to each weight layer: the scheme itself, or a model-level scheme's
    choice from the activation that follows (computed once per activation)."""
    weights = [(name, module) for name, module, what in targets if what == "weight"]
    for_layer = getattr(scheme, "for_layer", None)
    if for_layer is None:
        same = LayerChoice(scheme, label)
        return {name: same for name, _ in weights}
    by_act: dict[Any, LayerChoice] = {}
    out: dict[str, LayerChoice] = {}
    for name, module in weights:
        act = links[name].activation if name in links else None
        key = ("readout",) if act is None else act.cache_key
        choice = by_act.get(key) if key is not None else None
        if choice is None:
            try:
                choice = for_layer(act)
            except InitlabError as e:
                raise InitlabError(f"layer {name!r} ({kind_name(module)}): {e}") from e
            if key is not None:
                by_act[key] = choice
        out[name] = choice
    return out


# --------------------------------------------------------------------------------------------
# the walk

def _std_sample(t: Tensor) -> Tensor | None:
    if t.is_meta or t.numel() < 2:
        return None
    flat = t.detach().reshape(-1)[:STD_SAMPLE]
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return torch.std(flat)


def _to_floats(stds: list[Tensor | None]) -> list[float | None]:
    """One host transfer per device for all the measured stds."""
    out: list[float | None] = [None] * len(stds)
    by_device: dict[torch.device, list[int]] = {}
    for i, s in enumerate(stds):
        if s is not None:
            by_device.setdefault(s.device, []).append(i)
    for idx in by_device.values():
        values = torch.stack([stds[i].double() for i in idx]).tolist()  # type: ignore[union-attr]
        for i, v in zip(idx, values):
            out[i] = float(v)
    return out


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


def _init_norm(module: nn.Module) -> None:
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(w, Tensor):
        w.fill_(1.0)
    if isinstance(b, Tensor):
        b.zero_()
    if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
        module.reset_running_stats()


class _Walk:
    """One ``init_model`` walk: the generator and bias rule, the report rows written so far with
    their std samples, and the tensors initialised already (tied weights are initialised once)."""

    def __init__(self, generator: torch.Generator | None, bias_mode: str | float) -> None:
        self.generator, self.bias_mode = generator, bias_mode
        self.rows: list[dict[str, Any]] = []
        self.stds: list[Tensor | None] = []
        self.done: dict[int, str] = {}  # id(parameter) -> first module that initialised it
        self.reset: dict[str, bool] = {}  # other modules: whether reset_parameters() ran

    def _add(self, row: dict[str, Any], std: Tensor | None) -> None:
        self.rows.append(row)
        self.stds.append(std)

    def reset_others(self, targets: list[tuple[str, nn.Module, str]]) -> None:
        """``reset_parameters()`` of the other parameter-holding modules, first: an activation
        parameter (PReLU's slope) must be initialised before ``auto`` reads it (after
        ``to_empty()`` it is uninitialised memory)."""
        with torch.no_grad():
            for name, module, what in targets:
                if what == "other":
                    self.reset[name] = _reset_other(module, self.generator)

    def norm(self, name: str, module: nn.Module) -> None:
        _init_norm(module)
        w = getattr(module, "weight", None)
        has_w = isinstance(w, Tensor)
        self._add(_row(name, module, tuple(w.shape) if has_w else (), scheme="ones/zeros",
                       target=0.0 if has_w else None), _std_sample(w) if has_w else None)

    def other(self, name: str, module: nn.Module) -> None:
        did = self.reset[name]
        p = next(module.parameters(recurse=False))
        self._add(_row(name, module, tuple(p.shape), scheme="reset_parameters" if did else "untouched"),
                  _std_sample(p) if did else None)

    def weight_layer(self, name: str, module: nn.Module, act: Activation | None, choice: LayerChoice) -> None:
        for pname, tensor, blocks in init_weights(module):
            self._weight(name, module, act, choice, pname, tensor, blocks)
        if self.bias_mode != "keep":
            for b in init_biases(module):
                if id(b) not in self.done:
                    b.fill_(self.bias_mode if isinstance(self.bias_mode, float) else 0.0)
                    self.done[id(b)] = name

    def _weight(self, name: str, module: nn.Module, act: Activation | None, choice: LayerChoice, pname: str,
                tensor: Tensor, blocks: int) -> None:
        if isinstance(tensor, nn.parameter.UninitializedParameter):
            raise InitlabError(f"layer {name!r} ({kind_name(module)}) has uninitialised lazy parameters; "
                               "run one forward pass before init_model")
        fan_in, fan_out = module_fans(module, pname)
        label = name if pname in ("weight", "in_proj_weight") else f"{name}.{pname}"
        shape = tuple(tensor.shape)
        if id(tensor) in self.done:
            self._add(_row(label, module, shape, fan_in, fan_out, act, f"tied to {self.done[id(tensor)]}"), None)
            return
        self.done[id(tensor)] = label
        # on the meta device there is nothing to sample: only the targets are reported
        parts = () if tensor.is_meta else tensor.chunk(blocks, 0) if blocks > 1 else (tensor,)
        block_shape = (shape[0] // blocks, *shape[1:])
        try:
            for part in parts:
                choice.scheme(part, fans=(fan_in, fan_out), generator=self.generator)
            target = _scheme_target(choice.scheme, fan_in, fan_out, block_shape)
        except InitlabError as e:
            raise InitlabError(f"layer {label!r} ({kind_name(module)} {shape}): {e}") from e
        if isinstance(module, nn.Embedding) and module.padding_idx is not None and pname == "weight" \
                and not tensor.is_meta:
            tensor[module.padding_idx].zero_()  # as PyTorch does
        bias = self.bias_mode if init_biases(module) else None
        self._add(_row(label, module, shape, fan_in, fan_out, act, choice.label, target, choice.gain, bias),
                  _std_sample(tensor))

    def finish(self) -> list[dict[str, Any]]:
        """The rows, with their realised stds (one host transfer)."""
        for row, s in zip(self.rows, _to_floats(self.stds)):
            row["realised_std"] = s
        return self.rows


def _targets(model: nn.Module, inc: list[Selector] | None,
             exc: list[Selector] | None) -> list[tuple[str, nn.Module, str]]:
    """(name, module, "weight"|"norm"|"other") in registration order, after include/exclude."""
    found: list[tuple[str, nn.Module, str]] = []
    for name, m in model.named_modules():
        if is_weight_layer(m):
            found.append((name, m, "weight"))
        elif is_norm(m):
            if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
                found.append((name, m, "norm"))
        elif any(True for _ in m.parameters(recurse=False)):
            found.append((name, m, "other"))
    out = []
    inc_used: set[int] = set()
    exc_used: set[int] = set()
    for name, m, what in found:
        inc_hits = {i for i, s in enumerate(inc or ()) if _matches(s, name, m)}
        exc_hits = {i for i, s in enumerate(exc or ()) if _matches(s, name, m)}
        inc_used |= inc_hits
        exc_used |= exc_hits
        if (inc is None or inc_hits) and not exc_hits:
            out.append((name, m, what))
    names = [n or "<model>" for n, _, _ in found]
    for sels, used_idx, what in ((inc, inc_used, "include"), (exc, exc_used, "exclude")):
        for i, s in enumerate(sels or ()):
            if isinstance(s, str) and i not in used_idx:
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise InitlabError(f"{what} pattern {s!r} matches no initialisable module; modules: {shown}")
    return out


def _fit(model: nn.Module, batch: Tensor, generator: torch.Generator | None, scheme: Scheme,
         report: InitReport) -> None:
    """A data-dependent scheme's fit (LSUV), after the per-layer initialisation; the rows of the
    layers it fitted say so, with their new realised stds."""
    result = scheme.fit(model, batch, generator)  # type: ignore[misc]
    updates = result.row_updates()
    modules = dict(model.named_modules())
    rows = [row for row in report.rows if row["name"] in updates]
    with torch.no_grad():
        stds = [_std_sample(modules[row["name"]].weight) for row in rows]
    for row, v in zip(rows, _to_floats(stds)):
        row.update(scheme=scheme.name, **updates[row["name"]])
        row["realised_std"] = v
    report.extra[scheme.name] = result


def init_model(model: nn.Module, scheme: Any = "auto", *, generator: torch.Generator | None = None,
               bias: str | float = "zeros", include: Any = None, exclude: Any = None,
               batch: Tensor | None = None, **scheme_params: Any) -> InitReport:
    """Initialise every weight layer of ``model`` in place and report what was done.

    Args:
        model: any ``nn.Module`` (also one built on ``device="meta"`` and moved with
            ``to_empty()``; on a model still on the meta device nothing is sampled, but the report
            lists the target stds).
        scheme: ``"auto"`` (per-layer choice from the activation that follows, see the module
            docstring), any registry name (``initlab.schemes()``), a ``Scheme`` from
            ``initlab.get_scheme``, or ``"lsuv"`` (needs ``batch``).
        generator: a ``torch.Generator`` for reproducible sampling: the same seed gives identical
            weights whatever ``torch.get_num_threads()``.
        bias: ``"zeros"`` (default), a float constant, or ``"keep"`` for weight-layer biases
            (MultiheadAttention's in_proj_bias, bias_k and bias_v included). Norm layers always get
            weight 1 and bias 0.
        include, exclude: module-name glob patterns (a pattern also selects the module's children:
            ``"head"`` selects ``"head.0"``) or predicates ``f(name, module) -> bool``, or lists of
            them. Each pattern must match at least one module.
        batch: input batch for data-dependent schemes (``"lsuv"``).
        **scheme_params: parameters of the scheme (``auto`` takes ``distribution`` and ``mode``).

    Returns:
        An :class:`InitReport`; each row gives the target std sqrt(scale/fan) and the realised one.
    """
    if not isinstance(model, nn.Module):
        raise InitlabError(f"init_model expects an nn.Module, got {type(model).__name__}")
    bias_mode = _check_bias(bias)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InitlabError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    inc, exc = _selectors(include, "include"), _selectors(exclude, "exclude")
    scheme_obj, label = _resolve_scheme(scheme, scheme_params)
    _check_needs(scheme_obj, label, batch, inc, exc)

    targets = _targets(model, inc, exc)
    walk = _Walk(generator, bias_mode)
    walk.reset_others(targets)
    links = find_activations(model)
    traced = all(link.traced for link in links.values())
    note = next((link.note for link in links.values() if not link.traced), "")
    # choices first, outside no_grad (a gain may be computed with autograd)
    choices = _choices(targets, links, scheme_obj, label)
    with torch.no_grad():
        for name, module, what in targets:
            if what == "norm":
                walk.norm(name, module)
            elif what == "other":
                walk.other(name, module)
            else:
                link = links.get(name)
                walk.weight_layer(name, module, link.activation if link is not None else None, choices[name])
    report = InitReport(walk.finish(), traced, label, note)
    if getattr(scheme_obj, "fit", None) is not None:
        _fit(model, batch, generator, scheme_obj, report)  # type: ignore[arg-type]
    return report
