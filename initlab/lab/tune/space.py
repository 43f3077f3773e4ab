"""The search of ``initlab tune``: its space and settings (:class:`Search`), parsed and checked
without Ray, and the trial's experiment built from a sampled point (:func:`trial_scenario`).

A search is the ``[tune]`` table of an experiment file (``initlab run`` ignores it) and/or
command-line flags (``--param KEY=DIST`` replaces the table's entry for KEY)::

    [tune]
    metric = "test_loss"     # <split>_<metric>: test_loss | test_acc | train_loss | train_acc
    mode = "min"             # optional: min | max (default: max for accuracy, min otherwise)
    samples = 16             # trials per scenario (grid(...) values: each value this many times)
    seed = 0                 # the sampler's seed: the same seed draws the same points
    grace_period = 50        # ASHA: steps every trial trains before it can be stopped
    reduction_factor = 3     # ASHA: about 1 in this many trials goes on at each rung
    max_concurrent = 0       # trials at once (0: as many as the CPUs allow)
    cpus_per_trial = 1

    [tune.params]            # KEY = "DIST"
    "scheme.factor" = "loguniform(0.25, 4)"    # a parameter of every scenario's scheme
    "train.lr" = "loguniform(1e-4, 1e-2)"      # or train.batch_size = "randint(16, 64)"

Distributions: ``uniform(a, b)``, ``loguniform(a, b)`` (0 < a < b), ``randint(a, b)`` (integers
a..b, both included), ``choice(x, y, ...)`` (one drawn at random) and ``grid(x, y, ...)`` (every
value, in this order). Every bad entry is a one-line :class:`~initlab.InitlabError` naming the
key and what was expected.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..._errors import InitlabError, unknown_choice
from ..._schemes import scheme_parameters
from .._checks import as_int, as_str, as_table, check_keys
from ..metrics import SPLITS, registered
from ..specs import Experiment, Scenario, TrainSpec

__all__ = ["Dist", "Search", "DISTRIBUTIONS", "TRAIN_KEYS", "parse_dist", "parse_param", "search_from_dict",
           "trial_scenario", "metric_names"]

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
#: the training settings a search may vary (numbers that change how a model trains, not what it is)
TRAIN_KEYS = ("lr", "batch_size")
_TUNE_KEYS = ("metric", "mode", "samples", "seed", "grace_period", "reduction_factor", "max_concurrent",
              "cpus_per_trial", "params")
_DIST_RE = re.compile(r"^\s*([A-Za-z_]+)\s*\((.*)\)\s*$")


@dataclass(frozen=True)
class Dist:
    """One searched parameter's distribution: ``kind`` (a name of :data:`DISTRIBUTIONS`) and its ``args``."""

    kind: str
    args: tuple[float, ...]

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(f'{a:g}' for a in self.args)})"

    def to_tune(self) -> Any:
        """The Ray Tune sampler (``ray.tune.loguniform(a, b)``, ...); imports Ray."""
        from ray import tune

        a = self.args
        if self.kind == "uniform":
            return tune.uniform(a[0], a[1])
        if self.kind == "loguniform":
            return tune.loguniform(a[0], a[1])
        if self.kind == "randint":
            return tune.randint(int(a[0]), int(a[1]) + 1)  # Tune's upper bound is excluded
        if self.kind == "choice":
            return tune.choice(list(a))
        return tune.grid_search(list(a))

    @property
    def bounds(self) -> tuple[float, float]:
        return (min(self.args), max(self.args))


@dataclass(frozen=True)
class Search:
    """What ``initlab tune`` searches (see the module docstring); ``mode`` is "min" or "max"."""

    params: tuple[tuple[str, Dist], ...]
    metric: str = "test_loss"
    mode: str = "min"
    samples: int = 8
    seed: int = 0
    grace_period: int = 0  # 0: the experiment's log_every
    reduction_factor: int = 3
    max_concurrent: int = 0
    cpus_per_trial: int = 1

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.params)


