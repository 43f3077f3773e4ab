"""initlab's lab: initializer x activation x depth x seed grids, trained as batched ensembles,
logged to TensorBoard and summarised in plots and a self-contained HTML report.

Laid out by stage, each module importing only the ones before it: :mod:`.specs` (the
experiment's dataclasses) -> :mod:`.config` (TOML in and out) -> :mod:`.data` (the data sets)
-> :mod:`.models` -> :mod:`.metrics` (the per-step metric registry) -> :mod:`.training`
(plan, engines, loop, first pass, group) -> :mod:`.rundir` (layout, lock, commit, merge) ->
:mod:`.report` (load, findings, tables, plots, TensorBoard, HTML) -> :mod:`.executors` ->
:mod:`.run` -> :mod:`.cli`.

The lab imports the library, never the reverse. Names load lazily, so ``import initlab.lab``
stays as light as ``import initlab``.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "load_experiment": ".config",
    "list_presets": ".config",
    "experiment_to_toml": ".config",
    "Experiment": ".specs",
    "load_dataset": ".data",
    "Dataset": ".data",
    "build_model": ".models",
    "mlp": ".models",
    "cnn": ".models",
    "Metric": ".metrics",
    "register_metric": ".metrics",
    "unregister_metric": ".metrics",
    "plan_groups": ".training",
    "run_group": ".training",
    "run_experiment": ".run",
    "write_report": ".report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'initlab.lab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
