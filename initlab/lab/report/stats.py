"""The numbers behind the report: seed statistics, final values, number formats, frame helpers.

pandas is imported inside the functions.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas

__all__ = ["Stat", "final_values", "pct", "num", "mean_sd", "col", "per_seed", "layer_rows"]


@dataclass
class Stat:
    """Mean, standard deviation (ddof = 1; NaN for n < 2) and count of the finite values."""

    mean: float
    std: float
    n: int
    n_total: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        a = np.asarray(list(values), dtype=np.float64)
        ok = a[np.isfinite(a)]
        mean = float(ok.mean()) if ok.size else math.nan
        std = float(ok.std(ddof=1)) if ok.size >= 2 else math.nan
        return cls(mean, std, int(ok.size), int(a.size))

    @property
    def se(self) -> float:
        return self.std / math.sqrt(self.n) if self.n >= 2 else math.nan


def final_values(metrics: pandas.DataFrame, split: str, metric: str) -> dict[str, dict[int, float]]:
    """``{scenario: {seed: value at the member's last logged step}}`` (NaN when it diverged)."""
    d = metrics[(metrics["split"] == split) & (metrics["metric"] == metric)]
    out: dict[str, dict[int, float]] = {}
    if d.empty:
        return out
    last = d.sort_values("step").groupby(["scenario", "seed"], sort=False).tail(1)
    for _, r in last.iterrows():
        out.setdefault(str(r["scenario"]), {})[int(r["seed"])] = float(r["value"])
    return out


def pct(s: Stat, digits: int = 1) -> str:
    """``"91.6% \u00b1 0.4"`` (a fraction as a percentage, with the std over seeds when n >= 2)."""
    if s.n == 0:
        return "n/a"
    txt = f"{100 * s.mean:.{digits}f}%"
    if s.n >= 2:
        txt += f" \u00b1 {100 * s.std:.{digits}f}"
    return txt


def num(x: float, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (scientific when very large or small), "n/a" when not finite."""
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "n/a"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    if abs(x) >= 10 ** digits:
        return f"{x:.0f}"
    return f"{x:#.{digits}g}".rstrip(".")


def mean_sd(s: Stat, digits: int = 3) -> str:
    """``"0.512 \u00b1 0.031"``: the mean and, when n >= 2, the std over seeds."""
    if s.n == 0:
        return "n/a"
    return num(s.mean, digits) + (f" \u00b1 {num(s.std, 2)}" if s.n >= 2 else "")


def col(df: pandas.DataFrame, name: str) -> Any:
    """The column ``name``, or NaNs when the frame has none."""
    import pandas as pd

    return df[name] if name in df else pd.Series([math.nan] * len(df), index=df.index, dtype=float)


def per_seed(df: pandas.DataFrame, cols: Sequence[str]) -> pandas.DataFrame:
    """Mean of ``cols`` per seed: members with the same seed share their first-pass batch."""
    if "seed" not in df:
        return df[list(cols)]
    return df.groupby("seed")[list(cols)].mean()


def layer_rows(fp: pandas.DataFrame, index: int) -> pandas.DataFrame:
    """The first-pass rows of weight layer ``index`` (numbered from 1, as the probe numbers them)."""
    if fp.empty or "index" not in fp:
        return fp.iloc[0:0]
    return fp[fp["index"] == index]
