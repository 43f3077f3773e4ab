"""Signal-propagation theory for random networks at initialisation.

Three tools, all for networks whose weights are drawn independently with mean zero:

1. **Variance recursion** for feed-forward chains (LeCun et al. 1998; Glorot & Bengio 2010;
   He et al. 2015). A layer ``h = W x + b`` with ``fan_in`` inputs, ``Var(w) = weight_var`` and
   ``Var(b) = bias_var`` has, for independent zero-mean weights,

   ``Var(h) = fan_in * weight_var * E[x^2] + bias_var``

   where ``E[x^2]`` is the *second moment* of its input, not ``Var(x)``: a non-zero input mean
   adds to the pre-activation variance. (The 784-input MNIST layer with N(0, 1) weights has
   ``784 * E[x^2] = 784 * 0.1124 ~= 88``, not ``784 * Var(x) ~= 74``.) Treating the
   pre-activation as Gaussian, the next layer's input second moment is
   ``E[phi(h)^2], h ~ N(0, Var(h))``. Backward, the variance of the gradient w.r.t. a
   pre-activation follows ``Var(dL/dh_k) = Var(dL/dh_{k+1}) * fan_out_{k+1} * weight_var_{k+1}
   * E[phi_k'(h_k)^2]``. See :func:`forward_variances` and :func:`backward_variances`;
   :func:`layer_specs_from_model` reads the chain off a model.

2. **Mean-field maps** (Poole et al. 2016, "Exponential expressivity in deep neural networks
   through transient chaos"; Schoenholz et al. 2017, "Deep information propagation") for a
   deep network with ``W_ij ~ N(0, sw2 / N)`` and ``b_i ~ N(0, sb2)``: the length map and its
   fixed point ``q*`` (:func:`length_map`, :func:`q_star`), the correlation map and ``c*``
   (:func:`correlation_map`, :func:`c_star`), ``chi1`` (:func:`chi1`), the critical ``sw2``
   where ``chi1 = 1`` (:func:`critical_sw2`) and the depth scales ``xi_q, xi_c``
   (:func:`depth_scales`); :func:`mean_field` gathers them.

3. **Jacobian spectrum** of a model on a batch (:func:`jacobian_spectrum`), to check dynamical
   isometry (Pennington, Schoenholz & Ganguli 2017, "Resurrecting the sigmoid in deep learning
   through dynamical isometry"): at criticality, orthogonal weights keep the singular values of
   the input-output Jacobian near 1 where Gaussian weights spread them.

Activations are anything :func:`initlab.resolve_activation` accepts (a name, an ``nn.Module``,
a torch function, any callable on tensors, ``None`` for the identity). ``phi`` is evaluated in
float64 through torch on numpy quadrature nodes, and ``phi'`` by torch autograd (central
differences for callables autograd cannot differentiate; sigmoid and tanh from their output,
``y (1 - y)`` and ``1 - y^2``, the formulas autograd uses), so any activation works. For the
positively homogeneous table activations (identity, relu, leaky_relu, prelu:
``phi(s z) = s phi(z)`` for ``s > 0``) the moments at ``q = 1`` are computed once by the
quadrature and scaled: ``E[phi] = sqrt(q) E[phi(z)]``, ``E[phi^2] = q E[phi(z)^2]``, ``E[phi'^2]``
constant, so the variance recursion costs no quadrature per call for ReLU networks.

**Quadrature.** Gaussian expectations ``E[g(u)], u ~ N(0, q)`` are computed as
``E[g(sqrt(q) z)], z ~ N(0, 1)``, by composite Gauss-Legendre on ``[-10, 10]`` (the mass outside
is 1.5e-23) with panel edges at 0, graded geometrically towards 0 (down to ``2^-J`` with ``J``
growing like ``log2(sqrt(q))``) and at the activation's known kinks (relu6: 6, hardtanh: +-1,
hardswish: +-3) scaled by ``1/sqrt(q)``. The expectations over two correlated Gaussians
(correlation map) use polar coordinates ``(z1, z2) = r (cos t, sin t)`` with the angular panels
split where ``u1 = 0`` or ``u2 = 0`` and graded towards those angles, the radial ones graded
towards ``r = 0``. Why not plain Gauss-Hermite: its nodes are ~0.16 apart near 0 (201 nodes), so
it cannot resolve ``phi`` at large ``q`` (``E[tanh'(u)^2]`` is 0.1% off at ``q = 10`` and 67% at
``q = 100``; a sigmoid layer with N(0, 1) weights on MNIST has ``q ~= 88``), and a node at 0
or kinks between nodes bias ReLU-type terms (``E[relu'(u1) relu'(u2)]`` is 1.4% off with a
64 x 64 rule). The rules here are accurate to ~1e-10 or better for smooth activations at any
``q`` up to 1e30, exact for ReLU/leaky ReLU (kink at 0), and ~1e-4 for kinks away from 0 in
the two-dimensional rule (relu6, hardtanh, hardswish).

Expectations at ``q = 0`` are the limits ``q -> 0+`` (so ``E[relu'(u)^2] = 1/2`` there).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._activations import Activation, resolve_activation
from ._errors import InitlabError, unknown_choice
from ._fans import module_fans
from ._forward import kept_buffers
from ._graph import find_activations
from ._layers import is_affine

__all__ = [
    "LayerSpec",
    "forward_variances",
    "backward_variances",
    "layer_specs_from_model",
    "gaussian_moments",
    "length_map",
    "q_star",
    "correlation_map",
    "c_star",
    "chi1",
    "critical_sw2",
    "depth_scales",
    "MeanField",
    "mean_field",
    "jacobian_spectrum",
]

# --------------------------------------------------------------------------------------------
# quadrature

_Z_MAX = 10.0  # integrate z over [-10, 10] (and r over [0, 10]); P(|z| > 10) = 1.5e-23
_GL_1D = 8  # Gauss-Legendre points per panel, one-dimensional rule
_GL_RADIAL = 8  # ... radial panels of the two-dimensional rule
_GL_ANGULAR = 8  # ... angular panels of the two-dimensional rule
_Q_TINY = 1e-200  # q = 0 is evaluated at this q (the limit q -> 0+)
_Q_MAX = 1e30  # lengths beyond this count as diverged (q* = inf)
_MAX_LEVELS = 60

def _levels(q_max: float, extra: int) -> int:
    """Grading depth: panels reach down to ``2^-J`` so that ``sqrt(q) * 2^-J`` stays below ~1."""
    if not math.isfinite(q_max) or q_max > 1e300:
        return _MAX_LEVELS
    return int(min(_MAX_LEVELS, max(2, math.ceil(0.5 * math.log2(max(q_max, 1.0))) + extra)))


_GL_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _gauss_legendre(m: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes on [0, 1] and weights summing to 1."""
    got = _GL_CACHE.get(m)
    if got is None:
        x, w = np.polynomial.legendre.leggauss(m)
        got = ((x + 1.0) / 2.0, w / 2.0)
        _GL_CACHE[m] = got
    return got


_EDGE_CACHE: dict[int, np.ndarray] = {}


def _half_edges(levels: int) -> np.ndarray:
    """Panel edges on [0, Z_MAX]: 0, 2^-J, ..., 1/2, 1, 2, ..., 10."""
    got = _EDGE_CACHE.get(levels)
    if got is None:
        got = np.array([0.0] + [2.0 ** -j for j in range(levels, 0, -1)]
                       + [float(k) for k in range(1, int(_Z_MAX) + 1)])
        _EDGE_CACHE[levels] = got
    return got


