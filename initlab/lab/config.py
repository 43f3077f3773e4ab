"""Experiments as config: the TOML schema, its validation, grid expansion and the presets.

An experiment file::

    name = "classic"
    description = "784-100-100-10 MNIST MLP: N(0,1) vs Xavier vs He, sigmoid and ReLU"

    [data]        # name: mnist | mnist_idx | gaussian | digits
    name = "mnist"
    root = ""             # a folder of MNIST IDX files ("" = the embedded 5k sample)
    standardize = false
    test_fraction = 0.2
    split_seed = 0
    limit = 0             # at most this many examples (0 = all)

    [model]       # kind: mlp | cnn
    kind = "mlp"
    widths = [784, 100, 100, 10]   # or hidden = [100, 100]: input and output sizes from the data
    bias = true
    # cnn only: channels = [16, 32], kernel = 3 (widths then = [inputs, dense hidden..., classes])

    [train]
    optimizer = "adam"    # adam | sgd
    lr = 1e-3
    batch_size = 30
    steps = 1000
    log_every = 50
    first_pass_batch = 100
    device = "cpu"
    seeds = [0, 1, 2]     # or a count: seeds = 3 -> [0, 1, 2]

    [[scenarios]]         # explicit scenarios ...
    name = "sigmoid-normal"        # optional; default "<activation>-<scheme>[-d<depth>][-w<width>]"
    activation = "sigmoid"
    scheme = "normal"
    params = {}                    # scheme parameters, e.g. { std = 0.5 }
    # widths = [...] or depth = 5 / width = 200: this scenario's model

    [grid]                # ... and/or a grid: the cartesian product, activation-major
    activations = ["tanh", "relu"]
    schemes = ["xavier_normal", "he_normal"]
    depths = [2, 5, 10]            # optional: number of hidden layers
    widths = [100]                 # optional: hidden width
    params = {}                    # optional: scheme parameters for every grid scenario

Validation errors name the key path and the expected type ("train.lr: expected a number,
got 'fast'"); unknown keys, schemes, activations and data sets are errors with a "did you mean";
a malformed file gives its name, line and column.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .._errors import InitlabError, closest, unknown_choice
from .data import DATASET_SHAPES, DATASETS, N_CLASSES
from .models import MODEL_KINDS

__all__ = [
    "DataSpec",
    "ModelSpec",
    "TrainSpec",
    "Scenario",
    "Experiment",
    "load_experiment",
    "experiment_from_dict",
    "experiment_to_dict",
    "experiment_to_toml",
    "with_overrides",
    "config_fingerprint",
    "list_presets",
    "preset_names",
    "OPTIMIZERS",
]

OPTIMIZERS = ("adam", "sgd")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]{0,119}$")


# ----------------------------------------------------------------------------- typed value checks


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(path: str, expected: str, v: Any) -> InitlabError:
    return InitlabError(f"{path}: expected {expected}, got {_show(v)}")


def _int(v: Any, path: str, *, minimum: int | None = None) -> int:
    if isinstance(v, float) and not isinstance(v, bool) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(path, "an integer", v)
    if minimum is not None and v < minimum:
        raise _fail(path, f"an integer >= {minimum}", v)
    return int(v)


def _number(v: Any, path: str, *, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(path, "a number", v)
    v = float(v)
    if not math.isfinite(v):
        raise _fail(path, "a finite number", v)
    if positive and not v > 0:
        raise _fail(path, "a number > 0", v)
    return v


def _bool(v: Any, path: str) -> bool:
    if not isinstance(v, bool):
        raise _fail(path, "true or false", v)
    return v


def _str(v: Any, path: str, *, nonempty: bool = False) -> str:
    if not isinstance(v, str):
        raise _fail(path, "a string", v)
    if nonempty and not v.strip():
        raise _fail(path, "a non-empty string", v)
    return v


def _list(v: Any, path: str, what: str) -> list:
    if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, (list, tuple)):
        raise _fail(path, f"a list of {what}", v)
    return list(v)


def _ints(v: Any, path: str, *, minimum: int, min_len: int = 1) -> tuple[int, ...]:
    items = _list(v, path, "integers")
    if len(items) < min_len:
        raise _fail(path, f"a list of at least {min_len} integer{'s' if min_len > 1 else ''}", v)
    return tuple(_int(x, f"{path}[{i}]", minimum=minimum) for i, x in enumerate(items))


def _table(v: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise _fail(path, "a table", v)
    return v


def _check_keys(d: Mapping[str, Any], valid: Iterable[str], path: str) -> None:
    valid = list(valid)
    for key in d:
        if key not in valid:
            where = f"{path}.{key}" if path else str(key)
            hint = closest(str(key), valid)
            msg = f"{where}: unknown key {key!r}"
            if hint is not None:
                msg += f"; did you mean {hint!r}?"
            raise InitlabError(msg + f" Valid keys{' in [' + path + ']' if path else ''}: {', '.join(valid)}")


def _param_value(v: Any, path: str) -> Any:
    if isinstance(v, (bool, int, float, str)):
        if isinstance(v, float) and not math.isfinite(v):
            raise _fail(path, "a finite number", v)
        return v
    if isinstance(v, (list, tuple)):
        return tuple(_param_value(x, f"{path}[{i}]") for i, x in enumerate(v))
    raise _fail(path, "a number, string, boolean or list", v)


def _params(v: Any, path: str) -> tuple[tuple[str, Any], ...]:
    if isinstance(v, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in v):
        v = dict(v)
    t = _table(v, path)
    return tuple(sorted((str(k), _param_value(x, f"{path}.{k}")) for k, x in t.items()))


# ----------------------------------------------------------------------------- activation and scheme names


def _activation(v: Any, path: str) -> str:
    """Canonical table name of an activation (aliases resolved); errors say the path."""
    from .._activations import resolve_activation

    name = _str(v, path, nonempty=True)
    try:
        return resolve_activation(name).name
    except InitlabError as e:
        raise InitlabError(f"{path}: {e}") from None


def _scheme(v: Any, params: tuple[tuple[str, Any], ...], path: str, activation: str | None = None
            ) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """The scheme name and its parameters, checked against the registry (when installed).

    A registry scheme with an ``activation`` parameter (``he_normal``, ``kumar``, ...) that the
    scenario leaves unset gets the scenario's activation, so that the gain always matches the
    network (the resolved value is written out in the canonical config).
    """
    name = _str(v, path, nonempty=True).strip()
    low = name.lower()
    kw = dict(params)
    ppath = path.rsplit(".", 1)[0] + ".params" if "." in path else "params"
    if low == "lsuv":
        _check_params_against(_lsuv_params(), kw, "lsuv", ppath)
        return "lsuv", params
    if low == "auto":
        _check_params_against(_auto_params(), kw, "auto", ppath)
        return "auto", params
    _schemes = _optional_module("initlab._schemes")
    if _schemes is None:  # the scheme registry is not part of this installation: no check
        return name, params
    valid = list(_schemes.schemes())
    if name not in valid and low in valid:
        name = low
    if name not in valid:
        raise InitlabError(f"{path}: {unknown_choice('scheme', name, valid + ['auto', 'lsuv'])}")
    try:
        scheme = _schemes.get_scheme(name, **kw)
    except InitlabError as e:
        raise InitlabError(f"{ppath}: {e}") from None
    except TypeError as e:
        raise InitlabError(f"{ppath}: scheme {name!r} rejects these parameters ({e})") from None
    defaults = getattr(scheme, "params", None)
    if activation is not None and isinstance(defaults, Mapping) and "activation" in defaults and "activation" not in kw:
        kw["activation"] = activation
        try:
            _schemes.get_scheme(name, **kw)
        except (InitlabError, TypeError) as e:
            raise InitlabError(f"{path}: scheme {name!r} does not fit activation {activation!r}: {e}") from None
    return name, tuple(sorted(kw.items()))


def _optional_module(name: str) -> Any:
    """The module, or None when it is not part of this installation (other import errors propagate)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


