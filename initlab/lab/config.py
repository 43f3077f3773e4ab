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
    histograms_every = 1  # TensorBoard weight histograms every N log steps (0: none; not in the fingerprint)

    [[scenarios]]         # explicit scenarios ...
    name = "sigmoid-normal"        # optional; default "<activation>-<scheme>[-d<depth>][-w<width>]"
    activation = "sigmoid"
    scheme = "normal"
    params = {}                    # scheme parameters, e.g. { std = 0.5 }
    # or sw2 = 1.76 instead of scheme/params: W ~ N(0, sw2 / fan_in) (name part "sw1.76")
    # widths = [...] or depth = 5 / width = 200: this scenario's model
    # residual = "none"            # none | skipinit | fixup | gpt2 (kind = "resmlp"): init_model(residual=...)

    [grid]                # ... and/or a grid: the cartesian product, activation-major
    activations = ["tanh", "relu"]
    schemes = ["xavier_normal", "he_normal"]
    depths = [2, 5, 10]            # optional: number of hidden layers
    widths = [100]                 # optional: hidden width
    params = {}                    # optional: scheme parameters for every grid scenario
    # sw2 = [1.0, 1.76, 4.0]       # instead of schemes/params: one column per sigma_w^2, W ~ N(0, sw2 / fan_in)
    # residual = "fixup"           # optional: the residual policy of every grid scenario

    [tune]                # optional: the search of `initlab tune` (initlab.lab.tune.space); ignored here

Validation errors name the key path and the expected type ("train.lr: expected a number,
got 'fast'"); unknown keys, schemes, activations and data sets are errors with a "did you mean";
a malformed file gives its name, line and column.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import MISSING, fields, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

from .._errors import InitlabError, unknown_choice
from ._checks import (activation_name, as_int, as_ints, as_list, as_params, as_str, as_table, check_keys,
                      scheme_and_params)
from .specs import (N_CLASSES, NAME_RE, OPTIMIZERS, Claim, DataSpec, Experiment, ModelSpec, Scenario, TrainSpec,
                    residual_policy, sw2_scheme)

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: tomli (the lab extra), loaded when a file is read
    tomllib = None  # type: ignore[assignment]

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
    "read_toml",
    "OPTIMIZERS",
    "schema_rows",
    "schema_markdown",
    "parse_set",
    "claims_from_dict",
]

_TOP_KEYS = ("name", "description", "data", "model", "train", "scenarios", "grid", "claims", "tune")
_DATA_KEYS = ("name", "root", "standardize", "test_fraction", "split_seed", "limit")
_MODEL_KEYS = ("kind", "widths", "hidden", "bias", "channels", "kernel", "bias_var", "pool")
_TRAIN_KEYS = ("optimizer", "lr", "batch_size", "steps", "log_every", "first_pass_batch", "device", "seeds",
               "momentum", "layer_stats", "jacobian", "histograms_every")
_SCENARIO_KEYS = ("name", "activation", "scheme", "params", "widths", "depth", "width", "channels", "sw2", "residual")
_GRID_KEYS = ("activations", "schemes", "sw2", "depths", "widths", "params", "residual")
_CLAIM_KEYS = tuple(f.name for f in fields(Claim))
#: keys written to the canonical config only when they differ from their default (older configs stay as they were)
_OPTIONAL = {"model": {"bias_var": 0.0, "pool": True},
             "train": {"momentum": 0.0, "layer_stats": False, "jacobian": False}}


# ----------------------------------------------------------------------------- dict -> Experiment


def _resolve_widths(base: ModelSpec, path: str, widths: Any = None, depth: Any = None, width: Any = None
                    ) -> tuple[int, ...]:
    """A scenario's widths: explicit ``widths``, or the base model with ``depth`` hidden layers of ``width``."""
    if widths is not None:
        if depth is not None or width is not None:
            raise InitlabError(f"{path}: give either widths or depth/width, not both")
        return as_ints(widths, f"{path}.widths", minimum=1, min_len=2)
    if depth is None and width is None:
        return base.widths
    d = base.depth if depth is None else as_int(depth, f"{path}.depth", minimum=1)
    if width is None:
        if base.depth < 1:
            raise InitlabError(f"{path}.depth: the base model.widths {list(base.widths)} has no hidden layer to "
                               "repeat; give a width too")
        if len(set(base.widths[1:-1])) > 1:
            raise InitlabError(f"{path}.depth: the base model's hidden widths {list(base.widths[1:-1])} differ; "
                               "give a width too")
        w = base.widths[1]
    else:
        w = as_int(width, f"{path}.width", minimum=1)
    return (base.widths[0], *([w] * d), base.widths[-1])