def _panels(edges: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss-Legendre on consecutive ``edges`` (last axis): nodes and weights, flat
    along the last axis (leading axes broadcast)."""
    t, w = _gauss_legendre(m)
    a = edges[..., :-1, None]
    h = edges[..., 1:, None] - a
    nodes = a + h * t
    weights = h * w
    shape = nodes.shape[:-2] + (-1,)
    return nodes.reshape(shape), weights.reshape(shape)


_RULE_1D_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _rule_1d(levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes z and weights (summing to 1 up to 1e-23) for E over z ~ N(0, 1), edges symmetric."""
    got = _RULE_1D_CACHE.get(levels)
    if got is None:
        half = _half_edges(levels)
        edges = np.concatenate([-half[::-1], half[1:]])
        z, w = _panels(edges, _GL_1D)
        got = (z, w * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi))
        _RULE_1D_CACHE[levels] = got
    return got


def _rule_1d_kinked(levels: int, s: np.ndarray, kinks: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-``sqrt(q)`` rules (rows) with extra panel edges at ``kink / sqrt(q)``."""
    half = _half_edges(levels)
    base = np.concatenate([-half[::-1], half[1:]])
    extra = np.clip(np.asarray(kinks)[None, :] / s[:, None], -_Z_MAX, _Z_MAX)
    edges = np.sort(np.concatenate([np.broadcast_to(base, (len(s), len(base))), extra], axis=1), axis=1)
    z, w = _panels(edges, _GL_1D)
    return z, w * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


_ANGLE_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _angle_template(levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes on [0, 1] graded geometrically towards both ends, weights summing to 1."""
    got = _ANGLE_CACHE.get(levels)
    if got is None:
        e = np.array([0.0] + [2.0 ** -k for k in range(levels + 1, 0, -1)])
        edges = np.concatenate([e, 1.0 - e[::-1][1:]])
        got = _panels(edges, _GL_ANGULAR)
        _ANGLE_CACHE[levels] = got
    return got


_RADIAL_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _radial_rule(levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes r and weights for the radial part ``r exp(-r^2/2) dr`` of a 2-D standard normal."""
    got = _RADIAL_CACHE.get(levels)
    if got is None:
        r, w = _panels(_half_edges(levels), _GL_RADIAL)
        got = (r, w * r * np.exp(-0.5 * r * r))
        _RADIAL_CACHE[levels] = got
    return got


# --------------------------------------------------------------------------------------------
# activations evaluated on numpy arrays


class _Phi:
    """``phi`` and ``phi'`` of one activation on float64 numpy arrays, through torch."""

    def __init__(self, act: Activation) -> None:
        self.act = act
        self.name = act.name
        self.kinks = act.kinks
        self.homogeneous = act.homogeneous
        self._deriv = act.derivative_from_output
        self._unit: dict[str, float] | None = None
        self._autograd: bool | None = None  # unknown until tried
        self._dtype = torch.float64

    def unit(self) -> dict[str, float]:
        """E[phi(z)], E[phi(z)^2], E[phi'(z)^2] and E[phi(z) phi'(z) z] for z ~ N(0, 1), by the
        quadrature of :func:`_expect_1d`, computed once (for :attr:`homogeneous` activations)."""
        if self._unit is None:
            ex = _expect_1d_quadrature(self, np.ones(1), True, True)
            self._unit = {k: float(v[0]) for k, v in ex.items()}
        return self._unit

    # ---- torch calls
    def _call(self, t: Tensor) -> Tensor:
        try:
            y = self.act.fn(t.to(self._dtype))
        except Exception as e:  # noqa: BLE001 - report which activation failed, and how
            if self._dtype == torch.float64:
                # e.g. a module with float32 parameters: retry once in float32
                self._dtype = torch.float32
                try:
                    y = self.act.fn(t.to(self._dtype))
                except Exception:  # noqa: BLE001
                    self._dtype = torch.float64
                    raise InitlabError(f"activation {self.name!r} failed on a float64 tensor: "
                                       f"{type(e).__name__}: {e}") from e
            else:
                raise InitlabError(f"activation {self.name!r} failed: {type(e).__name__}: {e}") from e
        if not isinstance(y, Tensor) or y.shape != t.shape:
            raise InitlabError(f"activation {self.name!r} must map a tensor to a tensor of the same shape "
                               f"(elementwise), got {type(y).__name__}"
                               + (f" of shape {tuple(y.shape)} for {tuple(t.shape)}" if isinstance(y, Tensor) else ""))
        return y

    def f(self, u: np.ndarray) -> np.ndarray:
        """phi(u)."""
        u = np.array(u, dtype=np.float64)
        with torch.no_grad():
            y = self._call(torch.from_numpy(u))
        return y.detach().to(torch.float64).numpy()

    def f_df(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(phi(u), phi'(u)); autograd where it works, else central differences."""
        u = np.array(u, dtype=np.float64)
        if self._deriv is not None:
            y = self.f(u)
            return y, self._deriv(y)
        if self._autograd is not False:
            got = self._autograd_f_df(u)
            if got is not None:
                self._autograd = True
                return got
            self._autograd = False
        return self.f(u), self._finite_difference(u)

    def _autograd_f_df(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        t = torch.from_numpy(u).requires_grad_(True)
        with torch.enable_grad():
            y = self._call(t.clone())
            if not y.requires_grad:
                return None
            try:
                # a scalar output: torch makes the unit gradient itself (an explicit grad_outputs
                # tensor makes torch import sympy on first use, a second of start-up)
                (g,) = torch.autograd.grad(y.sum(), t, allow_unused=True)
            except RuntimeError:
                return None
        if g is None:
            return None
        return y.detach().to(torch.float64).numpy(), g.detach().to(torch.float64).numpy()

    def _finite_difference(self, u: np.ndarray) -> np.ndarray:
        h = 1e-6 * np.maximum(1.0, np.abs(u))
        return (self.f(u + h) - self.f(u - h)) / (2.0 * h)


_PHI_CACHE: OrderedDict[Any, _Phi] = OrderedDict()
_PHI_CACHE_SIZE = 64


def _phi_key(act: Activation) -> Any:
    return act.cache_key  # the table row (never stale after a re-registration) or the callable


def _phi(activation: object) -> _Phi:
    """The cached evaluator of an activation (anything ``resolve_activation`` accepts)."""
    act = resolve_activation(activation)
    key = _phi_key(act)
    if key is None:
        return _Phi(act)
    got = _PHI_CACHE.get(key)
    if got is None:
        got = _Phi(act)
        _PHI_CACHE[key] = got
        if len(_PHI_CACHE) > _PHI_CACHE_SIZE:
            _PHI_CACHE.popitem(last=False)
    else:
        _PHI_CACHE.move_to_end(key)
    return got


# --------------------------------------------------------------------------------------------
# one- and two-dimensional Gaussian expectations


def _expect_1d(phi: _Phi, q: np.ndarray, *, grad: bool = False, stein: bool = False) -> dict[str, np.ndarray]:
    """E over u ~ N(0, q), for every q in the 1-D array ``q``.

    Keys: ``mean`` E[phi], ``sq`` E[phi^2]; with ``grad``: ``dsq`` E[phi'^2]; with ``stein``:
    ``stein`` = E[phi(u) phi'(u) z] / sqrt(q) (= d/dq E[phi(u)^2], by Gaussian integration
    by parts, without phi'').
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return _expect_1d_impl(phi, q, grad, stein)


def _expect_1d_impl(phi: _Phi, q: np.ndarray, grad: bool, stein: bool) -> dict[str, np.ndarray]:
    q = np.maximum(np.asarray(q, dtype=np.float64), _Q_TINY)
    if phi.homogeneous and np.all(np.isfinite(q)):
        # phi(sqrt(q) z) = sqrt(q) phi(z), phi'(sqrt(q) z) = phi'(z): E[phi] = sqrt(q) E[phi(z)],
        # E[phi^2] = q E[phi(z)^2], E[phi'^2] and the Stein term do not depend on q
        unit = phi.unit()
        out = {"mean": np.sqrt(q) * unit["mean"], "sq": q * unit["sq"]}
        if grad:
            out["dsq"] = np.full_like(q, unit["dsq"])
        if stein:
            out["stein"] = np.full_like(q, unit["stein"])
        return out
    return _expect_1d_quadrature(phi, q, grad, stein)


def _expect_1d_quadrature(phi: _Phi, q: np.ndarray, grad: bool, stein: bool) -> dict[str, np.ndarray]:
    q = np.maximum(np.asarray(q, dtype=np.float64), _Q_TINY)
    s = np.sqrt(q)
    finite = q[np.isfinite(q)]
    levels = _levels(float(finite.max()) if finite.size else 1.0, 2)
    if phi.kinks:
        z, w = _rule_1d_kinked(levels, s, phi.kinks)
    else:
        z, w = _rule_1d(levels)
        z, w = z[None, :], w[None, :]
    u = s[:, None] * z
    if grad or stein:
        f, df = phi.f_df(u)
    else:
        f, df = phi.f(u), None
    out: dict[str, np.ndarray] = {"mean": _wsum(w, f), "sq": _wsum(w, f * f)}
    if grad:
        out["dsq"] = _wsum(w, df * df)
    if stein:
        out["stein"] = _wsum(w, f * df * z) / s
    return out


def _wsum(w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sum of ``w * v`` over the last axis; terms with zero weight never count (even if v is inf)."""
    prod = w * v
    if not np.all(np.isfinite(prod)):
        prod = np.where(w > 0, prod, 0.0)
    return prod.sum(axis=-1)


def _expect_2d(phi: _Phi, q: float, c: np.ndarray, *, grad: bool = False) -> dict[str, np.ndarray]:
    """E[phi(u1) phi(u2)] (``ff``) and, with ``grad``, E[phi'(u1) phi'(u2)] (``dd``) for
    Var(u1) = Var(u2) = q and correlation c (1-D array), in polar coordinates.

    ``u1 = sqrt(q) (a z1 + b z2) = sqrt(q) r cos(t - al)``, ``u2 = sqrt(q) (a z1 - b z2) =
    sqrt(q) r cos(t + al)`` with ``a = cos al = sqrt((1 + c) / 2)``, ``b = sin al``; the angular
    panels are split where ``u1 = 0`` or ``u2 = 0`` (t = +-al + pi/2, +-al + 3 pi/2).
    """
    q = max(float(q), _Q_TINY)
    c = np.clip(np.asarray(c, dtype=np.float64), -1.0, 1.0)
    levels = _levels(q, 1)
    r, wr = _radial_rule(levels)
    t, wt = _angle_template(levels)
    al = np.arctan2(np.sqrt((1.0 - c) / 2.0), np.sqrt((1.0 + c) / 2.0))  # (nc,)
    ends = np.stack([np.pi / 2 - al, np.pi / 2 + al, 1.5 * np.pi - al, 1.5 * np.pi + al,
                     2.5 * np.pi - al], axis=1)  # (nc, 5), increasing
    width = np.diff(ends, axis=1)  # (nc, 4)
    th = (ends[:, :-1, None] + width[:, :, None] * t).reshape(len(c), -1)  # (nc, T)
    wth = (width[:, :, None] * wt).reshape(len(c), -1) / (2.0 * np.pi)
    s = math.sqrt(q)
    sr = s * r[None, :, None]
    u1 = sr * np.cos(th - al[:, None])[:, None, :]  # (nc, R, T)
    u2 = sr * np.cos(th + al[:, None])[:, None, :]
    w = wr[None, :, None] * wth[:, None, :]
    both = np.stack([u1, u2])
    if grad:
        f, df = phi.f_df(both)
        return {"ff": _wsum(w.reshape(len(c), -1), (f[0] * f[1]).reshape(len(c), -1)),
                "dd": _wsum(w.reshape(len(c), -1), (df[0] * df[1]).reshape(len(c), -1))}
    f = phi.f(both)
    return {"ff": _wsum(w.reshape(len(c), -1), (f[0] * f[1]).reshape(len(c), -1))}


# --------------------------------------------------------------------------------------------
# argument checks


def _var(name: str, value: object) -> float:
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise InitlabError(f"{name} must be a number >= 0, got {type(value).__name__}: {value!r}")
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        raise InitlabError(f"{name} must be a number >= 0, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise InitlabError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def _array(name: str, value: object, *, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    if isinstance(value, (bool, np.bool_, str, bytes)) or (isinstance(value, np.ndarray) and value.dtype == bool):
        raise InitlabError(f"{name} must be a number or an array of numbers, got {type(value).__name__}: {value!r}")
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError):
        raise InitlabError(f"{name} must be a number or an array of numbers, got {value!r}") from None
    if a.size == 0:
        raise InitlabError(f"{name} is empty")
    if not np.all(np.isfinite(a)):
        raise InitlabError(f"{name} must be finite, got {value!r}")
    if lo is not None and np.any(a < lo):
        raise InitlabError(f"{name} must be >= {lo:g}, got {value!r}")
    if hi is not None and np.any(a > hi):
        raise InitlabError(f"{name} must be <= {hi:g}, got {value!r}")
    return a


def _out(a: np.ndarray, scalar: bool) -> Any:
    return float(a.reshape(-1)[0]) if scalar else a


# --------------------------------------------------------------------------------------------
# variance recursion


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a feed-forward chain for :func:`forward_variances`: ``h = W x + b``, then
    ``activation`` (None: nothing follows, e.g. a readout).

    ``fan_in``: inputs per output unit (Linear: in_features; Conv: in_channels / groups * prod(kernel));
    ``fan_out``: outputs each input feeds (Linear: out_features; Conv: out_channels / groups *
    prod(kernel)), used only by :func:`backward_variances`; ``weight_var`` = Var(w) (weights
    assumed zero-mean), ``bias_var`` = Var(b) (0 for zero biases); ``name`` is informative only.
    """

    fan_in: float
    fan_out: float
    weight_var: float
    bias_var: float = 0.0
    activation: object = None
    name: str = ""

    def __post_init__(self) -> None:
        for field_name in ("fan_in", "fan_out"):
            v = getattr(self, field_name)
            try:
                ok = not isinstance(v, (bool, str)) and math.isfinite(float(v)) and float(v) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise InitlabError(f"LayerSpec.{field_name} must be a number > 0, got {v!r}")
        _var("LayerSpec.weight_var", self.weight_var)
        _var("LayerSpec.bias_var", self.bias_var)


def _specs(layers: Sequence[LayerSpec]) -> list[LayerSpec]:
    if isinstance(layers, LayerSpec):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise InitlabError("layers is empty: give at least one LayerSpec")
    for i, spec in enumerate(layers):
        if not isinstance(spec, LayerSpec):
            raise InitlabError(f"layers[{i}] must be a LayerSpec, got {type(spec).__name__}: {spec!r}")
    return layers


def forward_variances(input_sq_mean: float | Sequence[float] | np.ndarray,
                      layers: Sequence[LayerSpec]) -> dict[str, np.ndarray]:
    """Predicted per-layer statistics of a feed-forward chain, from the input's second moment.

    For layer ``k`` with input second moment ``m_k`` (``m_0 = input_sq_mean = E[x^2]``, the mean
    of the squared inputs, NOT their variance):

    * ``pre_var_no_bias[k] = fan_in_k * weight_var_k * m_k``  (Var(W x) for zero-mean weights)
    * ``pre_var[k] = pre_var_no_bias[k] + bias_var_k``         (Var(W x + b))
    * ``post_sq_mean[k] = E[phi_k(h)^2]``, ``post_mean[k] = E[phi_k(h)]``, ``h ~ N(0, pre_var[k])``
      (the identity when ``activation`` is None), ``post_var = post_sq_mean - post_mean^2``
    * ``m_{k+1} = post_sq_mean[k]``

    Assumptions (LeCun et al. 1998; Glorot & Bengio 2010; He et al. 2015; Poole et al. 2016):
    weights independent of each other and of the inputs, with mean zero; pre-activations
    Gaussian (wide layers); each layer consumes exactly the previous layer's activations (no
    normalisation or skip connections in between).

    ``input_sq_mean`` may also be a 1-D array of per-sample second moments ``E_i[x_i^2]`` (one
    per example): each example is then propagated with its own length, as the mean-field
    theory does, and the results are averaged over examples. This is the exact wide-network
    prediction for a batch whose examples differ in norm; a single number is the
    approximation that all examples share the mean length (it matters for saturating
    activations at large variance). The per-example pre-activation variances are then also
    returned as ``pre_var_per_sample``, shape (layers, examples).

    Returns a dict of float64 arrays with one entry per layer: ``input_sq_mean``,
    ``pre_var_no_bias``, ``pre_var``, ``post_mean``, ``post_sq_mean``, ``post_var``. A chain
    whose variance explodes past the float64 range gives ``inf`` (and NaN where inf - inf
    appears), without warnings.
    """
    specs = _specs(layers)
    m = _array("input_sq_mean", input_sq_mean, lo=0.0)
    if m.ndim > 1:
        raise InitlabError(f"input_sq_mean must be a number or a 1-D array of per-sample values, got shape {m.shape}")
    per_sample = m.ndim == 1
    m = m.reshape(-1)
    # per layer, per example: (input_sq_mean, pre_var_no_bias, pre_var, post_mean, post_sq_mean)
    rows: list[tuple[np.ndarray, ...]] = []
    with np.errstate(over="ignore", invalid="ignore"):  # an exploding chain overflows to inf
        for spec in specs:
            nb = float(spec.fan_in) * float(spec.weight_var) * m
            pre = nb + float(spec.bias_var)
            if spec.activation is None:
                mean, sq = np.zeros_like(pre), pre
            else:
                ex = _expect_1d(_phi(spec.activation), pre)
                mean, sq = ex["mean"], ex["sq"]
            rows.append((m, nb, pre, mean, sq))
            m = sq
        table = np.array(rows)  # (layers, 5, examples): averaged over examples in one reduction
        avg = table.mean(axis=2)
        out = {k: np.ascontiguousarray(avg[:, i]) for i, k in
               enumerate(("input_sq_mean", "pre_var_no_bias", "pre_var", "post_mean", "post_sq_mean"))}
        out["post_var"] = out["post_sq_mean"] - out["post_mean"] ** 2
    if per_sample:
        out["pre_var_per_sample"] = np.ascontiguousarray(table[:, 2, :])
    return out


def backward_variances(output_grad_var: float, layers: Sequence[LayerSpec],
                       pre_var: Sequence[float] | np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
    """Predicted variance of ``dL/dh_k`` (gradient w.r.t. each layer's pre-activation ``h_k = W_k x_k + b_k``).

    ``output_grad_var`` is the variance of the gradient w.r.t. the *last* layer's
    pre-activation (for a readout layer: w.r.t. the network output). Going backwards,

    ``Var(dL/dh_k) = Var(dL/dh_{k+1}) * fan_out_{k+1} * weight_var_{k+1} * E[phi_k'(h_k)^2]``,
    ``h_k ~ N(0, pre_var[k])``,

    where ``phi_k`` is the activation after layer ``k`` (``phi' = 1`` for None) and the
    ``chi``-like factor ``fan_out * weight_var * E[phi'^2]`` is the backward analogue of the
    forward ``fan_in * weight_var * E[phi^2] / Var(h)`` (Glorot & Bengio 2010; He et al. 2015;
    Schoenholz et al. 2017). ReLU's kink at 0 has measure zero: ``E[relu'(h)^2] = 1/2``.

    Assumptions: zero-mean weights independent of everything else; Gaussian pre-activations;
    the gradient independence assumption (the backward pass uses weights independent of the
    forward pass, exact for wide layers); the gradient at each layer independent of the
    pre-activation there.

    ``pre_var``: the per-layer pre-activation variances (with bias), e.g.
    ``forward_variances(...)["pre_var"]``; a (layers, examples) array of per-example variances;
    or the dict returned by :func:`forward_variances` (its per-example variances are used when
    present, and the result is then averaged over examples). Returns a float64 array with one
    entry per layer; its last entry is ``output_grad_var``.
    """
    specs = _specs(layers)
    g_out = _var("output_grad_var", output_grad_var)
    if isinstance(pre_var, Mapping):
        if "pre_var_per_sample" in pre_var:
            pv = np.asarray(pre_var["pre_var_per_sample"], dtype=np.float64)
        elif "pre_var" in pre_var:
            pv = np.asarray(pre_var["pre_var"], dtype=np.float64)
        else:
            raise InitlabError("pre_var: a dict must have the key 'pre_var' (as forward_variances returns)")
    else:
        try:
            pv = np.asarray(pre_var, dtype=np.float64)
        except (TypeError, ValueError):
            raise InitlabError(f"pre_var must be an array of numbers, got {pre_var!r}") from None
    if pv.ndim == 1:
        pv = pv[:, None]
    if pv.ndim != 2 or pv.shape[0] != len(specs):
        raise InitlabError(f"pre_var must have one entry (or one row of per-sample values) per layer: "
                           f"{len(specs)} layers, got shape {pv.shape}")
    if np.any(np.isnan(pv)) or np.any(pv < 0):
        raise InitlabError("pre_var must be >= 0 (inf is allowed: an exploded forward pass), got NaN or a negative value")
    n = len(specs)
    # E[phi_k'(h_k)^2] for every layer at once: one quadrature call per distinct activation
    dsq = np.ones_like(pv)
    groups: dict[int, tuple[_Phi, list[int]]] = {}
    for k, spec in enumerate(specs[:-1]):
        if spec.activation is not None:
            phi = _phi(spec.activation)
            groups.setdefault(id(phi), (phi, []))[1].append(k)
    for phi, idx in groups.values():
        dsq[idx] = _expect_1d(phi, pv[idx].reshape(-1), grad=True)["dsq"].reshape(len(idx), -1)
    g = np.full(pv.shape[1], g_out)
    out = np.empty(n)
    out[n - 1] = g_out
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(n - 2, -1, -1):
            nxt = specs[k + 1]
            g = g * float(nxt.fan_out) * float(nxt.weight_var) * dsq[k]
            out[k] = g.mean()
    return out


def layer_specs_from_model(model: nn.Module, *, batch: Tensor | None = None,
                           stat: str = "var") -> list[LayerSpec]:
    """The model's Linear / Conv / ConvTranspose layers as :class:`LayerSpec` s, in forward order.

    Each spec has the layer's qualified module name, its fans (``initlab.fans`` with the module:
    exact for grouped convolutions and ConvTranspose), its *empirical* weight variance and bias
    variance (``stat="var"``: population variance of the values, as the probe reports;
    ``stat="sq_mean"``: mean of the squares) and the activation that consumes its output, from
    ``initlab.find_activations`` (None for a readout). Other weight layers (Embedding, Bilinear,
    MultiheadAttention) are left out.

    Order: registration order (``model.named_modules()``), which is forward order for
    ``nn.Sequential`` and most models; with ``batch``, one forward pass under ``torch.no_grad()``
    records the order in which the layers are actually called (hooks removed afterwards; layers
    not called are appended in registration order).

    The specs describe the chain as :func:`forward_variances` sees it: the recursion is exact
    only where each layer consumes the previous one's activations (no normalisation or skip
    connection in between).
    """
    if not isinstance(model, nn.Module):
        raise InitlabError(f"layer_specs_from_model expects an nn.Module, got {type(model).__name__}")
    if stat not in ("var", "sq_mean"):
        raise unknown_choice("weight statistic", stat, ["var", "sq_mean"])
    links = find_activations(model)
    layers = [(name, link.module) for name, link in links.items() if is_affine(link.module)]
    if not layers:
        raise InitlabError(f"{type(model).__name__} has no Linear, Conv or ConvTranspose layer")
    if batch is not None:
        layers = _forward_order(model, batch, layers)
    specs = []
    for name, module in layers:
        if module.weight.is_meta:
            raise InitlabError(f"layer {name!r} has its weights on the meta device: no values to read")
        fan_in, fan_out = module_fans(module)
        w = module.weight.detach().to(torch.float64)
        wv = float(w.var(unbiased=False)) if stat == "var" else float(w.square().mean())
        b = getattr(module, "bias", None)
        if isinstance(b, Tensor) and b.numel() > 0:
            bd = b.detach().to(torch.float64)
            bv = float(bd.var(unbiased=False)) if stat == "var" else float(bd.square().mean())
        else:
            bv = 0.0
        specs.append(LayerSpec(fan_in=float(fan_in), fan_out=float(fan_out), weight_var=wv, bias_var=bv,
                               activation=links[name].activation, name=name))
    return specs


def _forward_order(model: nn.Module, batch: Tensor, layers: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    if not isinstance(batch, Tensor):
        raise InitlabError(f"batch must be a torch.Tensor, got {type(batch).__name__}")
    order: list[str] = []
    handles = []
    try:
        for name, module in layers:
            def hook(_m: nn.Module, _i: Any, _o: Any, name: str = name) -> None:
                if name not in order:
                    order.append(name)
            handles.append(module.register_forward_hook(hook))
        with torch.no_grad(), kept_buffers(model):  # BatchNorm statistics are left as they were
            model(batch)
    except InitlabError:
        raise
    except Exception as e:  # noqa: BLE001 - the model's own error, in one line
        raise InitlabError(f"the forward pass on batch failed: {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
    by_name = dict(layers)
    return [(n, by_name[n]) for n in order] + [(n, m) for n, m in layers if n not in order]


# --------------------------------------------------------------------------------------------
# mean-field maps


def gaussian_moments(activation: object, q: float | Sequence[float] | np.ndarray) -> dict[str, Any]:
    """``E[phi(u)]``, ``E[phi(u)^2]`` and ``E[phi'(u)^2]`` for ``u ~ N(0, q)``.

    Keys ``mean``, ``sq_mean``, ``grad_sq_mean``; floats for a scalar ``q``, arrays otherwise.
    (For ``q = 1`` and a table activation ``sq_mean`` is ``Activation.second_moment``.)
    """
    qa = _array("q", q, lo=0.0)
    phi = _phi(activation)
    ex = _expect_1d(phi, qa.reshape(-1), grad=True)
    scalar = qa.ndim == 0
    return {"mean": _out(ex["mean"].reshape(qa.shape), scalar),
            "sq_mean": _out(ex["sq"].reshape(qa.shape), scalar),
            "grad_sq_mean": _out(ex["dsq"].reshape(qa.shape), scalar)}


def length_map(q: float | Sequence[float] | np.ndarray, act: object, sw2: float, sb2: float = 0.0) -> Any:
    """The length map of Poole et al. (2016): ``L(q) = sw2 * E[phi(sqrt(q) z)^2] + sb2``, z ~ N(0, 1).

    ``q`` is the variance of a pre-activation; ``L(q)`` that of the next layer's, for weights
    ``N(0, sw2 / fan_in)`` and biases ``N(0, sb2)``. Vectorised over ``q`` (float in, float out).
    """
    sw2, sb2 = _var("sw2", sw2), _var("sb2", sb2)
    qa = _array("q", q, lo=0.0)
    ex = _expect_1d(_phi(act), qa.reshape(-1))
    return _out((sw2 * ex["sq"] + sb2).reshape(qa.shape), qa.ndim == 0)


_SOLVE_CACHE: OrderedDict[tuple, Any] = OrderedDict()
_SOLVE_CACHE_SIZE = 4096


def _cached(key: tuple | None, compute: Callable[[], Any]) -> Any:
    if key is None:
        return compute()
    if key in _SOLVE_CACHE:
        _SOLVE_CACHE.move_to_end(key)
        return _SOLVE_CACHE[key]
    value = compute()
    _SOLVE_CACHE[key] = value
    if len(_SOLVE_CACHE) > _SOLVE_CACHE_SIZE:
        _SOLVE_CACHE.popitem(last=False)
    return value


def _clear_caches() -> None:
    """Forget cached evaluators and solutions (for benchmarks of cold solves)."""
    _PHI_CACHE.clear()
    _SOLVE_CACHE.clear()


def _bracketed_root(f: Callable[[float], float], a: float, b: float, fa: float, fb: float, *,
                    rtol: float = 1e-13, max_iter: int = 200) -> float:
    """A root of ``f`` in [a, b] with ``fa * fb <= 0``: Illinois regula falsi with bisection
    whenever the bracket fails to halve in three steps. No scipy."""
    if fa == 0:
        return a
    if fb == 0:
        return b
    if fa * fb > 0:
        raise InitlabError(f"root not bracketed: f({a:g}) = {fa:g}, f({b:g}) = {fb:g}")
    side = 0
    width = abs(b - a)
    stalled = 0
    for _ in range(max_iter):
        if abs(b - a) <= rtol * max(abs(a), abs(b)) or abs(b - a) < 1e-300:
            break
        if stalled >= 3:
            x = 0.5 * (a + b)
            stalled = 0
        else:
            x = (a * fb - b * fa) / (fb - fa)
            if not (min(a, b) < x < max(a, b)):
                x = 0.5 * (a + b)
        fx = f(x)
        if fx == 0:
            return x
        if fx * fb < 0:
            a, fa = b, fb
            b, fb = x, fx
            side = 0
        else:
            b, fb = x, fx
            if side == 1:
                fa *= 0.5
            side = 1
        if abs(b - a) > 0.5 * width:
            stalled += 1
        else:
            stalled = 0
            width = abs(b - a)
    return b if abs(fb) <= abs(fa) else a


def q_star(act: object, sw2: float, sb2: float = 0.0, *, q0: float = 1.0) -> float:
    """The fixed point ``q* = L(q*)`` of the length map (Poole et al. 2016) reached from ``q0``.

    ``L(q) = sw2 * E[phi(sqrt(q) z)^2] + sb2``. Iterating ``q <- L(q)`` from ``q0`` (the
    pre-activation variance of the first layer) converges, for the non-decreasing length maps
    of usual activations, to the nearest fixed point in the direction ``L(q0) - q0``; that is the
    root returned, found by bracketing (geometric steps) and a bracketed root solve, not by slow
    iteration. ``q0`` matters only where the length map has several stable fixed points.

    Returns ``0.0`` when every length shrinks to 0 (e.g. tanh with ``sb2 = 0`` and ``sw2 <= 1``:
    the ordered phase without bias; lengths below ``1e-30 * q0`` count as 0) and ``math.inf``
    when lengths grow without bound (unbounded activations with large ``sw2``, e.g. ReLU with
    ``sw2 > 2``: ``L(q) = sw2 q / 2 + sb2``; lengths beyond 1e30 count as diverged).
    Results are cached per (activation, sw2, sb2, q0).
    """
    sw2, sb2, q0 = _var("sw2", sw2), _var("sb2", sb2), _var("q0", q0)
    return _qs(_phi(act), sw2, sb2, q0)


def _qs(phi: _Phi, sw2: float, sb2: float, q0: float = 1.0) -> float:
    """q* with the cache (validated arguments)."""
    key = _phi_key(phi.act)
    return _cached(None if key is None else ("q*", key, sw2, sb2, q0), lambda: _q_star(phi, sw2, sb2, q0))


def _q_star(phi: _Phi, sw2: float, sb2: float, q0: float) -> float:
    def d(qs: np.ndarray) -> np.ndarray:
        v = sw2 * _expect_1d(phi, qs)["sq"] + sb2 - qs
        return np.where(np.isnan(v), np.inf, v)  # overflow of phi: counts as growing

    q0 = max(q0, 1e-300)
    d0 = float(d(np.array([q0]))[0])
    if abs(d0) <= 1e-15 * q0:
        return q0
    up = d0 > 0
    lo_q, lo_d = q0, d0
    chunk = 0
    while True:  # geometric steps of 4x, 8 per vectorised evaluation
        ks = np.arange(8 * chunk + 1, 8 * chunk + 9)
        chunk += 1
        qs = q0 * (4.0 ** ks if up else 4.0 ** -ks)
        if up and qs[0] > _Q_MAX:
            return math.inf
        if not up and qs[0] < 1e-30 * q0:
            return 0.0
        ds = d(qs)
        hit = np.nonzero(ds <= 0)[0] if up else np.nonzero(ds >= 0)[0]
        if hit.size:
            i = int(hit[0])
            a, fa = (lo_q, lo_d) if i == 0 else (float(qs[i - 1]), float(ds[i - 1]))
            b, fb = float(qs[i]), float(ds[i])
            if not math.isfinite(fb):
                return math.inf
            return _bracketed_root(lambda x: float(d(np.array([x]))[0]), a, b, fa, fb)
        lo_q, lo_d = float(qs[-1]), float(ds[-1])
        if up and not math.isfinite(lo_d):
            return math.inf


def _chi1_at(phi: _Phi, sw2: float, q: float) -> float:
    qe = _Q_MAX if math.isinf(q) else q
    return float(sw2 * _expect_1d(phi, np.array([qe]), grad=True)["dsq"][0])


def chi1(act: object, sw2: float, sb2: float = 0.0, *, q0: float = 1.0) -> float:
    """``chi1 = sw2 * E[phi'(sqrt(q*) z)^2]``, z ~ N(0, 1) (Poole et al. 2016; Schoenholz et al. 2017).

    The mean squared singular value of a layer's Jacobian at the fixed point: ``chi1 < 1`` is
    the ordered phase (gradients vanish, inputs become correlated), ``chi1 > 1`` the chaotic
    phase (gradients explode), ``chi1 = 1`` the edge of chaos. Also the slope of the
    correlation map at ``c = 1``. ReLU: ``chi1 = sw2 / 2`` for any ``q*``. Where ``q* = 0``
    it is the limit ``sw2 * phi'(0)^2``; where ``q*`` diverges, the large-length limit
    (evaluated at q = 1e30).
    """
    sw2, sb2, q0 = _var("sw2", sw2), _var("sb2", sb2), _var("q0", q0)
    phi = _phi(act)
    key = _phi_key(phi.act)
    return _cached(None if key is None else ("chi1", key, sw2, sb2, q0),
                   lambda: _chi1_at(phi, sw2, _qs(phi, sw2, sb2, q0)))


def critical_sw2(act: object, sb2: float = 0.0, *, q0: float = 1.0) -> float:
    """The weight variance ``sw2`` at which ``chi1(act, sw2, sb2) = 1`` (the edge of chaos).

    Solved by bracketing (``sw2 = 1`` then doubling or halving, within [2^-30, 2^30]) and a
    bracketed root solve to relative accuracy ~1e-12; no scipy. Known values: ReLU 2 (any
    ``sb2``: He et al. 2015), linear 1, tanh 1 for ``sb2 = 0`` and ~1.76 for ``sb2 = 0.05``
    (Schoenholz et al. 2017).

    Only a true crossing is returned: ``chi1`` must pass through 1 continuously (change by less
    than 0.01 across ``sw2 * (1 +- 1e-9)``). ``chi1`` can instead *jump* across 1 where
    ``q*`` jumps, e.g. for gelu, gelu_tanh, silu, mish and hardswish with ``sb2 = 0``: their
    length map ``sw2 E[phi(u)^2]`` grows faster than linearly in ``q`` (``phi(u) ~ u/2`` near 0,
    ``~ u`` for large ``u``), so starting from ``q0`` the length falls to ``q* = 0`` below
    ``sw2 = q0 / E[phi(sqrt(q0) z)^2]`` and diverges above it; gelu jumps there (2.3517) from
    ``chi1 = sw2 phi'(0)^2 = 0.588`` to ``sw2 / 2 = 1.176`` and has no edge of chaos at
    ``sb2 = 0`` (Hayou et al. 2019 find one only with ``sb2 > 0``). Such a jump raises
    :class:`~initlab.InitlabError` naming both values; so does ``chi1`` never reaching 1
    (e.g. an activation with ``phi' = 0``).
    """
    sb2, q0 = _var("sb2", sb2), _var("q0", q0)
    phi = _phi(act)
    key = _phi_key(phi.act)
    return _cached(None if key is None else ("crit", key, sb2, q0), lambda: _critical(phi, sb2, q0))


def _critical(phi: _Phi, sb2: float, q0: float) -> float:
    def f(s: float) -> float:
        return _chi1_at(phi, s, _qs(phi, s, sb2, q0)) - 1.0

    a, fa = 1.0, f(1.0)
    if not math.isfinite(fa):
        raise InitlabError(f"chi1 of activation {phi.name!r} is not finite at sw2 = 1")
    b, fb = a, fa
    for _ in range(30):
        if (fa < 0) != (fb < 0):
            break
        if fa < 0:  # chi1 < 1: go up
            a, fa = b, fb
            b = b * 2.0
        else:
            a, fa = b, fb
            b = b / 2.0
        fb = f(b)
        if not math.isfinite(fb):
            break
    if not ((fa < 0) != (fb < 0)) or not math.isfinite(fb):
        raise InitlabError(f"no critical sw2 for activation {phi.name!r} with sb2 = {sb2:g}: chi1 - 1 keeps "
                           f"the sign {'-' if fb < 0 else '+'} for sw2 in [2^-30, 2^30] (chi1 = {fb + 1:g} at the "
                           f"end of the search)")
    lo, hi = (a, b) if a < b else (b, a)
    flo, fhi = (fa, fb) if a < b else (fb, fa)
    root = _bracketed_root(f, lo, hi, flo, fhi, rtol=1e-13)
    _check_crossing(phi, sb2, q0, root, f)
    return root


_JUMP = 1e-2  # chi1 changing by more than this across sw2 * (1 +- 1e-9) is a jump, not a crossing


def _check_crossing(phi: _Phi, sb2: float, q0: float, root: float, f: Callable[[float], float]) -> None:
    """Raise unless ``chi1`` passes through 1 continuously at ``root`` (not a jump of ``q*``).

    The jumps seen are 0.05 or more (mish, sb2 = 0.05: 0.93 -> 1.05; gelu, sb2 = 0: 0.59 -> 1.18);
    where ``q*`` diverges continuously (softplus at sw2 = 2) chi1 moves by < 1e-3 across the root,
    the quadrature's resolution of ``q*`` ~ 1e6 and beyond."""
    below, above = f(root * (1.0 - 1e-9)), f(root * (1.0 + 1e-9))
    if abs(above - below) <= _JUMP:
        return
    q_lo, q_hi = _qs(phi, root * (1.0 - 1e-9), sb2, q0), _qs(phi, root * (1.0 + 1e-9), sb2, q0)
    raise InitlabError(
        f"no critical sw2 for activation {phi.name!r} with sb2 = {sb2:g}: chi1 jumps across 1 at "
        f"sw2 = {root:.6g} (from {below + 1:.4g} to {above + 1:.4g}) because q* jumps there "
        f"(from {q_lo:.4g} to {q_hi:.4g}, starting length q0 = {q0:g}); there is no edge of chaos here, "
        f"try sb2 > 0")


def _q_for(phi: _Phi, q: float | None, sw2: float, sb2: float) -> float:
    if q is None:
        q = _qs(phi, sw2, sb2)
        if math.isinf(q):
            raise InitlabError(f"q* diverges for activation {phi.name!r} with sw2 = {sw2:g}, sb2 = {sb2:g} "
                               f"(lengths grow without bound); the correlation map needs a finite length")
        return q
    return _var("q", q)


def correlation_map(c: float | Sequence[float] | np.ndarray, q: float | None, act: object, sw2: float,
                    sb2: float = 0.0) -> Any:
    """The correlation map of Poole et al. (2016) for two inputs whose pre-activations have variance q.

    ``C(c) = (sw2 * E[phi(u1) phi(u2)] + sb2) / (sw2 * E[phi(u1)^2] + sb2)`` with
    ``u1 = sqrt(q) z1``, ``u2 = sqrt(q) (c z1 + sqrt(1 - c^2) z2)``, z1, z2 ~ N(0, 1) independent.
    The denominator is the next layer's length ``L(q)``, so ``C`` is a correlation at any ``q``;
    at ``q = q*`` (``q=None``) it is the map whose fixed point is :func:`c_star`. Its slope is
    ``C'(c) = sw2 * q * E[phi'(u1) phi'(u2)] / L(q)``. Vectorised over ``c`` in [-1, 1].
    The output is clipped to [-1, 1] (the quadrature can round ``C(1)`` to ``1 + 2e-16``) and an
    input up to 1e-12 outside [-1, 1] counts as rounding and is clipped, so the map can be iterated
    on its own output; anything further out raises.
    """
    sw2, sb2 = _var("sw2", sw2), _var("sb2", sb2)
    ca = _correlations(c)
    phi = _phi(act)
    qv = _q_for(phi, q, sw2, sb2)
    ff = _expect_2d(phi, qv, ca.reshape(-1))["ff"]
    den = sw2 * _self_overlap(phi, qv) + sb2
    if den <= 0:
        raise InitlabError(f"the next layer's length is 0 for activation {phi.name!r} at q = {qv:g} "
                           f"(sw2 = {sw2:g}, sb2 = {sb2:g}): correlations are undefined")
    out = np.clip((sw2 * ff + sb2) / den, -1.0, 1.0)  # |C| <= 1 exactly; rounding can leave 1 + 2e-16
    return _out(out.reshape(ca.shape), ca.ndim == 0)


_C_ROUNDING = 1e-12  # correlations this far outside [-1, 1] are rounding and are clipped


def _correlations(c: object) -> np.ndarray:
    """``c`` as an array in [-1, 1]; values within 1e-12 outside (rounding) are clipped, so the
    map's output is always a valid input."""
    ca = _array("c", c, lo=-1.0 - _C_ROUNDING, hi=1.0 + _C_ROUNDING)
    return np.clip(ca, -1.0, 1.0)


def _self_overlap(phi: _Phi, q: float) -> float:
    """E[phi(u)^2] by the two-dimensional rule at c = 1 (so that C(1) = 1 to rounding), cached."""
    key = _phi_key(phi.act)
    return _cached(None if key is None else ("ff1", key, q),
                   lambda: float(_expect_2d(phi, q, np.array([1.0]))["ff"][0]))


def _cs(phi: _Phi, sw2: float, sb2: float) -> tuple[float, float]:
    """(c*, chi_c at c*) with the cache (validated arguments)."""
    key = _phi_key(phi.act)
    return _cached(None if key is None else ("c*", key, sw2, sb2), lambda: _c_star(phi, sw2, sb2))


def _c_star(phi: _Phi, sw2: float, sb2: float) -> tuple[float, float]:
    """(c*, chi_c at c*)."""
    q = _q_for(phi, None, sw2, sb2)
    x1 = _chi1_at(phi, sw2, q)
    if x1 <= 1.0:
        return 1.0, x1
    qe = max(q, _Q_TINY)
    den = sw2 * _self_overlap(phi, qe) + sb2

    def cmap(c: float) -> tuple[float, float]:
        ex = _expect_2d(phi, qe, np.array([c]), grad=True)
        return (sw2 * float(ex["ff"][0]) + sb2) / den, sw2 * qe * float(ex["dd"][0]) / den

    # D(c) = C(c) - c is convex on [0, 1] (C has non-negative Taylor coefficients in c),
    # D(0) = C(0) >= 0, D(1) = 0, D'(1) = chi1 - 1 > 0: one root in [0, 1), approached
    # monotonically by Newton from c = 0; safeguarded by the bracket [lo, hi].
    lo, hi = 0.0, 1.0
    c = 0.0
    slope = 0.0
    for _ in range(200):
        val, slope = cmap(c)
        dv = val - c
        if dv >= 0:
            lo = c
        else:
            hi = c
        step = -dv / (slope - 1.0) if slope < 1.0 else math.inf
        nxt = c + step
        if not (lo <= nxt <= hi) or not math.isfinite(nxt):
            nxt = 0.5 * (lo + hi)
        if abs(nxt - c) <= 1e-14 or hi - lo <= 1e-14:
            c = nxt
            break
        c = nxt
    val, slope = cmap(c)
    return float(c), float(slope)


def c_star(act: object, sw2: float, sb2: float = 0.0) -> float:
    """The stable fixed point ``c*`` of the correlation map at ``q = q*`` (Poole et al. 2016).

    ``c* = 1`` in the ordered phase (``chi1 <= 1``: all inputs end up aligned); in the chaotic
    phase (``chi1 > 1``) the unique root of ``C(c) = c`` in [0, 1) (0 for odd activations with
    ``sb2 = 0``), found by safeguarded Newton steps with slope ``C'(c) = sw2 E[phi'(u1) phi'(u2)]``.
    Raises :class:`~initlab.InitlabError` when ``q*`` diverges.
    """
    sw2, sb2 = _var("sw2", sw2), _var("sb2", sb2)
    return _cs(_phi(act), sw2, sb2)[0]


def depth_scales(act: object, sw2: float, sb2: float = 0.0) -> tuple[float, float]:
    """``(xi_q, xi_c)``: the depth scales of Schoenholz et al. (2017), in layers.

    Deviations from the fixed points decay like ``|q_l - q*| ~ exp(-l / xi_q)`` and
    ``|c_l - c*| ~ exp(-l / xi_c)``, with

    * ``xi_q^-1 = -ln(chi_q)``, ``chi_q = L'(q*) = chi1 + sw2 * E[phi''(u) phi(u)]``,
      ``u = sqrt(q*) z``; computed without ``phi''`` as ``sw2 * E[phi(u) phi'(u) z] / sqrt(q*)``
      (Gaussian integration by parts), so kinks need no special care;
    * ``xi_c^-1 = -ln(chi_c)``, ``chi_c = sw2 * E[phi'(u1) phi'(u2)]`` with ``u1, u2`` of
      variance ``q*`` and correlation ``c*`` (``chi_c = chi1`` when ``c* = 1``).

    ``xi_c`` diverges (``math.inf``) at the edge of chaos ``chi1 = 1``: arbitrarily deep
    networks propagate information only there. Raises :class:`~initlab.InitlabError` when ``q*``
    diverges.
    """
    sw2, sb2 = _var("sw2", sw2), _var("sb2", sb2)
    phi = _phi(act)
    q = _q_for(phi, None, sw2, sb2)
    ex = _expect_1d(phi, np.array([q]), stein=True)
    chi_q = float(sw2 * ex["stein"][0])
    _c, chi_c = _cs(phi, sw2, sb2)
    return _xi(chi_q), _xi(chi_c)


def _xi(chi: float) -> float:
    """``-1 / ln|chi|``: deviations shrink like ``|chi|^l`` (alternating in sign when chi < 0)."""
    a = abs(chi)
    if not math.isfinite(a):
        return math.nan
    if a == 0:
        return 0.0
    if a >= 1.0 - 1e-12:
        return math.inf
    return -1.0 / math.log(a)


@dataclass(frozen=True)
class MeanField:
    """The mean-field summary of one (activation, sw2, sb2): see :func:`mean_field`."""

    activation: str
    sw2: float
    sb2: float
    q_star: float
    c_star: float
    chi1: float
    chi_c: float
    xi_q: float
    xi_c: float

    @property
    def phase(self) -> str:
        """"ordered" (chi1 < 1), "chaotic" (chi1 > 1) or "critical" (|chi1 - 1| < 1e-6)."""
        if abs(self.chi1 - 1.0) < 1e-6:
            return "critical"
        return "ordered" if self.chi1 < 1.0 else "chaotic"


def mean_field(act: object, sw2: float, sb2: float = 0.0) -> MeanField:
    """``q*``, ``c*``, ``chi1``, ``chi_c`` and the depth scales in one call (see the functions above).

    Where ``q*`` diverges, ``c*``, ``chi_c`` and the depth scales are NaN.
    """
    sw2, sb2 = _var("sw2", sw2), _var("sb2", sb2)
    phi = _phi(act)
    q = _qs(phi, sw2, sb2)
    x1 = _chi1_at(phi, sw2, q)
    if math.isinf(q):
        return MeanField(phi.name, sw2, sb2, q, math.nan, x1, math.nan, math.nan, math.nan)
    cs, chi_c = _cs(phi, sw2, sb2)
    xi_q, xi_c = depth_scales(phi.act, sw2, sb2)
    return MeanField(phi.name, sw2, sb2, q, cs, x1, chi_c, xi_q, xi_c)


# --------------------------------------------------------------------------------------------
# Jacobian spectrum


def jacobian_spectrum(model: nn.Module, batch: Tensor, *, max_entries: int = 2 ** 26) -> np.ndarray:
    """Singular values of the input-output Jacobian ``d model(x) / d x`` for every example of ``batch``.

    Returns a float64 array of shape ``(batch_size, min(d_out, d_in))``, each row in descending
    order (``d_in``, ``d_out``: the number of values per example going in and coming out). For
    dynamical isometry (Pennington, Schoenholz & Ganguli 2017) the values concentrate near 1:
    a deep tanh network at the edge of chaos with orthogonal weights keeps them there, Gaussian
    weights of the same variance spread them over orders of magnitude. ``(s ** 2).mean()`` is
    the mean-field ``prod chi1`` over the layers.

    Each example is passed alone (a batch of one), in the model's current mode: call
    ``model.eval()`` first for batch-dependent layers such as BatchNorm. The Jacobian is dense,
    for small models: ``d_out * d_in`` must stay below ``max_entries``.
    """
    if not isinstance(model, nn.Module):
        raise InitlabError(f"jacobian_spectrum expects an nn.Module, got {type(model).__name__}")
    if not isinstance(batch, Tensor):
        raise InitlabError(f"batch must be a torch.Tensor, got {type(batch).__name__}")
    if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
        raise InitlabError(f"max_entries must be a positive int, got {max_entries!r}")
    if batch.ndim < 2 or batch.shape[0] < 1:
        raise InitlabError(f"batch must have a leading batch dimension and at least one example, got shape {tuple(batch.shape)}")
    if not batch.is_floating_point():
        raise InitlabError(f"batch must be a floating-point tensor, got {batch.dtype}")
    if not bool(torch.isfinite(batch).all()):
        raise InitlabError("batch contains NaN or inf")
    d_in = int(math.prod(batch.shape[1:]))

    def f(x: Tensor) -> Tensor:
        y = model(x.unsqueeze(0))
        if not isinstance(y, Tensor):
            raise InitlabError(f"the model must return a tensor, got {type(y).__name__}")
        return y.reshape(-1)

    rows = []
    with torch.enable_grad(), kept_buffers(model):  # BatchNorm statistics are left as they were
        for i in range(batch.shape[0]):
            x = batch[i].detach()
            try:
                with torch.no_grad():
                    d_out = int(f(x).numel())
                if d_out * d_in > max_entries:
                    raise InitlabError(f"the Jacobian has {d_out} x {d_in} entries, more than max_entries = "
                                       f"{max_entries}; use a smaller model or input")
                jac = torch.func.jacrev(f)(x)
            except InitlabError:
                raise
            except Exception as e:  # noqa: BLE001 - the model's own failure, in one line
                raise InitlabError(f"the model failed on one example of shape {tuple(x.shape)}: "
                                   f"{type(e).__name__}: {e}") from e
            jac = jac.reshape(d_out, d_in).detach().to(torch.float64)
            if not bool(torch.isfinite(jac).all()):
                raise InitlabError(f"the Jacobian of example {i} contains NaN or inf")
            rows.append(torch.linalg.svdvals(jac).cpu().numpy())
    return np.stack(rows)
