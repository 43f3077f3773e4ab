"""Text output: numbers for tables, and the one aligned plain-text table every report prints.

``text_table`` aligns a header and rows of strings (left-aligned label columns, right-aligned
number columns, a dashed rule under the header). ``format_table`` is its form for dict rows
(probe, audit, LSUV): cells are formatted by :func:`fmt`, ``*_frac`` values as percentages.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

__all__ = ["fmt", "text_table", "format_table"]


def fmt(v: Any) -> str:
    """A number for a table: 4 significant digits (scientific outside [1e-3, 1e5)); "-" for None and NaN."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v == 0:
            return "0"
        if 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], *,
               right: Collection[int] | None = None) -> str:
    """An aligned plain-text table: the header, a dashed rule, then the rows.

    ``right`` holds the indices of the right-aligned (number) columns; by default every column
    but the first two. Trailing blanks are stripped from every line.
    """
    ncols = len(header)
    right_cols = set(range(2, ncols)) if right is None else set(right)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(ncols)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right_cols else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _cell(key: str, v: Any) -> str:
    if key.endswith("_frac") and isinstance(v, float) and not math.isnan(v):
        return f"{100 * v:.0f}%"
    return fmt(v)


def format_table(rows: Sequence[dict[str, Any]], cols: Sequence[tuple[str, str]]) -> str:
    """A :func:`text_table` of dict rows: ``cols`` are ``(title, key)`` pairs; ``*_frac`` values
    are shown as percentages, other values by :func:`fmt`."""
    header = [title for title, _ in cols]
    body = [[_cell(key, row.get(key)) for _, key in cols] for row in rows]
    return text_table(header, body)


def jsonable(v: Any) -> Any:
    """``v`` ready for ``json.dumps``: non-finite floats become None (JSON has no NaN), numpy scalars
    Python numbers, tuples lists; dict keys starting with ``_`` (private fields) are left out."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items() if not str(k).startswith("_")}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v