def _auto_name(activation: str, scheme: str, depth: int | None, width: int | None, residual: str = "none") -> str:
    name = f"{activation}-{scheme}"
    if residual != "none":
        name += f"-{residual}"
    if depth is not None:
        name += f"-d{depth}"
    if width is not None:
        name += f"-w{width}"
    return name


def _sw2_label(sw2: float) -> str:
    """The scheme part of an automatic scenario name drawn with ``sw2``: ``sw1.76``."""
    return f"sw{sw2:g}"


def _scheme_of(item: Mapping[str, Any], path: str, activation: str) -> tuple[str, Any, str]:
    """(scheme, params, name label) of a scenario: its ``scheme`` and ``params``, or its ``sw2``
    (N(0, sw2 / fan_in), :func:`initlab.lab.specs.sw2_scheme`)."""
    if "sw2" in item:
        for key in ("scheme", "params"):
            if key in item:
                raise InitlabError(f"{path}.{key}: give either sw2 (which draws N(0, sw2 / fan_in)) or "
                                   "scheme/params, not both")
        scheme, params = sw2_scheme(item["sw2"], f"{path}.sw2")
        return scheme, params, _sw2_label(float(item["sw2"]))
    if "scheme" not in item:
        raise InitlabError(f"{path}.scheme: missing (each scenario needs an activation and a scheme or sw2)")
    params = as_params(item.get("params", {}), f"{path}.params")
    scheme, params = scheme_and_params(item["scheme"], params, f"{path}.scheme", activation)
    return scheme, params, scheme


def _parse_model(raw: Mapping[str, Any], data: DataSpec) -> ModelSpec:
    check_keys(raw, _MODEL_KEYS, "model")
    kw = {k: raw[k] for k in ("kind", "bias", "channels", "kernel", "bias_var", "pool") if k in raw}
    if "widths" in raw and "hidden" in raw:
        raise InitlabError("model: give either widths or hidden, not both")
    if "hidden" in raw:
        hidden = as_ints(raw["hidden"], "model.hidden", minimum=1, min_len=0)
        kw["widths"] = (data.input_dim, *hidden, N_CLASSES)
    elif "widths" in raw:
        kw["widths"] = raw["widths"]
    else:
        kw["widths"] = (data.input_dim, 100, 100, N_CLASSES)
    return ModelSpec(**kw)


def _scenario_name(item: Mapping[str, Any], path: str, activation: str, scheme: str, residual: str) -> str:
    if "name" in item:
        name = as_str(item["name"], f"{path}.name", nonempty=True)
    else:
        name = _auto_name(activation, scheme,
                          as_int(item["depth"], f"{path}.depth") if "depth" in item else None,
                          as_int(item["width"], f"{path}.width") if "width" in item else None, residual)
    if not NAME_RE.match(name):
        raise InitlabError(f"{path}.name: expected letters, digits and _ . + = - (it names files and folders), "
                           f"got {name!r}")
    return name


def _parse_scenario(item: Any, path: str, base: ModelSpec) -> Scenario:
    item = as_table(item, path)
    check_keys(item, _SCENARIO_KEYS, path)
    if "activation" not in item:
        raise InitlabError(f"{path}.activation: missing (each scenario needs an activation and a scheme or sw2)")
    activation = activation_name(item["activation"], f"{path}.activation")
    scheme, params, label = _scheme_of(item, path, activation)
    residual = residual_policy(item.get("residual", "none"), f"{path}.residual", base.kind)
    widths = _resolve_widths(base, path, item.get("widths"), item.get("depth"), item.get("width"))
    name = _scenario_name(item, path, activation, label, residual)
    model = replace(base, widths=widths)
    if "channels" in item:
        if base.kind != "cnn":
            raise InitlabError(f"{path}.channels: only used with model.kind = 'cnn' (kind is {base.kind!r})")
        model = replace(model, channels=as_ints(item["channels"], f"{path}.channels", minimum=1))
    return Scenario(name, activation, scheme, params, model, residual)