def _lsuv_params() -> tuple[str, ...] | None:
    import inspect

    mod = _optional_module("initlab._lsuv")
    if mod is None or not hasattr(mod, "lsuv_"):
        return None
    sig = inspect.signature(mod.lsuv_)
    return tuple(p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY and p.name != "generator")


def _auto_params() -> tuple[str, ...] | None:
    mod = _optional_module("initlab._apply")
    valid = getattr(mod, "_AUTO_PARAMS", None)
    return None if valid is None else tuple(valid)


def _check_params_against(valid: tuple[str, ...] | None, kw: Mapping[str, Any], scheme: str, path: str) -> None:
    if valid is None:
        return
    for key in kw:
        if key not in valid:
            hint = closest(key, valid)
            msg = f"{path}.{key}: unknown parameter {key!r} of scheme {scheme!r}"
            if hint is not None:
                msg += f"; did you mean {hint!r}?"
            raise InitlabError(msg + f" Valid parameters: {', '.join(valid) or '(none)'}")


# ----------------------------------------------------------------------------- the specs


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class DataSpec:
    """The ``[data]`` table: which data set and how to split it (see :func:`initlab.lab.data.load_dataset`)."""

    name: str = "mnist"
    root: str = ""
    standardize: bool = False
    test_fraction: float = 0.2
    split_seed: int = 0
    limit: int = 0

    def __post_init__(self) -> None:
        name = _str(self.name, "data.name", nonempty=True).strip().lower()
        if name not in DATASETS:
            raise InitlabError(f"data.name: {unknown_choice('data set', name, DATASETS)}")
        _set(self, "name", name)
        root = self.root
        if isinstance(root, Path):
            root = str(root)
        _set(self, "root", _str("" if root is None else root, "data.root"))
        _set(self, "standardize", _bool(self.standardize, "data.standardize"))
        tf = _number(self.test_fraction, "data.test_fraction")
        if not 0.0 < tf < 1.0:
            raise _fail("data.test_fraction", "a number between 0 and 1 (exclusive)", self.test_fraction)
        _set(self, "test_fraction", tf)
        _set(self, "split_seed", _int(self.split_seed, "data.split_seed", minimum=0))
        _set(self, "limit", _int(self.limit, "data.limit", minimum=0))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one example."""
        return DATASET_SHAPES[self.name]

    @property
    def input_dim(self) -> int:
        """C * H * W."""
        return int(math.prod(self.input_shape))


@dataclass(frozen=True)
class ModelSpec:
    """The ``[model]`` table. ``widths`` = (inputs, hidden..., classes); ``cnn`` adds conv ``channels`` and ``kernel``
    before the dense layers ``widths[1:]`` (see :func:`initlab.lab.models.build_model`)."""

    kind: str = "mlp"
    widths: tuple[int, ...] = (784, 100, 100, 10)
    bias: bool = True
    channels: tuple[int, ...] = ()
    kernel: int = 3

    def __post_init__(self) -> None:
        kind = _str(self.kind, "model.kind", nonempty=True).strip().lower()
        if kind not in MODEL_KINDS:
            raise InitlabError(f"model.kind: {unknown_choice('model kind', kind, MODEL_KINDS)}")
        _set(self, "kind", kind)
        _set(self, "widths", _ints(self.widths, "model.widths", minimum=1, min_len=2))
        _set(self, "bias", _bool(self.bias, "model.bias"))
        channels = _ints(self.channels, "model.channels", minimum=1, min_len=0)
        kernel = _int(self.kernel, "model.kernel", minimum=1)
        if kind == "cnn":
            if not channels:
                raise _fail("model.channels", "a non-empty list of integers for kind = 'cnn'", list(channels))
            from .models import image_shape

            image_shape(self.widths[0])  # square single-channel input
        elif channels:
            raise InitlabError(f"model.channels: only used with kind = 'cnn' (kind is {kind!r}); remove it")
        elif kernel != 3:
            raise InitlabError(f"model.kernel: only used with kind = 'cnn' (kind is {kind!r}); remove it")
        _set(self, "channels", channels)
        _set(self, "kernel", kernel)

    @property
    def depth(self) -> int:
        """Number of hidden (dense) layers."""
        return len(self.widths) - 2


@dataclass(frozen=True)
class TrainSpec:
    """The ``[train]`` table: optimiser, learning rate, batch size, steps, logging, seeds."""

    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 30
    steps: int = 1000
    log_every: int = 50
    first_pass_batch: int = 100
    device: str = "cpu"
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        opt = _str(self.optimizer, "train.optimizer", nonempty=True).strip().lower()
        if opt not in OPTIMIZERS:
            raise InitlabError(f"train.optimizer: {unknown_choice('optimizer', opt, OPTIMIZERS)}")
        _set(self, "optimizer", opt)
        _set(self, "lr", _number(self.lr, "train.lr", positive=True))
        for key in ("batch_size", "steps", "log_every", "first_pass_batch"):
            _set(self, key, _int(getattr(self, key), f"train.{key}", minimum=1))
        if self.log_every > self.steps:
            raise _fail("train.log_every", f"at most train.steps ({self.steps})", self.log_every)
        device = _str(self.device, "train.device", nonempty=True).strip()
        try:
            import torch

            torch.device(device)
        except (RuntimeError, ValueError) as e:
            raise _fail("train.device", "a device such as 'cpu', 'cuda' or 'cuda:0'", device) from e
        _set(self, "device", device)
        seeds = self.seeds
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = tuple(range(_int(seeds, "train.seeds", minimum=1)))
        seeds = _ints(seeds, "train.seeds", minimum=0, min_len=1)
        dup = sorted({s for s in seeds if seeds.count(s) > 1})
        if dup:
            raise InitlabError(f"train.seeds: seed {dup[0]} appears twice in {list(seeds)}")
        _set(self, "seeds", seeds)


@dataclass(frozen=True)
class Scenario:
    """One initialisation scenario: an activation, a scheme (+ parameters) and its fully resolved model."""

    name: str
    activation: str
    scheme: str
    params: tuple[tuple[str, Any], ...] = ()
    model: ModelSpec = field(default_factory=ModelSpec)

    def __post_init__(self) -> None:
        where = f"scenario {self.name!r}"
        name = _str(self.name, f"{where}.name", nonempty=True)
        if not _NAME_RE.match(name):
            raise InitlabError(f"{where}.name: expected letters, digits and _ . + = - (it names files and "
                               f"folders; at most 120 characters), got {name!r}")
        params = _params(self.params, f"{where}.params")
        _set(self, "activation", _activation(self.activation, f"{where}.activation"))
        scheme, params = _scheme(self.scheme, params, f"{where}.scheme", self.activation)
        _set(self, "scheme", scheme)
        _set(self, "params", params)
        if not isinstance(self.model, ModelSpec):
            raise _fail(f"{where}.model", "a ModelSpec", self.model)


@dataclass(frozen=True)
class Experiment:
    """A whole experiment: data, base model, training, and the scenarios (each with its resolved model)."""

    name: str
    description: str
    data: DataSpec
    model: ModelSpec
    train: TrainSpec
    scenarios: tuple[Scenario, ...]

    def __post_init__(self) -> None:
        _str(self.name, "name", nonempty=True)
        _str(self.description, "description")
        for key, cls in (("data", DataSpec), ("model", ModelSpec), ("train", TrainSpec)):
            if not isinstance(getattr(self, key), cls):
                raise _fail(key, f"a {cls.__name__}", getattr(self, key))
        scenarios = tuple(self.scenarios)
        if not scenarios:
            raise InitlabError("scenarios: the experiment has no scenarios; add [[scenarios]] tables or a [grid]")
        _check_model_fits_data(self.model, self.data, "model.widths")
        seen: set[str] = set()
        for i, s in enumerate(scenarios):
            if not isinstance(s, Scenario):
                raise _fail(f"scenarios[{i}]", "a Scenario", s)
            if s.name.lower() in seen:
                raise InitlabError(f"scenarios[{i}].name: duplicate scenario name {s.name!r} "
                                   "(names name folders, so they must differ in more than letter case)")
            seen.add(s.name.lower())
            _check_model_fits_data(s.model, self.data, f"scenarios[{i}].widths")
        _set(self, "scenarios", scenarios)

    @property
    def n_runs(self) -> int:
        """Number of models trained: scenarios x seeds."""
        return len(self.scenarios) * len(self.train.seeds)


def _check_model_fits_data(model: ModelSpec, data: DataSpec, path: str) -> None:
    if model.widths[0] != data.input_dim:
        raise InitlabError(f"{path}[0]: expected {data.input_dim} (the input size of data set {data.name!r}), "
                           f"got {model.widths[0]}")
    if model.widths[-1] != N_CLASSES:
        raise InitlabError(f"{path}[-1]: expected {N_CLASSES} (the number of classes of {data.name!r}), "
                           f"got {model.widths[-1]}")


# ----------------------------------------------------------------------------- dict -> Experiment

_TOP_KEYS = ("name", "description", "data", "model", "train", "scenarios", "grid")
_DATA_KEYS = ("name", "root", "standardize", "test_fraction", "split_seed", "limit")
_MODEL_KEYS = ("kind", "widths", "hidden", "bias", "channels", "kernel")
_TRAIN_KEYS = ("optimizer", "lr", "batch_size", "steps", "log_every", "first_pass_batch", "device", "seeds")
_SCENARIO_KEYS = ("name", "activation", "scheme", "params", "widths", "depth", "width")
_GRID_KEYS = ("activations", "schemes", "depths", "widths", "params")


def _resolve_widths(base: ModelSpec, path: str, widths: Any = None, depth: Any = None, width: Any = None
                    ) -> tuple[int, ...]:
    """A scenario's widths: explicit ``widths``, or the base model with ``depth`` hidden layers of ``width``."""
    if widths is not None:
        if depth is not None or width is not None:
            raise InitlabError(f"{path}: give either widths or depth/width, not both")
        return _ints(widths, f"{path}.widths", minimum=1, min_len=2)
    if depth is None and width is None:
        return base.widths
    d = base.depth if depth is None else _int(depth, f"{path}.depth", minimum=1)
    if width is None:
        if base.depth < 1:
            raise InitlabError(f"{path}.depth: the base model.widths {list(base.widths)} has no hidden layer to "
                               "repeat; give a width too")
        if len(set(base.widths[1:-1])) > 1:
            raise InitlabError(f"{path}.depth: the base model's hidden widths {list(base.widths[1:-1])} differ; "
                               "give a width too")
        w = base.widths[1]
    else:
        w = _int(width, f"{path}.width", minimum=1)
    return (base.widths[0], *([w] * d), base.widths[-1])


