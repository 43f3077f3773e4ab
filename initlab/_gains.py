"""Gains: the factor ``g`` in ``Var[W] = g^2 / fan`` that keeps signals at unit scale.

Three methods:

* ``"second_moment"`` (default): g = 1 / sqrt(E[phi(z)^2]), z ~ N(0, 1). With unit-variance
  pre-activations, the next layer's pre-activation variance is ``fan_in * Var[W] * E[phi^2]``,
  so this g keeps it at 1. It is He et al. (2015)'s argument generalised to any activation:
  ReLU gives E[phi^2] = 1/2, g = sqrt(2) exactly; leaky ReLU with slope a gives
  sqrt(2 / (1 + a^2)). Closed forms come from the activation table; other activations are
  integrated numerically by :mod:`initlab.theory`'s Gaussian quadrature (composite
  Gauss-Legendre split at the activation's kinks; Gauss-Hermite converges slowly for phi with
  kinks such as relu6, hardswish). Results are cached.
* ``"kumar"``: Kumar (2017): for phi differentiable at 0, Var[W] = 1 / (N phi'(0)^2 (1 + phi(0)^2)),
  i.e. g = 1 / sqrt(phi'(0)^2 (1 + phi(0)^2)). tanh gives 1; sigmoid (phi(0) = 1/2,
  phi'(0) = 1/4) gives g^2 = 12.8. The derivative is checked numerically from both sides, so
  ReLU-like activations (and SELU, ELU with alpha != 1) get a clear error pointing to
  ``second_moment``.
* ``"torch"``: PyTorch's ``torch.nn.init.calculate_gain`` table (tanh 5/3, selu 3/4,
  sigmoid 1, relu sqrt(2), leaky sqrt(2 / (1 + a^2))), for compatibility.
"""
from __future__ import annotations

import argparse
import math
import threading
import weakref
from typing import Any

import torch

from ._activations import Activation, activation_names, resolve_activation
from ._errors import InitlabError, one_line_usage_errors, unknown_choice
from ._text import text_table
from .theory import gaussian_moments

__all__ = ["gain", "gain_table", "second_moment", "METHODS", "register_cli"]

METHODS = ("second_moment", "kumar", "torch")
_METHOD_HELP = {
    "second_moment": "1/sqrt(E[phi(z)^2]), z ~ N(0,1) (He et al. 2015, generalised)",
    "kumar": "1/sqrt(phi'(0)^2 (1 + phi(0)^2)) (Kumar 2017; activations differentiable at 0)",
    "torch": "torch.nn.init.calculate_gain (for compatibility)",
}


_lock = threading.Lock()
# (method, row, param) -> gain: keyed on the table row, so a re-registered row is never stale
_cache: dict[tuple[str, Any, float | None], float] = {}
_custom_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _check_method(method: object) -> str:
    key = method.strip().lower().replace("-", "_") if isinstance(method, str) else method
    if key not in METHODS:
        raise unknown_choice("method", method, METHODS)
    return key  # type: ignore[return-value]


def _eval(act: Activation, x: torch.Tensor) -> torch.Tensor:
    try:
        y = act.fn(x)
    except Exception as e:  # a custom callable that does not take a float64 tensor
        try:
            y = act.fn(x.float())
        except Exception:
            raise InitlabError(f"activation {act.name!r} failed on a tensor ({type(e).__name__}: {e}); "
                               "it must be an elementwise function of a torch tensor") from e
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        raise InitlabError(f"activation {act.name!r} must map a tensor to a tensor of the same shape, "
                           f"got {type(y).__name__}")
    return y.detach().double()


def second_moment(activation: object, param: float | None = None) -> float:
    """E[phi(z)^2] for z ~ N(0, 1): the closed form where known, else the quadrature of
    :func:`initlab.theory.gaussian_moments` (the same rule the variance recursion uses)."""
    act = resolve_activation(activation, param)
    if act.second_moment is not None:
        return float(act.second_moment)
    _eval(act, torch.zeros(3, dtype=torch.float64))  # a clear error for a callable that is not elementwise
    return float(gaussian_moments(act, 1.0)["sq_mean"])


@torch.no_grad()
def _kumar(act: Activation) -> float:
    if not act.differentiable_at_0:
        raise _not_differentiable(act, None)
    h = 1e-4
    x = torch.tensor([-2 * h, -h, 0.0, h, 2 * h], dtype=torch.float64)
    y = _eval(act, x).tolist()
    f0 = y[2]
    right = (-3 * f0 + 4 * y[3] - y[4]) / (2 * h)  # second-order one-sided differences
    left = (3 * f0 - 4 * y[1] + y[0]) / (2 * h)
    if not all(math.isfinite(v) for v in (f0, left, right)):
        raise InitlabError(f"activation {act.name!r} is not finite near 0; Kumar's rule does not apply")
    if abs(right - left) > 1e-5 * max(1.0, abs(right), abs(left)):
        raise _not_differentiable(act, (left, right))
    d = _exact_slope_at_0(act, 0.5 * (left + right))
    if abs(d) < 1e-8:
        raise InitlabError(f"activation {act.name!r} has phi'(0) = 0, so Kumar's rule gives an infinite gain; "
                           "use method='second_moment'")
    return 1.0 / math.sqrt(d * d * (1.0 + f0 * f0))


