"""Gaussian expectations by Gauss–Hermite quadrature (shared by gains and theory).

E[f(z)], z ~ N(0, 1), is approximated by ``sum_i w_i f(x_i)`` with the probabilists'
Hermite nodes ``x_i`` and weights ``w_i / sqrt(2 pi)`` (so the weights sum to 1).
For smooth f the error falls exponentially with the number of nodes; for f with a kink
(ReLU-like) it falls polynomially, which is why the closed forms of the activation table
are used where they exist.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

DEFAULT_NODES = 201


@lru_cache(maxsize=16)
def hermite_normal(n: int = DEFAULT_NODES) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights (summing to 1) for E over a standard normal, ``n`` points, float64."""
    if n < 1:
        raise ValueError(f"number of quadrature nodes must be >= 1, got {n}")
    x, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / np.sqrt(2.0 * np.pi)
    x.setflags(write=False)
    w.setflags(write=False)
    return x, w


@lru_cache(maxsize=8)
def hermite_normal_2d(n: int = 61) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tensor-product rule for E over two independent standard normals: (z1, z2, weights), flat."""
    x, w = hermite_normal(n)
    z1, z2 = np.meshgrid(x, x, indexing="ij")
    ww = np.outer(w, w)
    out = (z1.ravel(), z2.ravel(), ww.ravel())
    for a in out:
        a.setflags(write=False)
    return out


def gauss_expect(f, n: int = DEFAULT_NODES) -> float:
    """E[f(z)] for z ~ N(0,1); ``f`` maps a float64 numpy array to an array of the same shape."""
    x, w = hermite_normal(n)
    return float(np.dot(w, np.asarray(f(x), dtype=np.float64)))