def _number(text: str, path: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise InitlabError(f"{path}: expected a number, got {text.strip()!r}") from None
    if not math.isfinite(v):
        raise InitlabError(f"{path}: expected a finite number, got {text.strip()!r}")
    return v


def parse_dist(text: Any, path: str) -> Dist:
    """``"loguniform(0.25, 4)"`` -> ``Dist("loguniform", (0.25, 4.0))``, checked (see the module docstring)."""
    if not isinstance(text, str):
        raise InitlabError(f"{path}: expected a distribution such as 'loguniform(0.25, 4)', got "
                           f"{type(text).__name__} {text!r:.60}")
    m = _DIST_RE.match(text)
    if not m:
        raise InitlabError(f"{path}: expected a distribution such as 'loguniform(0.25, 4)', got {text!r:.60}")
    kind = m.group(1).lower()
    if kind not in DISTRIBUTIONS:
        raise InitlabError(f"{path}: {unknown_choice('distribution', kind, DISTRIBUTIONS)}")
    parts = [p for p in m.group(2).split(",")]
    if not m.group(2).strip():
        parts = []
    args = tuple(_number(p, f"{path}: {kind}") for p in parts)
    _check_args(kind, args, path)
    return Dist(kind, args)


def _check_args(kind: str, args: tuple[float, ...], path: str) -> None:
    if kind in ("choice", "grid"):
        if not args:
            raise InitlabError(f"{path}: {kind}(...) needs at least one value")
        return
    if len(args) != 2:
        raise InitlabError(f"{path}: {kind}(a, b) takes two numbers, got {len(args)}")
    a, b = args
    if not a < b:
        raise InitlabError(f"{path}: {kind}(a, b) needs a < b, got a = {a:g}, b = {b:g}")
    if kind == "loguniform" and a <= 0:
        raise InitlabError(f"{path}: loguniform(a, b) needs 0 < a, got a = {a:g}")
    if kind == "randint" and (a != int(a) or b != int(b)):
        raise InitlabError(f"{path}: randint(a, b) needs integers, got a = {a:g}, b = {b:g}")


def _check_key(key: str, exp: Experiment, path: str) -> None:
    """A searched key names a training setting or a parameter of every scenario's scheme."""
    section, dot, name = key.partition(".")
    if section == "train" and dot:
        if name not in TRAIN_KEYS:
            raise InitlabError(f"{path}: {unknown_choice('training setting to search', name, TRAIN_KEYS)}")
        return
    if section != "scheme" or not dot or not name:
        raise InitlabError(f"{path}: expected 'scheme.<parameter>' or 'train.<setting>' "
                           f"(e.g. scheme.factor, train.lr), got {key!r}")
    for sc in exp.scenarios:
        valid = scheme_parameters(sc.scheme) or ()
        if name not in valid:
            raise InitlabError(f"{path}: scenario {sc.name!r}: scheme {sc.scheme!r} has no parameter {name!r}; "
                               f"its parameters: {', '.join(valid) or '(none)'}")


def parse_param(text: Any, path: str = "--param") -> tuple[str, Dist]:
    """``"scheme.factor=loguniform(0.25,4)"`` -> ``("scheme.factor", Dist(...))`` (the key is checked later)."""
    text = as_str(text, path, nonempty=True)
    key, eq, dist = text.partition("=")
    if not eq or not key.strip():
        raise InitlabError(f"{path}: expected KEY=DIST such as 'scheme.factor=loguniform(0.25,4)', got {text!r:.60}")
    key = key.strip()
    return key, parse_dist(dist, f"{path} {key}")


def metric_names() -> list[str]:
    """The metrics a search can optimise: ``<split>_<name>`` of the registry's metrics."""
    return [f"{s}_{m.name}" for m in registered() for s in SPLITS if s in m.splits]


def _mode(metric: str, raw: Any) -> str:
    if raw is not None:
        mode = as_str(raw, "tune.mode", nonempty=True)
        if mode not in ("min", "max"):
            raise InitlabError(f"tune.mode: {unknown_choice('mode', mode, ['min', 'max'])}")
        return mode
    name = metric.partition("_")[2]
    entry = next((m for m in registered() if m.name == name), None)
    return "max" if entry is not None and entry.higher_is_better else "min"


def search_from_dict(raw: Any, exp: Experiment, cli_params: Mapping[str, Dist] | None = None) -> Search:
    """The :class:`Search` of a ``[tune]`` table (``{}`` when absent) and the ``--param`` flags, checked against ``exp``."""
    d = as_table({} if raw is None else raw, "tune")
    check_keys(d, _TUNE_KEYS, "tune")
    params = {str(k): parse_dist(v, f"tune.params.{k}") for k, v in as_table(d.get("params", {}), "tune.params").items()}
    params.update(cli_params or {})
    if not params:
        raise InitlabError("tune.params: nothing to search; give [tune.params] in the experiment file or "
                           "--param KEY=DIST (e.g. --param 'scheme.factor=loguniform(0.25,4)')")
    for key in params:
        _check_key(key, exp, f"tune.params.{key}")
    metric = as_str(d.get("metric", "test_loss"), "tune.metric", nonempty=True)
    if metric not in metric_names():
        raise InitlabError(f"tune.metric: {unknown_choice('metric', metric, metric_names())}")
    ints = {k: as_int(d[k], f"tune.{k}", minimum=lo) for k, lo in
            (("samples", 1), ("seed", 0), ("grace_period", 1), ("reduction_factor", 2), ("max_concurrent", 0),
             ("cpus_per_trial", 1)) if k in d}
    if ints.get("grace_period", 0) > exp.train.steps:
        raise InitlabError(f"tune.grace_period: expected at most train.steps ({exp.train.steps}), "
                           f"got {ints['grace_period']}")
    return Search(params=tuple(sorted(params.items())), metric=metric, mode=_mode(metric, d.get("mode")), **ints)


def trial_scenario(base: Scenario, train: TrainSpec, values: Mapping[str, Any], name: str) -> tuple[Scenario, TrainSpec]:
    """The scenario ``name`` and training settings of one trial: ``base`` and ``train`` with the sampled
    ``values`` (``{"scheme.factor": 1.3, "train.lr": 1e-3}``), validated like any scenario."""
    params = dict(base.params)
    tr: dict[str, Any] = {}
    for key, value in values.items():
        section, _, sub = key.partition(".")
        if section == "scheme":
            params[sub] = value
        else:
            tr[sub] = int(value) if sub == "batch_size" else float(value)
    sc = Scenario(name, base.activation, base.scheme, tuple(sorted(params.items())), base.model)
    return sc, (replace(train, **tr) if tr else train)