def _auto_name(activation: str, scheme: str, depth: int | None, width: int | None) -> str:
    name = f"{activation}-{scheme}"
    if depth is not None:
        name += f"-d{depth}"
    if width is not None:
        name += f"-w{width}"
    return name


def _scenario_model(base: ModelSpec, widths: tuple[int, ...]) -> ModelSpec:
    return replace(base, widths=widths)


def _parse_model(raw: Mapping[str, Any], data: DataSpec) -> ModelSpec:
    _check_keys(raw, _MODEL_KEYS, "model")
    kw = {k: raw[k] for k in ("kind", "bias", "channels", "kernel") if k in raw}
    if "widths" in raw and "hidden" in raw:
        raise InitlabError("model: give either widths or hidden, not both")
    if "hidden" in raw:
        hidden = _ints(raw["hidden"], "model.hidden", minimum=1, min_len=0)
        kw["widths"] = (data.input_dim, *hidden, N_CLASSES)
    elif "widths" in raw:
        kw["widths"] = raw["widths"]
    else:
        kw["widths"] = (data.input_dim, 100, 100, N_CLASSES)
    return ModelSpec(**kw)


def _parse_scenarios(raw: Any, base: ModelSpec) -> list[Scenario]:
    out = []
    for i, item in enumerate(_list(raw, "scenarios", "tables ([[scenarios]])")):
        path = f"scenarios[{i}]"
        item = _table(item, path)
        _check_keys(item, _SCENARIO_KEYS, path)
        for key in ("activation", "scheme"):
            if key not in item:
                raise InitlabError(f"{path}.{key}: missing (each scenario needs an activation and a scheme)")
        params = _params(item.get("params", {}), f"{path}.params")
        activation = _activation(item["activation"], f"{path}.activation")
        scheme, params = _scheme(item["scheme"], params, f"{path}.scheme", activation)
        widths = _resolve_widths(base, path, item.get("widths"), item.get("depth"), item.get("width"))
        if "name" in item:
            name = _str(item["name"], f"{path}.name", nonempty=True)
        else:
            name = _auto_name(activation, scheme,
                              _int(item["depth"], f"{path}.depth") if "depth" in item else None,
                              _int(item["width"], f"{path}.width") if "width" in item else None)
        if not _NAME_RE.match(name):
            raise InitlabError(f"{path}.name: expected letters, digits and _ . + = - (it names files and folders), "
                               f"got {name!r}")
        out.append(Scenario(name, activation, scheme, params, _scenario_model(base, widths)))
    return out


