"""Tensor statistics shared by the probe and LSUV: moments, per-channel sums, histograms.

Moments are population moments over every element. Device-side helpers return tensors (no
host transfer); host-side helpers work on small float64 numpy arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["as_float", "flat", "moments", "channel_sums", "host_moments", "Histogram", "histogram"]


def as_float(t: Tensor) -> Tensor:
    """``t`` detached, in float32 unless it is float32 or float64 already."""
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def flat(t: Tensor) -> Tensor:
    """``t`` as one dimension."""
    return t.reshape(-1)


def moments(t: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, population variance) of all values, by two passes: exact where E[y^2] - E[y]^2 would cancel."""
    f = flat(t)
    m = f.mean()
    d = f - m
    return m, torch.dot(d, d) / f.numel()


def channel_sums(y: Tensor, cdim: int) -> Tensor:
    """Sum over everything but the channel dimension (one reduction, or two for conv maps)."""
    if cdim == y.dim() - 1:
        return y.reshape(-1, y.shape[-1]).sum(dim=0)
    moved = y.movedim(cdim, 1) if cdim != 1 else y
    if moved.dim() == 2:
        return moved.sum(dim=0)
    return moved.reshape(moved.shape[0], moved.shape[1], -1).sum(dim=2).sum(dim=0)


def host_moments(a: np.ndarray) -> tuple[float, float]:
    """(mean, population variance) of a small float64 array, two passes, as Python floats."""
    n = len(a)
    m = float(np.add.reduce(a)) / n
    d = a - m
    return m, float(np.dot(d, d)) / n


@dataclass
class Histogram:
    """Counts of one tensor's values in ``len(counts)`` equal bins between ``edges[0]`` and ``edges[-1]``.

    ``min``, ``max``, ``num``, ``sum`` and ``sum_squares`` are kept so that the histogram can be
    written to TensorBoard without the raw values: ``writer.add_histogram_raw(tag, **h.tensorboard())``.
    """

    counts: np.ndarray
    edges: np.ndarray
    min: float
    max: float
    num: int
    sum: float
    sum_squares: float

    def tensorboard(self) -> dict[str, Any]:
        """Keyword arguments for ``SummaryWriter.add_histogram_raw`` (bucket limits are right edges)."""
        return {
            "min": self.min, "max": self.max, "num": self.num, "sum": self.sum,
            "sum_squares": self.sum_squares, "bucket_limits": self.edges[1:].tolist(),
            "bucket_counts": self.counts.tolist(),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.tolist(), "edges": self.edges.tolist(), "min": self.min, "max": self.max,
                "num": self.num, "sum": self.sum, "sum_squares": self.sum_squares}


def histogram(t: Tensor, bins: int) -> Histogram:
    """A :class:`Histogram` of ``t``'s values in ``bins`` equal bins between its min and max."""
    x = as_float(t).flatten()
    mn, mx = (float(v) for v in torch.aminmax(x))
    hi = mx if mx > mn else mn + 1e-12
    counts = torch.histc(x, bins=bins, min=mn, max=hi)
    return Histogram(
        counts=counts.to(torch.int64).cpu().numpy(),
        edges=np.linspace(mn, hi, bins + 1),
        min=mn, max=mx, num=x.numel(), sum=float(x.sum()), sum_squares=float((x * x).sum()),
    )
