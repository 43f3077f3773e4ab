"""The per-step metrics of a run: one registry entry each, from training to the report.

An entry (:class:`Metric`) says how the metric is computed and recorded and how it is shown:

* ``name``: the ``metric`` value of its rows in ``metrics.csv`` (long format: scenario, seed,
  step, split, metric, value); rows are ordered by the registry within each (member, step, split);
* ``splits``: ``"train"`` (a value per member at each log step) and/or ``"test"`` (the whole
  held-out split, at step 0 and at each log step);
* ``compute``: ``None`` for the two metrics the training engines compute in their fused kernels
  (``loss`` and ``acc``: the mean over the steps since the previous log of each step's minibatch
  value, and the held-out value); else a function called at each log step with a
  :class:`LogView` of the ensemble (every member's weights and last gradients) that returns a
  tensor of shape (M,), one value per member, or (M, K): K values per member, recorded as
  ``<name>_1`` ... ``<name>_K`` (e.g. one per layer);
* ``label`` (axis and report wording), ``tag`` (TensorBoard scalar tag; test rows get
  ``test/<tag>``), ``plot`` and ``caption`` (the figure ``figures/<plot>``), ``percent``,
  ``higher_is_better``, ``log_scale`` (a log axis when the values span more than 50x) and
  ``summary`` (the splits whose final value the report's summary table shows).

A new metric is one :func:`register_metric` call; it then appears in ``metrics.csv``, the
TensorBoard logs, the figures and the report. ``compute`` runs inside
:func:`initlab.lab.training.run_group`, so a run on another executor needs it importable there
(a module-level function). The defaults (``loss``, ``acc``) give the metrics.csv of the classic
study.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .._errors import InitlabError

__all__ = ["Metric", "LayerState", "LogView", "register_metric", "unregister_metric", "registered", "find", "owner",
           "component_names", "component_label", "sort_key", "headline", "display_order", "tensorboard_tag",
           "values_by_name", "ENGINE_METRICS", "SPLITS", "HEADLINE", "METRICS_COLUMNS"]

#: the columns of metrics.csv (long format: one row per member, step, split and metric)
METRICS_COLUMNS = ("scenario", "seed", "step", "split", "metric", "value")
SPLITS = ("train", "test")
#: the metrics every engine computes itself (in this order: the engines' outputs)
ENGINE_METRICS = ("loss", "acc")


@dataclass(frozen=True)
class LayerState:
    """One weight layer of every member: ``weight`` (M, ...) and its last gradient (M, ...) or None."""

    name: str
    weight: Tensor
    grad: Tensor | None


@dataclass(frozen=True)
class LogView:
    """What a metric's ``compute`` sees at a log step: the step, the live members' keys (the
    member axis M, in order) and every weight layer of the ensemble after that step's update;
    ``stats()`` (with ``train.layer_stats``): per-layer statistics of the members on a fixed
    held-out batch, ``{"act_mean", "act_var", "grad_var", "wgrad_var"}`` each (M, L)."""

    step: int
    members: tuple[tuple[str, int], ...]
    layers: tuple[LayerState, ...]
    stats: Callable[[], dict[str, Tensor]] | None = None


@dataclass(frozen=True)
class Metric:
    """A per-step metric: how it is computed and recorded, and how it is shown (see the module docstring)."""

    name: str
    label: str
    splits: tuple[str, ...] = ("train",)
    compute: Callable[[LogView], Tensor] | None = None
    tag: str = ""
    plot: str | None = None
    caption: str = ""
    percent: bool = False
    higher_is_better: bool = False
    log_scale: bool = False
    summary: tuple[str, ...] = ()
    component: str = "part"  # what the K values of an (M, K) metric are: "layer" -> "<label>, layer k"
    optional: bool = False  # recorded only when the experiment asks (train.layer_stats)

    def __post_init__(self) -> None:
        bad = [s for s in (*self.splits, *self.summary) if s not in SPLITS]
        if not self.name or not self.splits or bad:
            raise InitlabError(f"metric {self.name!r}: needs a name and splits from {SPLITS}, got {self.splits}")
        if self.compute is None and self.name not in ENGINE_METRICS:
            raise InitlabError(f"metric {self.name!r}: give a compute function (only {', '.join(ENGINE_METRICS)} "
                               "come from the training engines)")
        if self.compute is not None and "test" in self.splits:
            raise InitlabError(f"metric {self.name!r}: a computed metric has train rows only (at each log step)")

    @property
    def scalar_tag(self) -> str:
        return self.tag or self.name


_REGISTRY: list[Metric] = [
    Metric("loss", "loss", splits=("train", "test"), plot="loss.png", log_scale=True, summary=("test",),
           caption="Cross-entropy loss during training: mean over seeds, band = \u00b11 standard deviation"),
    Metric("acc", "accuracy", splits=("train", "test"), plot="accuracy.png", percent=True, higher_is_better=True,
           summary=("train", "test"),
           caption="Accuracy during training: mean over seeds, band = \u00b11 standard deviation"),
]
#: the metric that ranks the scenarios (the report's orderings and the CLI's summary)
HEADLINE = "acc"


def _layer_stat(key: str) -> Callable[[LogView], Tensor]:
    def compute(view: LogView) -> Tensor:
        if view.stats is None:
            raise InitlabError(f"metric {key!r} needs train.layer_stats = true")
        return view.stats()[key]
    compute.__name__ = f"layer_{key}"
    return compute


# per-layer statistics during training (train.layer_stats; Glorot & Bengio 2010, Figs. 2-7): on a fixed held-out
# batch, layer l's output h_l = phi(z_l) (the logits for the readout), dL/dz_l and dL/dW_l of the mean cross-entropy
for _key, _label in (("act_mean", "mean activation"), ("act_var", "activation variance"),
                     ("grad_var", "back-propagated gradient variance"), ("wgrad_var", "weight-gradient variance")):
    _REGISTRY.append(Metric(_key, _label, compute=_layer_stat(_key), component="layer", optional=True,
                            log_scale=_key != "act_mean"))


def registered() -> tuple[Metric, ...]:
    """Every metric, in registry (= metrics.csv row) order."""
    return tuple(_REGISTRY)


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` at the end of the registry (its name must be new); returns it."""
    if not isinstance(metric, Metric):
        raise InitlabError(f"register_metric: expected a Metric, got {type(metric).__name__}")
    if find(metric.name) is not None:
        raise InitlabError(f"metric {metric.name!r} is already registered")
    _REGISTRY.append(metric)
    return metric