def _parse_grid(raw: Any, base: ModelSpec) -> list[Scenario]:
    grid = _table(raw, "grid")
    _check_keys(grid, _GRID_KEYS, "grid")
    for key in ("activations", "schemes"):
        if key not in grid:
            raise InitlabError(f"grid.{key}: missing (a grid needs activations and schemes)")
    params = _params(grid.get("params", {}), "grid.params")
    acts = [_activation(a, f"grid.activations[{i}]") for i, a in enumerate(_list(grid["activations"], "grid.activations", "strings"))]
    schemes = _list(grid["schemes"], "grid.schemes", "strings")
    if not acts or not schemes:
        raise InitlabError(f"grid.{'activations' if not acts else 'schemes'}: expected a non-empty list")
    depths: list[int | None] = list(_ints(grid["depths"], "grid.depths", minimum=1)) if "depths" in grid else [None]
    widths: list[int | None] = list(_ints(grid["widths"], "grid.widths", minimum=1)) if "widths" in grid else [None]
    out = []
    for act in acts:
        for i, raw_scheme in enumerate(schemes):
            scheme, sparams = _scheme(raw_scheme, params, f"grid.schemes[{i}]", act)
            for d in depths:
                for w in widths:
                    ws = _resolve_widths(base, "grid", None, d, w)
                    out.append(Scenario(_auto_name(act, scheme, d, w), act, scheme, sparams, _scenario_model(base, ws)))
    return out