def _parse_scenarios(raw: Any, base: ModelSpec) -> list[Scenario]:
    items = as_list(raw, "scenarios", "tables ([[scenarios]])")
    return [_parse_scenario(item, f"scenarios[{i}]", base) for i, item in enumerate(items)]


def _grid_schemes(grid: Mapping[str, Any], act: str) -> list[tuple[str, Any, str]]:
    """(scheme, params, name label) of each grid column for activation ``act``: one per ``schemes`` entry
    (with ``params``), or one per ``sw2`` value (N(0, sw2 / fan_in))."""
    if "schemes" in grid and "sw2" in grid:
        raise InitlabError("grid.sw2: give either schemes or sw2 (which draws N(0, sw2 / fan_in)), not both")
    if "sw2" in grid:
        if "params" in grid:
            raise InitlabError("grid.params: sw2 sets the scheme and its parameters; remove params")
        values = as_list(grid["sw2"], "grid.sw2", "numbers")
        if not values:
            raise InitlabError("grid.sw2: expected a non-empty list")
        return [(*sw2_scheme(v, f"grid.sw2[{i}]"), _sw2_label(float(v))) for i, v in enumerate(values)]
    params = as_params(grid.get("params", {}), "grid.params")
    schemes = as_list(grid["schemes"], "grid.schemes", "strings")
    if not schemes:
        raise InitlabError("grid.schemes: expected a non-empty list")
    out = []
    for i, raw in enumerate(schemes):
        scheme, sparams = scheme_and_params(raw, params, f"grid.schemes[{i}]", act)
        out.append((scheme, sparams, scheme))
    return out


def _parse_grid(raw: Any, base: ModelSpec) -> list[Scenario]:
    grid = as_table(raw, "grid")
    check_keys(grid, _GRID_KEYS, "grid")
    if "activations" not in grid:
        raise InitlabError("grid.activations: missing (a grid needs activations and schemes or sw2)")
    if "schemes" not in grid and "sw2" not in grid:
        raise InitlabError("grid.schemes: missing (a grid needs activations and schemes or sw2)")
    acts = [activation_name(a, f"grid.activations[{i}]")
            for i, a in enumerate(as_list(grid["activations"], "grid.activations", "strings"))]
    if not acts:
        raise InitlabError("grid.activations: expected a non-empty list")
    residual = residual_policy(grid.get("residual", "none"), "grid.residual", base.kind)
    depths: list[int | None] = list(as_ints(grid["depths"], "grid.depths", minimum=1)) if "depths" in grid else [None]
    widths: list[int | None] = list(as_ints(grid["widths"], "grid.widths", minimum=1)) if "widths" in grid else [None]
    out = []
    for act in acts:
        for scheme, sparams, label in _grid_schemes(grid, act):
            for d in depths:
                for w in widths:
                    model = replace(base, widths=_resolve_widths(base, "grid", None, d, w))
                    out.append(Scenario(_auto_name(act, label, d, w, residual), act, scheme, sparams, model,
                                        residual))
    return out


def _section(d: Mapping[str, Any], key: str, valid: tuple[str, ...]) -> Mapping[str, Any]:
    raw = as_table(d.get(key, {}), key)
    check_keys(raw, valid, key)
    return raw


def experiment_from_dict(d: Mapping[str, Any], *, default_name: str = "experiment") -> Experiment:
    """Validate a parsed TOML document (a dict) and build the :class:`Experiment`.

    Missing tables and keys take the defaults of the dataclasses (the classic study's training
    settings); ``[[scenarios]]`` and ``[grid]`` may both be given (explicit scenarios first).
    """
    d = as_table(d, "the experiment")
    check_keys(d, _TOP_KEYS, "")
    name = as_str(d.get("name", default_name), "name", nonempty=True)
    description = as_str(d.get("description", ""), "description")
    data = DataSpec(**_section(d, "data", _DATA_KEYS))
    model = _parse_model(as_table(d.get("model", {}), "model"), data)
    train = TrainSpec(**_section(d, "train", _TRAIN_KEYS))
    scenarios: list[Scenario] = []
    if "scenarios" in d:
        scenarios += _parse_scenarios(d["scenarios"], model)
    if "grid" in d:
        scenarios += _parse_grid(d["grid"], model)
    return Experiment(name, description, data, model, train, tuple(scenarios), claims_from_dict(d))


