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
    "orthogonal_": "._orthogonal",
    "delta_orthogonal_": "._orthogonal",
    # whole models
    "init_model": "._apply",
    "InitReport": "._apply",
    "fingerprint": "._digest",
    "find_activations": "._graph",
    # diagnostics
    "probe": "._probe",
    "ProbeResult": "._probe",
    "audit": "._audit",
    "AuditResult": "._audit",
    "lsuv_": "._lsuv",
    "LSUVReport": "._lsuv",
    # real models: built by name, and which initialisation their libraries gave them
    "build_model": "._zoo",
    "survey": "._survey",
    "ModelSurvey": "._survey",
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


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only (``X as X``: a re-export)
    from ._activations import Activation as Activation
    from ._activations import activation_names as activation_names
    from ._activations import register_activation as register_activation
    from ._activations import resolve_activation as resolve_activation
    from ._apply import InitReport as InitReport
    from ._apply import init_model as init_model
    from ._audit import AuditResult as AuditResult
    from ._audit import audit as audit
    from ._digest import fingerprint as fingerprint
    from ._engine import truncated_normal_ as truncated_normal_
    from ._engine import variance_scaling as variance_scaling
    from ._engine import variance_scaling_ as variance_scaling_
    from ._errors import InitlabError as InitlabError
    from ._fans import fans as fans
    from ._gains import gain as gain
    from ._gains import gain_table as gain_table
    from ._graph import find_activations as find_activations
    from ._lsuv import LSUVReport as LSUVReport
    from ._lsuv import lsuv_ as lsuv_
    from ._orthogonal import delta_orthogonal_ as delta_orthogonal_
    from ._orthogonal import orthogonal_ as orthogonal_
    from ._probe import ProbeResult as ProbeResult
    from ._probe import probe as probe
    from ._schemes import Scheme as Scheme
    from ._schemes import get_scheme as get_scheme
    from ._schemes import he_normal_ as he_normal_
    from ._schemes import he_uniform_ as he_uniform_
    from ._schemes import kumar_ as kumar_
    from ._schemes import lecun_normal_ as lecun_normal_
    from ._schemes import lecun_uniform_ as lecun_uniform_
    from ._schemes import normal_ as normal_
    from ._schemes import register_scheme as register_scheme
    from ._schemes import schemes as schemes
    from ._schemes import xavier_normal_ as xavier_normal_
    from ._schemes import xavier_uniform_ as xavier_uniform_
    from ._survey import ModelSurvey as ModelSurvey
    from ._survey import survey as survey
    from ._zoo import build_model as build_model
