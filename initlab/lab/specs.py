"""The experiment as typed values: :class:`DataSpec`, :class:`ModelSpec`, :class:`TrainSpec`,
:class:`Scenario` and :class:`Experiment` (frozen dataclasses that validate themselves), and the
facts they are checked against: the data sets and their shapes, the model kinds, the optimisers.

No I/O here: :mod:`initlab.lab.config` reads and writes these as TOML, :mod:`initlab.lab.data`
loads the data a :class:`DataSpec` names, :mod:`initlab.lab.models` builds what a
:class:`ModelSpec` describes.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._errors import InitlabError, unknown_choice
from .._residual import POLICIES
from ._checks import (activation_name, as_bool, as_int, as_ints, as_number, as_params, as_str, fail,
                      scheme_and_params)

__all__ = ["DataSpec", "ModelSpec", "TrainSpec", "Scenario", "Claim", "Experiment", "DATASETS", "DATASET_SHAPES",
           "N_CLASSES", "MODEL_KINDS", "OPTIMIZERS", "RESIDUALS", "SW2_SCHEME", "sw2_scheme", "scheme_sw2", "residual_policy", "CLAIM_EXPECT", "CLAIM_SCALES", "CLAIM_TESTS", "image_shape",
           "NAME_RE"]

DATASETS = ("mnist", "mnist_idx", "gaussian", "digits")
# (channels, height, width) of one example of each data set
DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 28),
    "mnist_idx": (1, 28, 28),
    "gaussian": (1, 28, 28),
    "digits": (1, 8, 8),
}
N_CLASSES = 10
MODEL_KINDS = ("mlp", "cnn", "resmlp")
OPTIMIZERS = ("adam", "sgd")
#: a scenario's residual-branch policy (``initlab.init_model(..., residual=...)``; "none": no policy)
RESIDUALS = ("none", *POLICIES)
#: how a claim's measured value must relate to its expected ``value`` (see :class:`Claim`)
CLAIM_EXPECT = ("approx", "above", "below")
#: the scale a claim compares in: the value itself, or its base-2 / base-10 logarithm
CLAIM_SCALES = ("linear", "log2", "log10")
#: the statistical test of a claim across seeds (see :mod:`initlab.lab.claims`)
CLAIM_TESTS = ("t95", "every_seed")
#: the weight variance sigma_w^2 of mean-field theory (Poole et al. 2016; Schoenholz et al. 2017),
#: W_ij ~ N(0, sigma_w^2 / fan_in), is this registry scheme (Var = gain^2 / fan_in) with gain = sqrt(sigma_w^2), normal
SW2_SCHEME = "xavier_caffe"
#: a scenario name: it names files and folders
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]{0,119}$")


def image_shape(n_inputs: int) -> tuple[int, int, int]:
    """(1, s, s) for ``n_inputs = s*s`` (784 -> (1, 28, 28), 64 -> (1, 8, 8))."""
    s = math.isqrt(int(n_inputs))
    if s * s != int(n_inputs) or s < 1:
        raise InitlabError(f"model.widths[0]: a CNN needs square single-channel images, "
                           f"{n_inputs} inputs is not a square number")
    return (1, s, s)


def sw2_scheme(sw2: Any, path: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """(scheme, params) drawing W_ij ~ N(0, sw2 / fan_in): :data:`SW2_SCHEME` with gain = sqrt(sw2), normal.
    The realised variance is sw2 / fan_in at every weight layer (the first one too: sw2 / inputs)."""
    sw2 = as_number(sw2, path, positive=True)
    return SW2_SCHEME, (("distribution", "normal"), ("gain", math.sqrt(sw2)))


def scheme_sw2(scheme: str, params: Any) -> float | None:
    """The sigma_w^2 of a scheme drawing N(0, sigma_w^2 / fan_in) (the inverse of :func:`sw2_scheme`), else None."""
    p = dict(params)
    if scheme != SW2_SCHEME or p.get("distribution", "uniform") != "normal":
        return None
    return round(float(p.get("gain", 1.0)) ** 2, 10)


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
        name = as_str(self.name, "data.name", nonempty=True).strip().lower()
        if name not in DATASETS:
            raise InitlabError(f"data.name: {unknown_choice('data set', name, DATASETS)}")
        _set(self, "name", name)
        root = self.root
        if isinstance(root, Path):
            root = str(root)
        _set(self, "root", as_str("" if root is None else root, "data.root"))
        _set(self, "standardize", as_bool(self.standardize, "data.standardize"))
        tf = as_number(self.test_fraction, "data.test_fraction")
        if not 0.0 < tf < 1.0:
            raise fail("data.test_fraction", "a number between 0 and 1 (exclusive)", self.test_fraction)
        _set(self, "test_fraction", tf)
        _set(self, "split_seed", as_int(self.split_seed, "data.split_seed", minimum=0))
        _set(self, "limit", as_int(self.limit, "data.limit", minimum=0))

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
    before the dense layers ``widths[1:]`` (a 2x2 max-pool after each conv while ``pool``); ``resmlp`` is a stem
    layer then one residual block ``h + W2 phi(W1 h)`` per further hidden width; ``bias_var`` is the variance
    sigma_b^2 of the initial biases (N(0, sigma_b^2); 0 = zeros). See :func:`initlab.lab.models.build_model`."""

    kind: str = "mlp"
    widths: tuple[int, ...] = (784, 100, 100, 10)
    bias: bool = True
    channels: tuple[int, ...] = ()
    kernel: int = 3
    bias_var: float = 0.0
    pool: bool = True

    def __post_init__(self) -> None:
        kind = as_str(self.kind, "model.kind", nonempty=True).strip().lower()
        if kind not in MODEL_KINDS:
            raise InitlabError(f"model.kind: {unknown_choice('model kind', kind, MODEL_KINDS)}")
        _set(self, "kind", kind)
        _set(self, "widths", as_ints(self.widths, "model.widths", minimum=1, min_len=2))
        _set(self, "bias", as_bool(self.bias, "model.bias"))
        channels = as_ints(self.channels, "model.channels", minimum=1, min_len=0)
        kernel = as_int(self.kernel, "model.kernel", minimum=1)
        if kind == "cnn":
            if not channels:
                raise fail("model.channels", "a non-empty list of integers for kind = 'cnn'", list(channels))
            image_shape(self.widths[0])  # square single-channel input
        elif channels:
            raise InitlabError(f"model.channels: only used with kind = 'cnn' (kind is {kind!r}); remove it")
        elif kernel != 3:
            raise InitlabError(f"model.kernel: only used with kind = 'cnn' (kind is {kind!r}); remove it")
        _set(self, "channels", channels)
        _set(self, "kernel", kernel)
        bias_var = as_number(self.bias_var, "model.bias_var")
        if bias_var < 0 or (bias_var > 0 and not self.bias):
            raise fail("model.bias_var", "a variance >= 0 (and bias = true when it is > 0)", self.bias_var)
        _set(self, "bias_var", bias_var)
        _set(self, "pool", as_bool(self.pool, "model.pool"))
        if kind != "cnn" and not self.pool:
            raise InitlabError(f"model.pool: only used with kind = 'cnn' (kind is {kind!r}); remove it")
        if kind == "resmlp" and (len(self.widths) < 3 or len(set(self.widths[1:-1])) != 1):
            raise fail("model.widths", "[inputs, w, w, ..., classes] with equal hidden widths for kind = 'resmlp'",
                       list(self.widths))

    @property
    def depth(self) -> int:
        """Number of hidden (dense) layers."""
        return len(self.widths) - 2