def claims_from_dict(d: Mapping[str, Any]) -> tuple[Claim, ...]:
    """The ``[[claims]]`` of a parsed experiment document (e.g. a run directory's config.toml), validated."""
    items = as_list(as_table(d, "the experiment").get("claims", []), "claims", "tables ([[claims]])")
    return tuple(_parse_claim(c, f"claims[{i}]") for i, c in enumerate(items))


def _parse_claim(item: Any, path: str) -> Claim:
    item = as_table(item, path)
    check_keys(item, _CLAIM_KEYS, path)
    missing = [k for k in ("id", "source", "claim", "quantity", "expect", "value") if k not in item]
    if missing:
        raise InitlabError(f"{path}.{missing[0]}: missing (a claim needs id, source, claim, quantity, expect, value)")
    try:
        return Claim(**item)
    except InitlabError as e:
        raise InitlabError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- Experiment -> dict / TOML


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, tuple) else v


def _scenario_dict(s: Scenario, base: ModelSpec) -> dict[str, Any]:
    item: dict[str, Any] = {"name": s.name, "activation": s.activation, "scheme": s.scheme}
    if s.model.widths != base.widths:
        item["widths"] = list(s.model.widths)
    if s.model.channels != base.channels:
        item["channels"] = list(s.model.channels)
    if s.params:
        item["params"] = {k: _plain(v) for k, v in s.params}
    if s.residual != "none":  # written only when set: older configs keep their form and fingerprint
        item["residual"] = s.residual
    return item


def experiment_to_dict(exp: Experiment) -> dict[str, Any]:
    """The canonical, fully resolved form as a dict (every key explicit; scenarios listed one by one)."""
    model: dict[str, Any] = {"kind": exp.model.kind, "widths": list(exp.model.widths), "bias": exp.model.bias}
    if exp.model.kind == "cnn":
        model.update(channels=list(exp.model.channels), kernel=exp.model.kernel)
    t = exp.train
    out = {
        "name": exp.name,
        "description": exp.description,
        "data": {"name": exp.data.name, "root": exp.data.root, "standardize": exp.data.standardize,
                 "test_fraction": exp.data.test_fraction, "split_seed": exp.data.split_seed, "limit": exp.data.limit},
        "model": model,
        "train": {"optimizer": t.optimizer, "lr": t.lr, "batch_size": t.batch_size, "steps": t.steps,
                  "log_every": t.log_every, "first_pass_batch": t.first_pass_batch, "device": t.device,
                  "seeds": list(t.seeds), "histograms_every": t.histograms_every},
        "scenarios": [_scenario_dict(s, exp.model) for s in exp.scenarios],
    }
    for section, spec in (("model", exp.model), ("train", t)):
        for key, default in _OPTIONAL[section].items():
            if getattr(spec, key) != default:
                out[section][key] = getattr(spec, key)
    if exp.claims:
        out["claims"] = [_claim_dict(c) for c in exp.claims]
    return out


def _claim_dict(c: Claim) -> dict[str, Any]:
    d = {f.name: _plain(getattr(c, f.name)) for f in fields(Claim)}
    d["args"] = {k: _plain(v) for k, v in c.args}
    return d


def experiment_to_toml(exp: Experiment) -> str:
    """The canonical TOML of ``exp`` (every setting explicit, grids expanded into ``[[scenarios]]``), written by tomli_w.

    Loading it back gives an equal experiment: ``experiment_from_dict(tomllib.loads(text)) == exp``.
    """
    import tomli_w  # optional (the lab extra): the lab's CLI loads this module in any installation

    return tomli_w.dumps(experiment_to_dict(exp))


def with_overrides(exp: Experiment, overrides: Mapping[str, Any]) -> Experiment:
    """``exp`` with dotted keys replaced (``{"train.steps": 100, "data.root": "~/mnist"}``), re-validated.

    Scenarios that used the base model's widths follow a changed ``model.widths``.
    """
    if not isinstance(overrides, Mapping):
        raise InitlabError(f"overrides: expected a mapping of dotted keys to values ({{'train.steps': 100}}), "
                           f"got {type(overrides).__name__} {overrides!r:.60}")
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
        check_keys({sub: value}, valid, section)
        if sub == "hidden":
            d["model"].pop("widths", None)
        d[section][sub] = value
    return experiment_from_dict(d)