def experiment_from_dict(d: Mapping[str, Any], *, default_name: str = "experiment") -> Experiment:
    """Validate a parsed TOML document (a dict) and build the :class:`Experiment`.

    Missing tables and keys take the defaults of the dataclasses (the classic study's training
    settings); ``[[scenarios]]`` and ``[grid]`` may both be given (explicit scenarios first).
    """
    d = _table(d, "the experiment")
    _check_keys(d, _TOP_KEYS, "")
    name = _str(d.get("name", default_name), "name", nonempty=True)
    description = _str(d.get("description", ""), "description")
    raw_data = _table(d.get("data", {}), "data")
    _check_keys(raw_data, _DATA_KEYS, "data")
    data = DataSpec(**raw_data)
    model = _parse_model(_table(d.get("model", {}), "model"), data)
    raw_train = _table(d.get("train", {}), "train")
    _check_keys(raw_train, _TRAIN_KEYS, "train")
    train = TrainSpec(**raw_train)
    scenarios: list[Scenario] = []
    if "scenarios" in d:
        scenarios += _parse_scenarios(d["scenarios"], model)
    if "grid" in d:
        scenarios += _parse_grid(d["grid"], model)
    return Experiment(name, description, data, model, train, tuple(scenarios))


# ----------------------------------------------------------------------------- Experiment -> dict / TOML


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, tuple) else v


