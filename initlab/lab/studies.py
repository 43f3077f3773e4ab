"""Claim quantities of the theory presets (``edge-of-chaos``, ``isometry``, ``fixup``), registered with
:func:`initlab.lab.claims.register_quantity` on import.

* ``depth_scale_agreement`` (Schoenholz et al. 2017, "Deep information propagation"): the share of
  grid cells (weight variance ``sw2``, depth ``L``) where the measured trainability agrees with the
  theory's, trainable iff ``L <= multiple * xi_c(sw2)`` (``xi_c`` from
  :func:`initlab.theory.depth_scales` with the run's activation and ``sb2 = model.bias_var``). A
  cell is trainable when its final test accuracy is above the midpoint between chance (0.1) and the
  best cell's accuracy, seed by seed. ``sw2`` of a scenario is read from its scheme (:func:`scenario_sw2`):
  the ``sw2`` axis of a grid or scenario (``Var(w) = sw2 / fan_in``, :func:`initlab.lab.specs.sw2_scheme`),
  or ``normal`` with ``std``: ``sw2 = std^2 * width`` (the hidden width), so ``Var(w) = sw2 / width``.
* ``jacobian_spread`` (Pennington, Schoenholz & Ganguli 2017): the standard deviation of
  ``log10 s`` over the singular values ``s`` of the Jacobian of the hidden stack (from the first
  hidden layer's output to the last hidden layer's output) at initialisation, on examples of the
  run's data; the model is rebuilt from the run's config (same scenario, same seed: the same
  weights). 0 is perfect dynamical isometry.
* ``jacobian_spread_ratio``: ``jacobian_spread`` of ``scenario`` over that of ``other``, seed by seed.
* ``final_diverged_as_chance``: the final test accuracy per seed, a diverged member (NaN) counting
  as chance (0.1), for claims that a network does not train.
* ``steps_to`` (Saxe et al. 2014): the first logged step at which a metric reaches ``target``
  (a loss: at or below; an accuracy: at or above); NaN when it never does. ``steps_to_ratio``: that
  of ``scenario`` over that of ``other``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .._errors import InitlabError
from ..theory import depth_scales, jacobian_spectrum
from .claims import register_quantity
from .config import experiment_from_dict, read_toml
from .data import load_dataset
from .specs import Experiment, scheme_sw2
from .training.plan import init_member

__all__ = ["scenario_sw2", "run_experiment_spec", "depth_scale_agreement", "jacobian_spread", "steps_to",
           "theory_trainable", "spectra_of"]

CHANCE = 0.1


def run_experiment_spec(data: Any) -> Experiment:
    """The run's experiment, parsed back from its ``config.toml`` text."""
    return experiment_from_dict(read_toml(data.config_text, "config.toml"))


def scenario_sw2(exp: Experiment) -> dict[str, float]:
    """``{scenario: sw2}`` for the scenarios with a weight variance sigma_w^2: those of an ``sw2`` axis or key
    (N(0, sw2 / fan_in), read back by :func:`initlab.lab.specs.scheme_sw2`), and those drawn ``normal`` with a
    ``std``: ``sw2 = std^2 * width`` (the hidden width)."""
    out = {}
    for sc in exp.scenarios:
        params = dict(sc.params)
        sw2 = scheme_sw2(sc.scheme, sc.params)
        if sw2 is not None:
            out[sc.name] = sw2
        elif sc.scheme == "normal" and "std" in params and len(sc.model.widths) >= 3:
            out[sc.name] = round(float(params["std"]) ** 2 * sc.model.widths[1], 10)
    return out


def theory_trainable(activation: str, sw2: float, sb2: float, depth: int, multiple: float = 6.0) -> bool:
    """Trainable by the depth scale: ``depth <= multiple * xi_c(sw2)``."""
    return depth <= multiple * depth_scales(activation, sw2, sb2)[1]


def depth_scale_agreement(data: Any, multiple: float = 6.0, metric: str = "acc",
                          split: str = "test") -> dict[int, float]:
    """Per seed: the share of (sw2, depth) cells where ``final accuracy > (chance + best) / 2`` agrees
    with ``depth <= multiple * xi_c(sw2)`` (see the module docstring)."""
    exp = run_experiment_spec(data)
    sw2 = scenario_sw2(exp)
    if len(set(sw2.values())) < 2:
        raise InitlabError("depth_scale_agreement needs scenarios with at least two values of sw2 (a [grid] sw2 "
                           "axis, or 'normal' with std)")
    by_name = {sc.name: sc for sc in exp.scenarios}
    finals = final_values(data.metrics, split, metric)
    out: dict[int, float] = {}
    seeds = sorted({s for v in finals.values() for s in v})
    for seed in seeds:
        accs = {n: finals[n][seed] for n in sw2 if n in finals and seed in finals[n]}
        finite = [a for a in accs.values() if math.isfinite(a)]
        if not finite:
            continue
        threshold = (CHANCE + max(finite)) / 2
        agree = [(math.isfinite(a) and a > threshold)
                 == theory_trainable(by_name[n].activation, sw2[n], exp.model.bias_var, len(by_name[n].model.widths) - 2,
                                     multiple)
                 for n, a in accs.items()]
        out[seed] = float(np.mean(agree))
    return out