def config_fingerprint(exp: Experiment) -> str:
    """SHA-256 (hex) of the canonical form (:func:`experiment_to_dict`, as sorted compact JSON) of
    everything that changes results.

    Leaves out the labels ``name`` and ``description``, ``train.device`` (where it runs, not
    what) and ``train.histograms_every`` (what TensorBoard shows), so a run directory can be resumed under another name or on another device but
    refuses any change to the data, model, training or scenarios. JSON rather than the TOML
    text, so that the fingerprint does not depend on the TOML writer's layout.
    """
    d = experiment_to_dict(exp)
    d.pop("name")
    d.pop("description")
    d.pop("claims", None)  # what is checked, not what is trained
    d["train"].pop("device")
    d["train"].pop("histograms_every")  # what TensorBoard shows, not the results
    text = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- files and presets


def _error_position(e: Exception, text: str) -> tuple[str, int | None, int | None]:
    """(message, line, column) of a TOML decode error, whichever form the parser reports them in."""
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
    return getattr(e, "msg", msg) or msg, line, col


def _toml_parser() -> Any:
    if tomllib is not None:
        return tomllib
    import tomli  # optional (the lab extra on Python < 3.11)

    return tomli


def read_toml(text: str, where: str) -> dict[str, Any]:
    """Parse TOML text; a malformed document raises InitlabError naming ``where``, the line and the column."""
    parser = _toml_parser()
    try:
        return parser.loads(text)
    except parser.TOMLDecodeError as e:
        msg, line, col = _error_position(e, text)
        where_at = f"{where}, line {line}, column {col}" if line else where
        raise InitlabError(f"{where_at}: malformed TOML: {msg}") from None


def _presets_dir() -> Any:
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


def _source(name_or_path: str | Path) -> tuple[str, str, str]:
    """(text, where, default name) of a preset name or a TOML file path."""
    text_arg = str(name_or_path)
    path = Path(text_arg).expanduser()
    is_path = isinstance(name_or_path, Path) or path.is_file() or text_arg.endswith(".toml") or "/" in text_arg \
        or "\\" in text_arg
    if is_path:
        return _read_text(path, str(name_or_path)), str(name_or_path), path.stem
    names = preset_names()
    if text_arg not in names:
        raise unknown_choice("preset", text_arg, names)
    return (_presets_dir() / f"{text_arg}.toml").read_text(encoding="utf-8"), f"preset {text_arg!r}", text_arg


def load_experiment(name_or_path: str | Path) -> Experiment:
    """A preset by name (``"classic"``, see :func:`list_presets`) or a TOML file by path.

    A value that names an existing file, or ends in ``.toml``, or contains a path separator is a
    path; anything else is a preset name. Every error names the file (and the line and column
    for malformed TOML, the key path otherwise).
    """
    text, where, default = _source(name_or_path)
    d = read_toml(text, where)
    try:
        return experiment_from_dict(d, default_name=default)
    except InitlabError as e:
        raise InitlabError(f"{where}: {e}") from None


def list_presets() -> list[tuple[str, str]]:
    """``[(name, description), ...]`` of the built-in presets, sorted by name."""
    out = []
    for name in preset_names():
        d = read_toml((_presets_dir() / f"{name}.toml").read_text(encoding="utf-8"), f"preset {name!r}")
        out.append((name, str(d.get("description", ""))))
    return out


# ----------------------------------------------------------------------------- the documented schema

