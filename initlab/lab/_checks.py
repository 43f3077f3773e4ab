"""Typed value checks for the experiment schema: each names the key path and what was expected.

``_int(v, "train.steps", minimum=1)`` returns the value or raises
``InitlabError("train.steps: expected an integer >= 1, got 0")``; unknown keys, activations and
schemes come with a "did you mean". Used by the spec dataclasses (:mod:`initlab.lab.specs`),
which validate themselves, and by the TOML reader (:mod:`initlab.lab.config`). No I/O.

Schemes are checked against the library's registry (:func:`initlab.get_scheme`), which holds the
model-level schemes ``auto`` and ``lsuv`` too: their parameters are checked the same way.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from .._activations import resolve_activation
from .._errors import InitlabError, closest, unknown_choice
from .._schemes import get_scheme, scheme_parameters, schemes

__all__ = ["fail", "as_int", "as_number", "as_bool", "as_str", "as_list", "as_ints", "as_table", "check_keys",
           "as_params", "activation_name", "scheme_and_params"]

Params = tuple[tuple[str, Any], ...]


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def fail(path: str, expected: str, v: Any) -> InitlabError:
    """``InitlabError("<path>: expected <expected>, got <v>")``."""
    return InitlabError(f"{path}: expected {expected}, got {_show(v)}")


def as_int(v: Any, path: str, *, minimum: int | None = None) -> int:
    if isinstance(v, float) and not isinstance(v, bool) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise fail(path, "an integer", v)
    if minimum is not None and v < minimum:
        raise fail(path, f"an integer >= {minimum}", v)
    return int(v)


def as_number(v: Any, path: str, *, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise fail(path, "a number", v)
    v = float(v)
    if not math.isfinite(v):
        raise fail(path, "a finite number", v)
    if positive and not v > 0:
        raise fail(path, "a number > 0", v)
    return v


def as_bool(v: Any, path: str) -> bool:
    if not isinstance(v, bool):
        raise fail(path, "true or false", v)
    return v


def as_str(v: Any, path: str, *, nonempty: bool = False) -> str:
    if not isinstance(v, str):
        raise fail(path, "a string", v)
    if nonempty and not v.strip():
        raise fail(path, "a non-empty string", v)
    return v


def as_list(v: Any, path: str, what: str) -> list:
    if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, (list, tuple)):
        raise fail(path, f"a list of {what}", v)
    return list(v)


def as_ints(v: Any, path: str, *, minimum: int, min_len: int = 1) -> tuple[int, ...]:
    items = as_list(v, path, "integers")
    if len(items) < min_len:
        raise fail(path, f"a list of at least {min_len} integer{'s' if min_len > 1 else ''}", v)
    return tuple(as_int(x, f"{path}[{i}]", minimum=minimum) for i, x in enumerate(items))


def as_table(v: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise fail(path, "a table", v)
    return v


def check_keys(d: Mapping[str, Any], valid: Iterable[str], path: str) -> None:
    """Every key of ``d`` is in ``valid``; else an error with the key path and a "did you mean"."""
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
            raise fail(path, "a finite number", v)
        return v
    if isinstance(v, (list, tuple)):
        return tuple(_param_value(x, f"{path}[{i}]") for i, x in enumerate(v))
    raise fail(path, "a number, string, boolean or list", v)


def as_params(v: Any, path: str) -> Params:
    """Scheme parameters as sorted ``(name, value)`` pairs (lists become tuples, so specs hash)."""
    if isinstance(v, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in v):
        v = dict(v)
    t = as_table(v, path)
    return tuple(sorted((str(k), _param_value(x, f"{path}.{k}")) for k, x in t.items()))


# ----------------------------------------------------------------------------- activation and scheme names


def activation_name(v: Any, path: str) -> str:
    """Canonical table name of an activation (aliases resolved); errors say the path."""
    name = as_str(v, path, nonempty=True)
    try:
        return resolve_activation(name).name
    except InitlabError as e:
        raise InitlabError(f"{path}: {e}") from None


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


def scheme_and_params(v: Any, params: Params, path: str, activation: str | None = None) -> tuple[str, Params]:
    """The scheme name and its parameters, checked against the library's scheme registry.

    A registry scheme with an ``activation`` parameter (``he_normal``, ``kumar``, ...) that the
    scenario leaves unset gets the scenario's activation, so that the gain always matches the
    network (the resolved value is written out in the canonical config).
    """
    name = as_str(v, path, nonempty=True).strip()
    kw = dict(params)
    ppath = path.rsplit(".", 1)[0] + ".params" if "." in path else "params"
    valid = list(schemes())
    if name not in valid and name.lower() in valid:
        name = name.lower()
    if name not in valid:
        raise InitlabError(f"{path}: {unknown_choice('scheme', name, valid)}")
    _check_params_against(scheme_parameters(name), kw, name, ppath)
    scheme = _get_scheme(name, kw, ppath)
    defaults = getattr(scheme, "params", None)
    if activation is not None and isinstance(defaults, Mapping) and "activation" in defaults and "activation" not in kw:
        kw["activation"] = activation
        try:
            get_scheme(name, **kw)
        except (InitlabError, TypeError) as e:
            raise InitlabError(f"{path}: scheme {name!r} does not fit activation {activation!r}: {e}") from None
    return name, tuple(sorted(kw.items()))


def _get_scheme(name: str, kw: Mapping[str, Any], ppath: str) -> Any:
    try:
        return get_scheme(name, **kw)
    except InitlabError as e:
        raise InitlabError(f"{ppath}: {e}") from None
    except TypeError as e:
        raise InitlabError(f"{ppath}: scheme {name!r} rejects these parameters ({e})") from None