def final_values(metrics: Any, split: str, metric: str) -> dict[str, dict[int, float]]:
    """``{scenario: {seed: value at the member's last logged step}}``."""
    d = metrics[(metrics["split"] == split) & (metrics["metric"] == metric)]
    out: dict[str, dict[int, float]] = {}
    for (sc, seed), g in d.sort_values("step").groupby(["scenario", "seed"]):
        out.setdefault(str(sc), {})[int(seed)] = float(g["value"].iloc[-1])
    return out


# ----------------------------------------------------------------------------- Jacobian spectra


def _hidden_stack(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(head, stack) of a lab MLP ``Flatten, Linear, act, ..., Linear``: head = Flatten + first Linear +
    act (to the first hidden output), stack = the hidden layers after it, up to the readout."""
    mods = list(model.children())
    if len(mods) < 5:
        raise InitlabError("jacobian_spread needs an MLP with at least two hidden layers")
    return nn.Sequential(*mods[:3]), nn.Sequential(*mods[3:-1])


def spectra_of(data: Any, scenario: str, examples: int = 4) -> dict[int, np.ndarray]:
    """``{seed: singular values}`` of the hidden stack's Jacobian at init, ``examples`` test inputs."""
    exp = run_experiment_spec(data)
    by_name = {sc.name: sc for sc in exp.scenarios}
    if scenario not in by_name:
        raise InitlabError(f"the run has no scenario {scenario!r}")
    ds = load_dataset(exp.data)
    x = ds.x_test[:examples].to(torch.float64)
    out = {}
    for seed in exp.train.seeds:
        model = init_member(by_name[scenario], seed).to(torch.float64)
        head, stack = _hidden_stack(model)
        with torch.no_grad():
            h = head(x)
        out[int(seed)] = jacobian_spectrum(stack, h).ravel()
    return out


def jacobian_spread(data: Any, scenario: str, examples: int = 4) -> dict[int, float]:
    """Per seed: the standard deviation of log10 s over the hidden stack's Jacobian singular values."""
    return {s: float(np.std(np.log10(np.maximum(v, 1e-300)))) for s, v in spectra_of(data, scenario, examples).items()}


def jacobian_spread_ratio(data: Any, scenario: str, other: str, examples: int = 4) -> dict[int, float]:
    """``jacobian_spread`` of ``scenario`` over that of ``other``, seed by seed."""
    a, b = jacobian_spread(data, scenario, examples), jacobian_spread(data, other, examples)
    return {s: a[s] / b[s] if b[s] > 0 else math.nan for s in sorted(set(a) & set(b))}


# ----------------------------------------------------------------------------- learning speed


def steps_to(data: Any, scenario: str, target: float, metric: str = "loss", split: str = "train") -> dict[int, float]:
    """Per seed: the first logged step where ``metric`` reaches ``target`` (loss: <=, accuracy: >=)."""
    d = data.metrics
    d = d[(d["scenario"] == scenario) & (d["metric"] == metric) & (d["split"] == split)]
    if d.empty:
        raise InitlabError(f"metrics.csv has no {split} {metric} of {scenario!r}")
    lower = metric == "loss"
    out = {}
    for seed, g in d.sort_values("step").groupby("seed"):
        v = g["value"].to_numpy(float)
        hit = np.nonzero(v <= target if lower else v >= target)[0]
        out[int(seed)] = float(g["step"].to_numpy()[hit[0]]) if hit.size else math.nan
    return out


def steps_to_ratio(data: Any, scenario: str, other: str, target: float, metric: str = "loss",
                   split: str = "train") -> dict[int, float]:
    """``steps_to`` of ``scenario`` over that of ``other`` (a step of 0 counts as 1), seed by seed."""
    a, b = steps_to(data, scenario, target, metric, split), steps_to(data, other, target, metric, split)
    return {s: max(a[s], 1.0) / max(b[s], 1.0) for s in sorted(set(a) & set(b))}


def final_diverged_as_chance(data: Any, scenario: str, metric: str = "acc", split: str = "test") -> dict[int, float]:
    """A metric's final value per seed, a diverged member (NaN) counting as chance (0.1): it did not train."""
    vals = final_values(data.metrics, split, metric).get(scenario)
    if vals is None:
        raise InitlabError(f"metrics.csv has no {split} {metric} of {scenario!r}")
    return {s: (v if math.isfinite(v) else CHANCE) for s, v in vals.items()}


_QUANTITIES: Mapping[str, Any] = {
    "final_diverged_as_chance": final_diverged_as_chance,
    "depth_scale_agreement": depth_scale_agreement,
    "jacobian_spread": jacobian_spread,
    "jacobian_spread_ratio": jacobian_spread_ratio,
    "steps_to": steps_to,
    "steps_to_ratio": steps_to_ratio,
}
for _name, _fn in _QUANTITIES.items():
    register_quantity(_name, _fn)
