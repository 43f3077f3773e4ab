"""Initialise a whole model: ``init_model`` and its report.

``init_model(model, scheme="auto")`` walks the model in registration order and initialises

* every weight layer (:data:`initlab._graph.WEIGHT_LAYERS`: Linear, Conv1/2/3d, ConvTranspose1/2/3d,
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
did); ``distribution`` and ``mode`` may be passed as scheme parameters. Any other scheme name is
looked up in the registry (``initlab.get_scheme(name, **scheme_params)``) and applied to every
layer. ``"lsuv"`` delegates to ``initlab._lsuv.lsuv_`` and needs ``batch``.
"""
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
from ._graph import _NORMS, WEIGHT_LAYERS, LayerLink, find_activations

__all__ = ["InitReport", "init_model"]

#: realised std is measured on at most this many leading entries of a tensor (relative standard
#: error 1/sqrt(2 * 2**20) = 0.07 %); a full pass over a 4096 x 4096 weight costs ~18 % of sampling it.
STD_SAMPLE = 1 << 20

_AUTO_PARAMS = ("distribution", "mode")
_COLUMNS = ("name", "kind", "shape", "fan_in", "fan_out", "activation", "scheme", "target_std",
            "realised_std")
_TABLE = ("name", "kind", "shape", "fan_in", "fan_out", "activation", "scheme", "gain", "target_std",
          "realised_std")

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
        cells = [list(_TABLE)]
        for r in self.rows:
            cells.append([
                r["name"] or "<model>", r["kind"], "x".join(map(str, r["shape"])) if r["shape"] else "-",
                _fmt(r["fan_in"]), _fmt(r["fan_out"]), r["activation"] or "-", r["scheme"],
                _fmt(r.get("gain")), _fmt(r["target_std"]), _fmt(r["realised_std"]),
            ])
        widths = [max(len(row[i]) for row in cells) for i in range(len(_TABLE))]
        numeric = {3, 4, 7, 8, 9}
        lines = [f"init_model: scheme={self.scheme}, {len(self.rows)} modules"]
        if not self.traced:
            lines.append(f"note: {self.note or 'tracing failed'}; activations were found in module "
                         "registration order (functional activations are invisible)")
        for k, row in enumerate(cells):
            lines.append("  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(row, widths))).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


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
# per-layer choice of ``auto``

@dataclass(frozen=True)
class _Choice:
    label: str  # scheme label in the report
    scale: float  # Var[W] = scale / fan
    gain: float


def _auto_choice(act: Activation | None, distribution: str) -> _Choice:
    """The ``auto`` rule for the activation that follows a layer (None: a readout)."""
    from ._gains import gain

    suffix = distribution  # he_normal / he_uniform / he_truncated_normal, same for lecun
    if act is None or act.auto == "lecun":
        return _Choice(f"lecun_{suffix}", 1.0, 1.0)
    if act.auto == "kumar":
        g = float(gain(act, method="kumar"))
        return _Choice("kumar", g * g, g)
    # relu family, smooth, custom callables; gain() rejects E[phi(z)^2] that is not finite and > 0
    g = float(gain(act, method="second_moment"))
    return _Choice(f"he_{suffix}", g * g, g)


# --------------------------------------------------------------------------------------------
# the walk

def _weight_tensors(module: nn.Module) -> list[tuple[str, Tensor, int]]:
    """(param name, tensor view, blocks) to initialise for a weight layer; MHA in_proj: 3 blocks."""
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            return [("in_proj_weight", module.in_proj_weight, 3)]
        return [(n, getattr(module, n), 1) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
    return [("weight", module.weight, 1)]


def _bias_tensors(module: nn.Module) -> list[Tensor]:
    names = ("in_proj_bias", "bias_k", "bias_v") if isinstance(module, nn.MultiheadAttention) else ("bias",)
    out = []
    for n in names:
        t = getattr(module, n, None)
        if isinstance(t, Tensor):
            out.append(t)
    return out


def _std_sample(t: Tensor) -> Tensor | None:
    if t.is_meta or t.numel() < 2:
        return None
    flat = t.detach().reshape(-1)[:STD_SAMPLE]
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return torch.std(flat)


def _kind(module: nn.Module) -> str:
    for cls in WEIGHT_LAYERS:  # NonDynamicallyQuantizableLinear and user subclasses: the base name
        if isinstance(module, cls):
            return cls.__name__
    return type(module).__name__


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

    if isinstance(scheme, str) and scheme.strip().lower() == "lsuv":
        return _lsuv(model, batch, generator, bias_mode, inc, exc, scheme_params)

    from ._engine import check_distribution, check_mode, target_std, variance_scaling_
    from ._fans import module_fans
    from ._schemes import Scheme, get_scheme

    if isinstance(scheme, Scheme) and scheme.name == "auto":  # get_scheme("auto", ...)
        scheme_params = {**scheme.params, **scheme_params}
        scheme = "auto"
    auto = isinstance(scheme, str) and scheme.strip().lower() == "auto"
    if auto:
        unknown = sorted(set(scheme_params) - set(_AUTO_PARAMS))
        if unknown:
            raise InitlabError(f"scheme 'auto' takes the parameters {', '.join(_AUTO_PARAMS)}; "
                               f"got {', '.join(map(repr, unknown))}")
        mode = check_mode(scheme_params.get("mode", "fan_in"))
        distribution = check_distribution(scheme_params.get("distribution", "normal"))
        scheme_obj = None
        scheme_name = "auto"
    elif isinstance(scheme, str):
        scheme_obj = get_scheme(scheme, **scheme_params)
        scheme_name = _scheme_label(scheme_obj, scheme)
    elif callable(scheme):
        if scheme_params:
            raise InitlabError("scheme parameters are only accepted with a scheme name; "
                               f"got a {type(scheme).__name__} and {sorted(scheme_params)}")
        scheme_obj = scheme
        scheme_name = _scheme_label(scheme_obj, getattr(scheme, "__name__", type(scheme).__name__))
    else:
        raise InitlabError(f"scheme must be a name (see initlab.schemes()), 'auto', 'lsuv' or a Scheme, "
                           f"got {type(scheme).__name__}: {scheme!r}")

    targets = _targets(model, inc, exc)
    # other parameter-holding modules first: an activation parameter (PReLU's slope) must be
    # initialised before ``auto`` reads it (after to_empty() it is uninitialised memory)
    reset: dict[str, bool] = {}
    with torch.no_grad():
        for name, module, what in targets:
            if what == "other":
                reset[name] = _reset_other(module, generator)
    links = find_activations(model)
    traced = all(link.traced for link in links.values())
    note = next((link.note for link in links.values() if not link.traced), "")

    # gains first, outside no_grad (a gain may be computed with autograd); cached per activation
    choices: dict[str, _Choice] = {}
    if auto:
        by_act: dict[tuple[str, float | None] | None, _Choice] = {}
        for name, module, what in targets:
            if what == "weight":
                act = links[name].activation if name in links else None
                key = None if act is None else (act.name, act.param) if not act.custom else (f"custom:{id(act.fn)}", None)
                if key not in by_act:
                    try:
                        by_act[key] = _auto_choice(act, distribution)
                    except InitlabError as e:
                        raise InitlabError(f"layer {name!r} ({_kind(module)}): {e}") from e
                choices[name] = by_act[key]

    rows: list[dict[str, Any]] = []
    stds: list[Tensor | None] = []
    done: dict[int, str] = {}  # id(parameter) -> first module that initialised it (tied weights)
    with torch.no_grad():
        for name, module, what in targets:
            if what == "norm":
                _init_norm(module)
                w = getattr(module, "weight", None)
                rows.append(_row(name, module, tuple(w.shape) if isinstance(w, Tensor) else (), None, None,
                                 None, "ones/zeros", 0.0 if isinstance(w, Tensor) else None, None, None))
                stds.append(_std_sample(w) if isinstance(w, Tensor) else None)
                continue
            if what == "other":
                did = reset[name]
                p = next(module.parameters(recurse=False))
                rows.append(_row(name, module, tuple(p.shape), None, None, None,
                                 "reset_parameters" if did else "untouched", None, None, None))
                stds.append(_std_sample(p) if did else None)
                continue
            link: LayerLink | None = links.get(name)
            act = link.activation if link is not None else None
            for pname, tensor, blocks in _weight_tensors(module):
                if isinstance(tensor, nn.parameter.UninitializedParameter):
                    raise InitlabError(f"layer {name!r} ({_kind(module)}) has uninitialised lazy parameters; "
                                       "run one forward pass before init_model")
                fan_in, fan_out = module_fans(module, pname)
                label = name if pname in ("weight", "in_proj_weight") else f"{name}.{pname}"
                if id(tensor) in done:
                    rows.append(_row(label, module, tuple(tensor.shape), fan_in, fan_out, act,
                                     f"tied to {done[id(tensor)]}", None, None, None))
                    stds.append(None)
                    continue
                done[id(tensor)] = label
                # on the meta device there is nothing to sample: only the targets are reported
                parts = () if tensor.is_meta else tensor.chunk(blocks, 0) if blocks > 1 else (tensor,)
                block_shape = (tensor.shape[0] // blocks, *tensor.shape[1:])
                try:
                    if auto:
                        choice = choices[name]
                        for part in parts:
                            variance_scaling_(part, choice.scale, mode, distribution,
                                              generator=generator, fans=(fan_in, fan_out))
                        target = target_std(choice.scale, mode, (fan_in, fan_out))
                        row_scheme, row_gain = choice.label, choice.gain
                    else:
                        for part in parts:
                            scheme_obj(part, fans=(fan_in, fan_out), generator=generator)
                        target = _scheme_target(scheme_obj, fan_in, fan_out, tuple(parts[0].shape))
                        row_scheme, row_gain = scheme_name, None
                except InitlabError as e:
                    raise InitlabError(f"layer {label!r} ({_kind(module)} {tuple(tensor.shape)}): {e}") from e
                if (isinstance(module, nn.Embedding) and module.padding_idx is not None and pname == "weight"
                        and not tensor.is_meta):
                    tensor[module.padding_idx].zero_()
                rows.append(_row(label, module, tuple(tensor.shape), fan_in, fan_out, act, row_scheme,
                                 target, row_gain, bias_mode if _bias_tensors(module) else None))
                stds.append(_std_sample(tensor))
            if bias_mode != "keep":
                for b in _bias_tensors(module):
                    if id(b) not in done:
                        b.fill_(bias_mode if isinstance(bias_mode, float) else 0.0)
                        done[id(b)] = name
    for row, s in zip(rows, _to_floats(stds)):
        row["realised_std"] = s
    return InitReport(rows, traced, scheme_name, note)


def _row(name: str, module: nn.Module, shape: tuple[int, ...], fan_in: int | None, fan_out: int | None,
         act: Activation | None, scheme: str, target: float | None, gain: float | None,
         bias: str | float | None) -> dict[str, Any]:
    return {"name": name, "kind": _kind(module), "shape": shape, "fan_in": fan_in, "fan_out": fan_out,
            "activation": None if act is None else act.label, "scheme": scheme, "target_std": target, "realised_std": None,
            "gain": gain, "bias": bias}


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


def _init_norm(module: nn.Module) -> None:
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(w, Tensor):
        w.fill_(1.0)
    if isinstance(b, Tensor):
        b.zero_()
    if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
        module.reset_running_stats()


def _targets(model: nn.Module, inc: list[Selector] | None,
             exc: list[Selector] | None) -> list[tuple[str, nn.Module, str]]:
    """(name, module, "weight"|"norm"|"other") in registration order, after include/exclude."""
    found: list[tuple[str, nn.Module, str]] = []
    for name, m in model.named_modules():
        if isinstance(m, WEIGHT_LAYERS):
            found.append((name, m, "weight"))
        elif isinstance(m, _NORMS):
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
        if sels is None:
            continue
        for i, s in enumerate(sels):
            if isinstance(s, str) and i not in used_idx:
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise InitlabError(f"{what} pattern {s!r} matches no initialisable module; modules: {shown}")
    return out


# --------------------------------------------------------------------------------------------
# adapters to the scheme registry

def _scheme_label(scheme: Any, fallback: str) -> str:
    name = getattr(scheme, "name", None)
    return str(name) if isinstance(name, str) else str(fallback)


def _scheme_target(scheme: Any, fan_in: float, fan_out: float, shape: tuple[int, ...]) -> float | None:
    """The scheme's target std for these fans (None for a callable without ``target_std``)."""
    fn = getattr(scheme, "target_std", None)
    if not callable(fn):
        return None
    v = fn((fan_in, fan_out), shape=shape)
    return None if v is None else float(v)


# --------------------------------------------------------------------------------------------
# LSUV

def _lsuv(model: nn.Module, batch: Tensor | None, generator: torch.Generator | None, bias_mode: str | float,
          inc: list[Selector] | None, exc: list[Selector] | None, params: dict[str, Any]) -> InitReport:
    """``auto`` for every module, then LSUV (Mishkin & Matas 2016) on the layers it covers.

    LSUV re-initialises Linear/Conv/ConvTranspose orthogonally, zeroes their biases and rescales
    each so that its output variance on ``batch`` is ``target_var``; the layers it does not cover
    (Embedding, Bilinear, MultiheadAttention in_proj) keep their ``auto`` initialisation.
    """
    if batch is None:
        raise InitlabError("scheme 'lsuv' is data-dependent and needs an input batch: "
                           "init_model(model, 'lsuv', batch=x)")
    if inc is not None or exc is not None:
        raise InitlabError("scheme 'lsuv' initialises every layer; include/exclude are not supported with it")
    from ._lsuv import lsuv_

    report = init_model(model, "auto", generator=generator, bias=bias_mode)
    result = lsuv_(model, batch, generator=generator, **params)
    fitted = {r["layer"] for r in result.rows if r.get("iterations") is not None}
    modules = dict(model.named_modules())
    stds: list[Tensor | None] = []
    rows = []
    with torch.no_grad():
        for row in report.rows:
            if row["name"] in fitted:
                row.update(scheme="lsuv", target_std=None, gain=None, bias="zeros")
                rows.append(row)
                stds.append(_std_sample(modules[row["name"]].weight))
    for row, v in zip(rows, _to_floats(stds)):
        row["realised_std"] = v
    report.scheme = "lsuv"
    report.extra["lsuv"] = result
    return report