def unregister_metric(name: str) -> None:
    """Remove the metric ``name`` (a default metric cannot be removed)."""
    if name in ENGINE_METRICS:
        raise InitlabError(f"metric {name!r} is computed by the training engines and cannot be removed")
    _REGISTRY[:] = [m for m in _REGISTRY if m.name != name]


def find(name: str) -> Metric | None:
    """The entry named ``name``, or None."""
    return next((m for m in _REGISTRY if m.name == name), None)


def _split_component(name: str) -> tuple[Metric, int] | None:
    """``("grad_norm_2")`` -> (the grad_norm entry, 2) when ``grad_norm`` is registered; else None."""
    base, _, k = str(name).rpartition("_")
    entry = find(base) if k.isdigit() and base else None
    return (entry, int(k)) if entry is not None else None


def owner(name: str) -> tuple[Metric, int] | None:
    """(entry, component) of a metrics.csv metric name: component 0 for a one-value metric, k for ``<name>_k``."""
    entry = find(name)
    return (entry, 0) if entry is not None else _split_component(name)


def component_names(metric: Metric, names: Sequence[str]) -> list[str]:
    """The metric names among ``names`` (e.g. metrics.csv's) that ``metric`` records, in component order."""
    mine = [(o[1], n) for n in dict.fromkeys(names) if (o := owner(n)) is not None and o[0] is metric]
    return [n for _, n in sorted(mine)]


def component_label(metric: Metric, name: str) -> str:
    """``"gradient norm, layer 2"`` for the component ``grad_norm_2``; the label for a one-value metric."""
    o = owner(name)
    return metric.label if o is None or o[1] == 0 else f"{metric.label}, {metric.component} {o[1]}"


def sort_key(name: str) -> tuple[int, int, str]:
    """Order of a metric name within (member, step, split): registry order, then component."""
    o = owner(name)
    if o is None:
        return (len(_REGISTRY), 0, str(name))
    return (_REGISTRY.index(o[0]), o[1], "")


def headline() -> Metric:
    """The metric that ranks the scenarios (accuracy)."""
    entry = find(HEADLINE)
    assert entry is not None  # the default metrics cannot be removed
    return entry


def display_order() -> list[Metric]:
    """The metrics as the report and the figures show them: the headline first, then registry order."""
    first = headline()
    return [first] + [m for m in _REGISTRY if m is not first]


def tensorboard_tag(name: str, split: str) -> str:
    """The TensorBoard scalar tag of a metrics.csv metric name and split (``acc``/``test``: ``test/acc``)."""
    o = owner(name)
    if o is None:
        return f"{split}/{name}"
    entry, k = o
    tag = entry.scalar_tag + (f"_{k}" if k else "")
    return tag if split == "train" else f"test/{tag}"


def values_by_name(metric: Metric, values: Any) -> dict[str, list[float]]:
    """A computed metric's output (a tensor (M,) or (M, K)) as ``{metrics.csv name: M values}``."""
    if values.dim() == 1:
        return {metric.name: values.tolist()}
    if values.dim() != 2:
        raise InitlabError(f"metric {metric.name!r}: compute must return a tensor of shape (M,) or (M, K), "
                           f"got {tuple(values.shape)}")
    cols = values.t().tolist()
    return {f"{metric.name}_{k + 1}": col for k, col in enumerate(cols)}