def experiment_to_dict(exp: Experiment) -> dict[str, Any]:
    """The canonical, fully resolved form as a dict (every key explicit; scenarios listed one by one)."""
    scenarios = []
    for s in exp.scenarios:
        item: dict[str, Any] = {"name": s.name, "activation": s.activation, "scheme": s.scheme}
        if s.model.widths != exp.model.widths:
            item["widths"] = list(s.model.widths)
        if s.params:
            item["params"] = {k: _plain(v) for k, v in s.params}
        scenarios.append(item)
    model: dict[str, Any] = {"kind": exp.model.kind, "widths": list(exp.model.widths), "bias": exp.model.bias}
    if exp.model.kind == "cnn":
        model.update(channels=list(exp.model.channels), kernel=exp.model.kernel)
    t = exp.train
    return {
        "name": exp.name,
        "description": exp.description,
        "data": {"name": exp.data.name, "root": exp.data.root, "standardize": exp.data.standardize,
                 "test_fraction": exp.data.test_fraction, "split_seed": exp.data.split_seed, "limit": exp.data.limit},
        "model": model,
        "train": {"optimizer": t.optimizer, "lr": t.lr, "batch_size": t.batch_size, "steps": t.steps,
                  "log_every": t.log_every, "first_pass_batch": t.first_pass_batch, "device": t.device,
                  "seeds": list(t.seeds)},
        "scenarios": scenarios,
    }


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_value(key)