#: (table, key, type, meaning) of every key an experiment file may hold, in file order; the defaults come from
#: the dataclasses (:func:`schema_rows`), and ``docs/schema.md`` is :func:`schema_markdown` (a test keeps them equal)
_MEANINGS: tuple[tuple[str, str, str, str], ...] = (
    ("", "name", "string", "the experiment's name (the default output folder is runs/<name>)"),
    ("", "description", "string", "one line shown by `initlab presets` and the report"),
    ("", "tune", "table", "the search of `initlab tune` (metric, samples, seed, grace_period, reduction_factor, "
                          "max_concurrent, cpus_per_trial, [tune.params]; see the README); `initlab run` ignores it"),
    ("data", "name", "string", "data set: mnist (the embedded 5,000-digit sample, or full MNIST with root), "
                                "mnist_idx, gaussian (generated), digits (8x8)"),
    ("data", "root", "string", "a folder of MNIST IDX files (\"\" = the embedded sample)"),
    ("data", "standardize", "bool", "inputs become (x - mean) / std with the training split's global mean and std"),
    ("data", "test_fraction", "float", "held-out fraction, in (0, 1)"),
    ("data", "split_seed", "int", "seed of the train/test split"),
    ("data", "limit", "int", "use at most this many examples (0 = all)"),
    ("model", "kind", "string", "mlp | cnn | resmlp (stem layer, then one residual block h + W2 phi(W1 h) per "
                                 "further hidden width)"),
    ("model", "widths", "list of int", "[inputs, hidden..., classes]; for cnn the dense layers after the convolutions"),
    ("model", "hidden", "list of int", "instead of widths: the hidden widths (inputs and classes from the data set)"),
    ("model", "bias", "bool", "layers have biases"),
    ("model", "channels", "list of int", "cnn only: output channels of each 'same'-padded convolution"),
    ("model", "kernel", "int", "cnn only: kernel size k (fan_in = k^2 c)"),
    ("model", "bias_var", "float", "variance sigma_b^2 of the initial biases, N(0, sigma_b^2) (0 = zeros)"),
    ("model", "pool", "bool", "cnn only: a 2x2 max-pool after each convolution while the map is at least 2x2"),
    ("train", "optimizer", "string", "adam | sgd"),
    ("train", "lr", "float", "learning rate"),
    ("train", "batch_size", "int", "minibatch size"),
    ("train", "steps", "int", "training steps per model"),
    ("train", "log_every", "int", "steps between log steps (metrics, test evaluation, checkpoints)"),
    ("train", "first_pass_batch", "int", "examples in the first-pass batch (the per-layer table at init)"),
    ("train", "device", "string", "cpu | cuda | cuda:<i> | mps"),
    ("train", "seeds", "list of int or int", "seeds per scenario (a count n means 0..n-1)"),
    ("train", "momentum", "float", "SGD momentum, in [0, 1) (optimizer = 'sgd' only)"),
    ("train", "layer_stats", "bool", "record per-layer activation and back-propagated gradient statistics at each "
                                     "log step on a fixed held-out batch (MLPs): metrics act_mean_<l>, act_var_<l>, "
                                     "grad_var_<l>, wgrad_var_<l>; and fixed-bin histograms of each hidden layer's "
                                     "activations and back-propagated gradients at step 0 and three log steps "
                                     "(layer_histograms.csv, TensorBoard)"),
    ("train", "histograms_every", "int", "TensorBoard weight histograms every that many log steps (0 = none); "
                                          "not part of the results or the config fingerprint"),
    ("train", "jacobian", "bool", "first pass: singular values of each layer's Jacobian dh_l/dh_(l-1) "
                                  "(first_pass.csv columns jac_sv_mean, jac_sv_max, jac_sv_min)"),
    ("scenarios", "name", "string", "optional; default <activation>-<scheme>[-d<depth>][-w<width>]"),
    ("scenarios", "activation", "string", "the hidden layers' activation (`initlab gains` lists them)"),
    ("scenarios", "scheme", "string", "the initialisation scheme (`initlab schemes` lists them)"),
    ("scenarios", "params", "table", "scheme parameters, e.g. { std = 0.5 }"),
    ("scenarios", "widths", "list of int", "this scenario's widths (else the model's)"),
    ("scenarios", "depth", "int", "this scenario's number of hidden layers (of the model's width)"),
    ("scenarios", "width", "int", "this scenario's hidden width"),
    ("scenarios", "channels", "list of int", "cnn only: this scenario's convolution channels (else the model's)"),
    ("scenarios", "sw2", "float", "instead of scheme and params: the weight variance sigma_w^2 > 0, W ~ N(0, "
                                  "sigma_w^2 / fan_in) (Poole et al. 2016), i.e. scheme xavier_caffe with gain = "
                                  "sqrt(sigma_w^2), distribution normal; the default name reads sw<value>"),
    ("scenarios", "residual", "string", "none | skipinit | fixup | gpt2: the residual-branch policy applied after the "
                                        "scheme (initlab.init_model(..., residual=...); kind = 'resmlp' only)"),
    ("grid", "activations", "list of string", "one scenario per activation x scheme (or sw2) x depth x width"),
    ("grid", "schemes", "list of string", "schemes of the grid (or sw2)"),
    ("grid", "sw2", "list of float", "instead of schemes and params: weight variances sigma_w^2, one grid column "
                                     "each, W ~ N(0, sigma_w^2 / fan_in); names <activation>-sw<value>-..."),
    ("grid", "depths", "list of int", "optional: numbers of hidden layers"),
    ("grid", "widths", "list of int", "optional: hidden widths"),
    ("grid", "params", "table", "optional: scheme parameters of every grid scenario"),
    ("grid", "residual", "string", "optional: the residual policy of every grid scenario (as in [[scenarios]])"),
    ("claims", "id", "string", "the claim's id (a row of claims.csv)"),
    ("claims", "source", "string", "the citation: paper, figure or equation"),
    ("claims", "claim", "string", "the claim in words"),
    ("claims", "quantity", "string", "a registered claim quantity (initlab.lab.claims.quantities())"),
    ("claims", "args", "table", "the quantity's arguments, e.g. { scenario = 'relu-he' }"),
    ("claims", "expect", "string", "approx | above | below: how the measured value relates to value"),
    ("claims", "value", "float", "the expected value or threshold (on scale)"),
    ("claims", "tolerance", "float", "approx: the half-width of the expected band (on scale)"),
    ("claims", "scale", "string", "linear | log2 | log10: where the comparison is made"),
    ("claims", "test", "string", "t95 (95% t-interval of the mean over seeds) | every_seed"),
)

