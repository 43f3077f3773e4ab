"""initlab: weight initialization done right, and shown why.

The public API is curated here and loaded lazily, so ``import initlab`` costs only torch
and numpy (no pandas, matplotlib, scipy or tensorboard).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> private module that defines it
_EXPORTS: dict[str, str] = {
    # errors and activations
    "InitlabError": "._errors",
    "Activation": "._activations",
    "resolve_activation": "._activations",
    "activation_names": "._activations",
    "register_activation": "._activations",
    # fans and gains
    "fans": "._fans",
    "gain": "._gains",
    "gain_table": "._gains",
    # the engine and the named schemes
    "variance_scaling_": "._engine",
    "variance_scaling": "._engine",
    "truncated_normal_": "._engine",
    "get_scheme": "._schemes",
    "schemes": "._schemes",
    "register_scheme": "._schemes",
    "Scheme": "._schemes",
    "normal_": "._schemes",
    "xavier_normal_": "._schemes",
    "xavier_uniform_": "._schemes",
    "he_normal_": "._schemes",
    "he_uniform_": "._schemes",
    "lecun_normal_": "._schemes",
    "lecun_uniform_": "._schemes",
    "kumar_": "._schemes",
    "orthogonal_": "._schemes",
    "delta_orthogonal_": "._schemes",
    # whole models
    "init_model": "._apply",
    "InitReport": "._apply",
    "find_activations": "._graph",
    # diagnostics
    "probe": "._probe",
    "ProbeResult": "._probe",
    "audit": "._audit",
    "AuditResult": "._audit",
    "lsuv_": "._lsuv",
    "LSUVReport": "._lsuv",
}
_SUBMODULES = {"theory", "lab"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'initlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._activations import Activation, activation_names, register_activation, resolve_activation
    from ._apply import InitReport, init_model
    from ._audit import AuditResult, audit
    from ._engine import truncated_normal_, variance_scaling, variance_scaling_
    from ._errors import InitlabError
    from ._fans import fans
    from ._gains import gain, gain_table
    from ._graph import find_activations
    from ._lsuv import LSUVReport, lsuv_
    from ._probe import ProbeResult, probe
    from ._schemes import (Scheme, delta_orthogonal_, get_scheme, he_normal_, he_uniform_, kumar_,
                           lecun_normal_, lecun_uniform_, normal_, orthogonal_, register_scheme,
                           schemes, xavier_normal_, xavier_uniform_)