def _exact_slope_at_0(act: Activation, estimate: float) -> float:
    """phi'(0) by autograd where it agrees with the finite-difference ``estimate`` (exact to the
    last bit for sigmoid: 1/4), else the estimate itself (callables autograd cannot follow)."""
    try:
        with torch.enable_grad():
            x0 = torch.zeros(1, dtype=torch.float64, requires_grad=True)
            (g,) = torch.autograd.grad(act.fn(x0).sum(), x0)
        slope = float(g)
    except Exception:  # noqa: BLE001 - any failure means: keep the finite difference
        return estimate
    ok = math.isfinite(slope) and abs(slope - estimate) <= 1e-5 * max(1.0, abs(estimate))
    return slope if ok else estimate


def _not_differentiable(act: Activation, sides: tuple[float, float] | None) -> InitlabError:
    jump = "" if sides is None else f" (its slope jumps from {sides[0]:.4g} to {sides[1]:.4g} at 0)"
    return InitlabError(
        f"method 'kumar' needs an activation differentiable at 0, and {act.name!r} is not{jump}. "
        "Use method='second_moment', which gives He et al. (2015)'s sqrt(2) for ReLU and "
        "handles any activation. Valid methods: " + ", ".join(METHODS))


def _torch(act: Activation) -> float:
    if act.torch_gain is None:
        known = [n for n in activation_names() if resolve_activation(n).torch_gain is not None]
        raise InitlabError(f"torch.nn.init.calculate_gain has no entry for activation {act.name!r}; "
                           f"it knows {', '.join(known)}. Use method='second_moment' instead")
    return float(act.torch_gain)


def _compute(act: Activation, method: str) -> float:
    if method == "torch":
        return _torch(act)
    if method == "kumar":
        return _kumar(act)
    m = second_moment(act)
    if not (math.isfinite(m) and m > 0):
        raise InitlabError(f"activation {act.name!r} has E[phi(z)^2] = {m!r}; it must be finite and > 0")
    return 1.0 / math.sqrt(m)


def gain(activation: object, param: float | None = None, *, method: str = "second_moment") -> float:
    """The gain ``g`` of an activation: use ``Var[W] = g^2 / fan`` (see the module docstring).

    Args:
        activation: a name (``"relu"``, ``"leaky_relu"``, ``"gelu"``...), an ``nn.Module``
            instance or class, a torch function (``torch.tanh``), any elementwise callable on
            tensors, or None (identity).
        param: the slope of leaky_relu/prelu or the alpha of elu/celu (default: torch's).
        method: ``"second_moment"`` (default), ``"kumar"`` or ``"torch"``.

    Examples: ``gain("relu") == sqrt(2)``; ``gain("sigmoid", method="kumar") ** 2 == 12.8``;
    ``gain("tanh", method="torch") == 5/3``.
    """
    method = _check_method(method)
    act = resolve_activation(activation, param)
    if not act.custom:
        key = (method, *act.cache_key)
        with _lock:
            hit = _cache.get(key)
        if hit is None:
            hit = _compute(act, method)
            with _lock:
                _cache[key] = hit
        return hit
    key = act.cache_key
    if key is None:
        return _compute(act, method)
    try:
        per_fn = _custom_cache.setdefault(act.fn, {})
    except TypeError:  # not weak-referenceable: no cache
        return _compute(act, method)
    # a module's settings and parameters are part of the key: a changed module is recomputed
    state = key[2] if len(key) > 2 else None
    hit = per_fn.get(method)
    if hit is None or hit[0] != state:
        hit = per_fn[method] = (state, _compute(act, method))
    return hit[1]


def gain_table(method: str = "second_moment") -> list[tuple[str, float | None]]:
    """``(name, gain)`` for every activation of the table, with default parameters; the gain is
    None where the method does not apply (Kumar for activations not differentiable at 0,
    torch for activations outside ``calculate_gain``'s table)."""
    method = _check_method(method)
    out: list[tuple[str, float | None]] = []
    for name in activation_names():
        try:
            out.append((name, gain(name, method=method)))
        except InitlabError:
            out.append((name, None))
    return out


# --------------------------------------------------------------------------------------------
# CLI: ``initlab gains``

def _format_table(names: list[str], methods: list[str], param: float | None) -> str:
    rows = []
    for name in names:
        act = resolve_activation(name, param if param is not None and
                                 resolve_activation(name).param is not None else None)
        cells = [act.label, act.family]
        for m in methods:
            try:
                cells.append(f"{gain(act, method=m):.6f}")
            except InitlabError:
                cells.append("-")
        rows.append(cells)
    return text_table(["activation", "family", *methods], rows)


def _cli_gains(args: argparse.Namespace) -> int:
    methods = list(METHODS) if args.method == "all" else [_check_method(args.method)]
    names = args.activations or activation_names()
    for n in names:
        resolve_activation(n)  # unknown names: a clear error before printing anything
    print("Gain g of each activation: initialise weights with Var[W] = g^2 / fan_in.")
    for m in methods:
        print(f"  {m}: {_METHOD_HELP[m]}")
    print("  '-': the method does not apply to that activation.")
    print()
    print(_format_table(list(names), methods, args.param))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``initlab gains [ACTIVATION ...] [--method M] [--param P]``."""
    p = subparsers.add_parser("gains", help="print the gain of every known activation",
                              description="Print the initialisation gain of each activation under each method.")
    p.add_argument("activations", nargs="*", metavar="ACTIVATION",
                   help="activation names (default: all known activations)")
    p.add_argument("--method", default="all", choices=["all", *METHODS],
                   help="gain method (default: all three as columns)")
    p.add_argument("--param", type=float, default=None,
                   help="slope of leaky_relu/prelu or alpha of elu/celu (default: torch's)")
    p.set_defaults(func=_cli_gains)
    one_line_usage_errors(p)