_SPECS_OF = {"data": DataSpec, "model": ModelSpec, "train": TrainSpec, "scenarios": Scenario, "claims": Claim}
_KEYS_OF = {"": _TOP_KEYS, "data": _DATA_KEYS, "model": _MODEL_KEYS, "train": _TRAIN_KEYS,
            "scenarios": _SCENARIO_KEYS, "grid": _GRID_KEYS, "claims": _CLAIM_KEYS}


def _default(table: str, key: str) -> str:
    cls = _SPECS_OF.get(table)
    field_ = next((f for f in fields(cls) if f.name == key), None) if cls is not None else None
    if field_ is None or field_.default is MISSING:
        return "required" if field_ is not None else "-"
    return json.dumps(_plain(field_.default))


def schema_rows() -> list[dict[str, str]]:
    """Every key of an experiment file: table, key, type, default (JSON) and meaning."""
    return [{"table": t, "key": k, "type": ty, "default": _default(t, k), "meaning": m} for t, k, ty, m in _MEANINGS]


def schema_markdown() -> str:
    """The text of ``docs/schema.md``: one table per TOML table, generated from :func:`schema_rows`."""
    out = ["# Experiment schema", "",
           "Every key of an experiment file (`initlab run FILE.toml`; the presets in `initlab/lab/presets/`), its",
           "type, default and meaning. Generated from the lab's specs by `initlab.lab.config.schema_markdown()`;",
           "a test fails when this file and the code disagree. `initlab run NAME --set table.key=value` overrides",
           "a key of `[data]`, `[model]` or `[train]` (the value is read as TOML: `--set train.lr=0.01`,",
           "`--set model.hidden=[50,50]`, `--set data.name=digits`).", ""]
    rows = schema_rows()
    for table in dict.fromkeys(r["table"] for r in rows):
        title = {"": "top level", "scenarios": "[[scenarios]]", "claims": "[[claims]]"}.get(table, f"[{table}]")
        out += [f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{r['key']}` | {r['type']} | `{r['default']}` | {r['meaning'].replace('|', '&#124;')} |"
                for r in rows if r["table"] == table]
        out.append("")
    return "\n".join(out)


def parse_set(items: Any) -> dict[str, Any]:
    """``["train.lr=0.01", "model.hidden=[50, 50]"]`` (``--set``) as overrides: each value read as a TOML value,
    or as a plain string when it is not one (``data.name=digits``)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, eq, text = str(item).partition("=")
        if not eq or not key.strip():
            raise InitlabError(f"--set: expected KEY=VALUE such as train.lr=0.01, got {item!r}")
        try:
            value = read_toml(f"v = {text.strip()}", "--set")["v"]
        except InitlabError:
            value = text.strip()
        out[key.strip()] = value
    return out
