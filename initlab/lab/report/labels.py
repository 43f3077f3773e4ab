"""How the report and the figures name scenarios and group them for comparison (no I/O, no plotting)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["Info", "label", "names", "widths_label", "comparison_groups"]

#: scenario -> (activation, scheme)
Info = Mapping[str, tuple[str, str]]


def label(scenario: str, info: Info) -> str:
    """The scenario's name, with activation and scheme when the name does not say them."""
    if scenario in info:
        act, scheme = info[scenario]
        if act and scheme and not (act in scenario and scheme.split("_")[0] in scenario):
            return f"{scenario} ({act} + {scheme})"
    return scenario


def names(items: Sequence[str], limit: int = 4) -> str:
    """``"a, b, c"``, or ``"a, b, c and 4 more"`` beyond ``limit`` items."""
    return ", ".join(items) if len(items) <= limit else ", ".join(items[:limit - 1]) + f" and {len(items) - limit + 1} more"


def widths_label(widths: Sequence[int]) -> str:
    """``(784, 100, 100, 10)`` -> ``"784-100-100-10"``; three or more equal widths in a row -> ``"100x20"``."""
    parts: list[str] = []
    i = 0
    w = list(widths)
    while i < len(w):
        j = i
        while j < len(w) and w[j] == w[i]:
            j += 1
        n = j - i
        parts.append(f"{w[i]}\u00d7{n}" if n >= 3 else "-".join([str(w[i])] * n))
        i = j
    return "-".join(parts)


def comparison_groups(scenarios: Sequence[str], info: Info | None = None,
                      models: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[str]]:
    """Scenarios that are compared with each other: same activation and same model widths.

    Keys are labels: the activation alone when every scenario has the same widths, else
    ``"<activation>, <widths>"`` (see :func:`widths_label`). Order follows ``scenarios``.
    """
    info = info or {}
    models = models or {}
    shapes = {tuple(models.get(s, ())) for s in scenarios}
    out: dict[str, list[str]] = {}
    for s in scenarios:
        act = info.get(s, ("all", ""))[0] or "all"
        key = act if len(shapes) <= 1 else f"{act}, {widths_label(models.get(s, ()))}"
        out.setdefault(key, []).append(s)
    return out