def _toml_value(v: Any) -> str:
    """One TOML literal on one line (strings escaped by tomli_w; arrays and tables inline)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise InitlabError(f"cannot write the non-finite number {v!r} to a config")
        return repr(v)
    if isinstance(v, str):
        import tomli_w

        return tomli_w.dumps({"k": v})[len("k = "):].rstrip("\n")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {_toml_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise InitlabError(f"cannot write a {type(v).__name__} to a config: {v!r}")


def _dump_toml(d: Mapping[str, Any]) -> str:
    """TOML text of the canonical dict: top-level scalars, then [tables], then [[arrays of tables]]."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, (Mapping, list))]
    for k, v in d.items():
        if isinstance(v, Mapping):
            lines += ["", f"[{_toml_key(k)}]"] + [f"{_toml_key(kk)} = {_toml_value(vv)}" for kk, vv in v.items()]
    for k, v in d.items():
        if isinstance(v, list):
            for item in v:
                lines += ["", f"[[{_toml_key(k)}]]"] + [f"{_toml_key(kk)} = {_toml_value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


def experiment_to_toml(exp: Experiment) -> str:
    """The canonical TOML of ``exp`` (every setting explicit, grids expanded into ``[[scenarios]]``).

    Loading it back gives an equal experiment: ``experiment_from_dict(tomllib.loads(text)) == exp``.
    """
    return _dump_toml(experiment_to_dict(exp))


def with_overrides(exp: Experiment, overrides: Mapping[str, Any]) -> Experiment:
    """``exp`` with dotted keys replaced (``{"train.steps": 100, "data.root": "~/mnist"}``), re-validated.

    Scenarios that used the base model's widths follow a changed ``model.widths``.
    """
    d = experiment_to_dict(exp)
    for key, value in overrides.items():
        section, dot, sub = str(key).partition(".")
        if not dot:
            if section not in ("name", "description"):
                raise unknown_choice("override", key, ["name", "description"] + [f"{s}.<key>" for s in ("data", "model", "train")])
            d[section] = value
            continue
        valid = {"data": _DATA_KEYS, "model": _MODEL_KEYS, "train": _TRAIN_KEYS}.get(section)
        if valid is None:
            raise unknown_choice("override section", section, ["data", "model", "train"])
        _check_keys({sub: value}, valid, section)
        if sub == "hidden":
            d["model"].pop("widths", None)
        d[section][sub] = value
    return experiment_from_dict(d)


def config_fingerprint(exp: Experiment) -> str:
    """SHA-256 (hex) of the canonical TOML of everything that changes results.

    Leaves out the labels ``name`` and ``description`` and ``train.device`` (where it runs, not
    what), so a run directory can be resumed under another name or on another device but
    refuses any change to the data, model, training or scenarios.
    """
    d = experiment_to_dict(exp)
    d.pop("name")
    d.pop("description")
    d["train"].pop("device")
    return hashlib.sha256(_dump_toml(d).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- files and presets


def _loads(text: str, where: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        line, col = getattr(e, "lineno", None), getattr(e, "colno", None)
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)\s*$", msg)
        if m:
            line, col = line or int(m.group(1)), col or int(m.group(2))
            msg = msg[: m.start()]
        elif msg.endswith("(at end of document)"):
            msg = msg[: -len("(at end of document)")].strip()
            lines = text.splitlines() or [""]
            line, col = line or len(lines), col or len(lines[-1]) + 1
        msg = getattr(e, "msg", msg) or msg
        where_at = f"{where}, line {line}, column {col}" if line else where
        raise InitlabError(f"{where_at}: malformed TOML: {msg}") from None


def _presets_dir() -> Any:
    from importlib.resources import files

    return files(__package__) / "presets"


def preset_names() -> list[str]:
    """Names of the built-in presets (``initlab/lab/presets/*.toml``), sorted."""
    return sorted(p.name[:-5] for p in _presets_dir().iterdir() if p.name.endswith(".toml"))


def _read_text(path: Path, where: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InitlabError(f"{where}: config file not found") from None
    except IsADirectoryError:
        raise InitlabError(f"{where}: is a folder, expected a .toml file") from None
    except UnicodeDecodeError as e:
        raise InitlabError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise InitlabError(f"{where}: cannot read the file ({e.strerror or e})") from None


def load_experiment(name_or_path: str | Path) -> Experiment:
    """A preset by name (``"classic"``, see :func:`list_presets`) or a TOML file by path.

    A value that names an existing file, or ends in ``.toml``, or contains a path separator is a
    path; anything else is a preset name. Every error names the file (and the line and column
    for malformed TOML, the key path otherwise).
    """
    text_arg = str(name_or_path)
    path = Path(text_arg).expanduser()
    is_path = isinstance(name_or_path, Path) or path.is_file() or text_arg.endswith(".toml") or "/" in text_arg \
        or "\\" in text_arg
    if is_path:
        where = str(name_or_path)
        text = _read_text(path, where)
        default = path.stem
    else:
        names = preset_names()
        if text_arg not in names:
            raise unknown_choice("preset", text_arg, names)
        where = f"preset {text_arg!r}"
        text = (_presets_dir() / f"{text_arg}.toml").read_text(encoding="utf-8")
        default = text_arg
    d = _loads(text, where)
    try:
        return experiment_from_dict(d, default_name=default)
    except InitlabError as e:
        raise InitlabError(f"{where}: {e}") from None


def list_presets() -> list[tuple[str, str]]:
    """``[(name, description), ...]`` of the built-in presets, sorted by name."""
    out = []
    for name in preset_names():
        d = _loads((_presets_dir() / f"{name}.toml").read_text(encoding="utf-8"), f"preset {name!r}")
        out.append((name, str(d.get("description", ""))))
    return out