@dataclass(frozen=True)
class TrainSpec:
    """The ``[train]`` table: optimiser (``momentum`` for SGD), learning rate, batch size, steps, logging, seeds;
    ``layer_stats``: per-layer activation and back-propagated gradient statistics at each log step, and their
    histograms at step 0 and three log steps (MLPs; :mod:`initlab.lab.training.records`);
    ``jacobian``: the singular values of each layer's Jacobian in the first pass."""

    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 30
    steps: int = 1000
    log_every: int = 50
    first_pass_batch: int = 100
    device: str = "cpu"
    seeds: tuple[int, ...] = (0, 1, 2)
    momentum: float = 0.0
    layer_stats: bool = False
    jacobian: bool = False
    histograms_every: int = 1  # weight histograms in TensorBoard every that many log steps (0: none)

    def __post_init__(self) -> None:
        opt = as_str(self.optimizer, "train.optimizer", nonempty=True).strip().lower()
        if opt not in OPTIMIZERS:
            raise InitlabError(f"train.optimizer: {unknown_choice('optimizer', opt, OPTIMIZERS)}")
        _set(self, "optimizer", opt)
        _set(self, "lr", as_number(self.lr, "train.lr", positive=True))
        for key in ("batch_size", "steps", "log_every", "first_pass_batch"):
            _set(self, key, as_int(getattr(self, key), f"train.{key}", minimum=1))
        if self.log_every > self.steps:
            raise fail("train.log_every", f"at most train.steps ({self.steps})", self.log_every)
        _set(self, "device", _device(self.device))
        _set(self, "seeds", _seeds(self.seeds))
        momentum = as_number(self.momentum, "train.momentum")
        if not 0.0 <= momentum < 1.0 or (momentum and opt != "sgd"):
            raise fail("train.momentum", "a number in [0, 1), used with optimizer = 'sgd'", self.momentum)
        _set(self, "momentum", momentum)
        _set(self, "layer_stats", as_bool(self.layer_stats, "train.layer_stats"))
        _set(self, "jacobian", as_bool(self.jacobian, "train.jacobian"))
        _set(self, "histograms_every", as_int(self.histograms_every, "train.histograms_every", minimum=0))


def _device(value: Any) -> str:
    device = as_str(value, "train.device", nonempty=True).strip()
    try:
        torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise fail("train.device", "a device such as 'cpu', 'cuda' or 'cuda:0'", device) from e
    return device


def _seeds(seeds: Any) -> tuple[int, ...]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = tuple(range(as_int(seeds, "train.seeds", minimum=1)))
    seeds = as_ints(seeds, "train.seeds", minimum=0, min_len=1)
    dup = sorted(s for s, n in Counter(seeds).items() if n > 1)
    if dup:
        raise InitlabError(f"train.seeds: seed {dup[0]} appears twice in {list(seeds)}")
    return seeds


@dataclass(frozen=True)
class Scenario:
    """One initialisation scenario: an activation, a scheme (+ parameters), its fully resolved model and a
    residual-branch policy (``residual``: ``none``, or ``skipinit`` / ``fixup`` / ``gpt2`` of
    :func:`initlab.init_model`, applied after the scheme; residual models only)."""

    name: str
    activation: str
    scheme: str
    params: tuple[tuple[str, Any], ...] = ()
    model: ModelSpec = field(default_factory=ModelSpec)
    residual: str = "none"

    def __post_init__(self) -> None:
        where = f"scenario {self.name!r}"
        name = as_str(self.name, f"{where}.name", nonempty=True)
        if not NAME_RE.match(name):
            raise InitlabError(f"{where}.name: expected letters, digits and _ . + = - (it names files and "
                               f"folders; at most 120 characters), got {name!r}")
        params = as_params(self.params, f"{where}.params")
        _set(self, "activation", activation_name(self.activation, f"{where}.activation"))
        scheme, params = scheme_and_params(self.scheme, params, f"{where}.scheme", self.activation)
        _set(self, "scheme", scheme)
        _set(self, "params", params)
        if not isinstance(self.model, ModelSpec):
            raise fail(f"{where}.model", "a ModelSpec", self.model)
        _set(self, "residual", residual_policy(self.residual, f"{where}.residual", self.model.kind))


def residual_policy(value: Any, path: str, kind: str) -> str:
    """A residual policy of :data:`RESIDUALS` (lower case); one other than ``none`` needs ``kind = 'resmlp'``."""
    v = as_str(value, path, nonempty=True).strip().lower()
    if v not in RESIDUALS:
        raise InitlabError(f"{path}: {unknown_choice('residual', v, RESIDUALS)}")
    if v != "none" and kind != "resmlp":
        raise InitlabError(f"{path}: {v!r} acts on residual branches, and model.kind = {kind!r} has none "
                           "(use kind = 'resmlp' or residual = 'none')")
    return v


@dataclass(frozen=True)
class Claim:
    """One published claim a preset checks: what is measured and what it must be (see :mod:`initlab.lab.claims`).

    ``quantity`` names a registered claim quantity, called with ``args``; it returns one value per
    seed. ``expect``: ``approx`` (``|x - value| <= tolerance``), ``above`` (``x > value``) or
    ``below`` (``x < value``), compared on ``scale`` (``linear``, ``log2`` or ``log10`` of x).
    ``test``: ``t95`` (the 95% Student-t interval of the mean over seeds must lie inside the
    expected region to reproduce, outside it to fail; inconclusive otherwise) or ``every_seed``
    (every seed inside: reproduced; every seed outside: not reproduced).
    """

    id: str
    source: str
    claim: str
    quantity: str
    expect: str
    value: float
    args: tuple[tuple[str, Any], ...] = ()
    tolerance: float = 0.0
    scale: str = "linear"
    test: str = "t95"

    def __post_init__(self) -> None:
        cid = as_str(self.id, "claims.id", nonempty=True)
        if not NAME_RE.match(cid):
            raise InitlabError(f"claims.id: expected letters, digits and _ . + = -, got {cid!r}")
        where = f"claim {cid!r}"
        for key in ("source", "claim", "quantity"):
            _set(self, key, as_str(getattr(self, key), f"{where}.{key}", nonempty=True))
        for key, valid in (("expect", CLAIM_EXPECT), ("scale", CLAIM_SCALES), ("test", CLAIM_TESTS)):
            v = as_str(getattr(self, key), f"{where}.{key}", nonempty=True).strip().lower()
            if v not in valid:
                raise InitlabError(f"{where}.{key}: {unknown_choice(key, v, valid)}")
            _set(self, key, v)
        _set(self, "value", as_number(self.value, f"{where}.value"))
        tol = as_number(self.tolerance, f"{where}.tolerance")
        if tol < 0 or (self.expect == "approx" and tol == 0):
            raise fail(f"{where}.tolerance", "a number > 0 for expect = 'approx' (>= 0 otherwise)", self.tolerance)
        _set(self, "tolerance", tol)
        _set(self, "args", as_params(self.args, f"{where}.args"))


@dataclass(frozen=True)
class Experiment:
    """A whole experiment: data, base model, training, and the scenarios (each with its resolved model)."""

    name: str
    description: str
    data: DataSpec
    model: ModelSpec
    train: TrainSpec
    scenarios: tuple[Scenario, ...]
    claims: tuple[Claim, ...] = ()

    def __post_init__(self) -> None:
        as_str(self.name, "name", nonempty=True)
        as_str(self.description, "description")
        for key, cls in (("data", DataSpec), ("model", ModelSpec), ("train", TrainSpec)):
            if not isinstance(getattr(self, key), cls):
                raise fail(key, f"a {cls.__name__}", getattr(self, key))
        scenarios = tuple(self.scenarios)
        if not scenarios:
            raise InitlabError("scenarios: the experiment has no scenarios; add [[scenarios]] tables or a [grid]")
        _check_model_fits_data(self.model, self.data, "model.widths")
        seen: set[str] = set()
        for i, s in enumerate(scenarios):
            if not isinstance(s, Scenario):
                raise fail(f"scenarios[{i}]", "a Scenario", s)
            if s.name.lower() in seen:
                raise InitlabError(f"scenarios[{i}].name: duplicate scenario name {s.name!r} "
                                   "(names name folders, so they must differ in more than letter case)")
            seen.add(s.name.lower())
            _check_model_fits_data(s.model, self.data, f"scenarios[{i}].widths")
        _set(self, "scenarios", scenarios)
        claims = tuple(self.claims)
        ids = [c.id for c in claims if isinstance(c, Claim)]
        if len(ids) != len(claims) or len(set(ids)) != len(ids):
            raise InitlabError(f"claims: expected Claim entries with distinct ids, got {ids}")
        _set(self, "claims", claims)

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
