"""The outputs of ``initlab tune`` beside the run directory: the results table
(``tune_results.csv``, one row per trial, written atomically) and the search figure
(``tune_search.png``: each searched parameter against the objective, one point per trial,
early-stopped trials marked, and the theory's critical value where it applies).

The critical line. A deep MLP with ``W_ij ~ N(0, sw2 / N)`` and zero biases (the lab's
``bias = "zeros"``) is at the edge of chaos when ``chi1 = sw2 E[phi'(h)^2] = 1``
(Poole et al. 2016; Schoenholz et al. 2017): :func:`initlab.theory.critical_sw2` with
``sb2 = 0`` (tanh: 1). A searched scheme parameter ``p`` maps to the hidden layers'
``sw2(p) = N * target_std(N, N)^2`` (N = the hidden width); where that map is a power law
(``factor`` of a fan_in scheme: ``sw2 = p``; a ``gain`` or ``std``: ``sw2 ~ p^2``) the line is
drawn at the ``p`` that gives the critical ``sw2``.
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..._errors import InitlabError
from ..._schemes import get_scheme
from ...theory import critical_sw2
from .._io import atomic_write_bytes, atomic_write_csv
from ..specs import Scenario
from .space import Search

__all__ = ["sigma_w2", "critical_value", "write_table", "write_figure", "TABLE_LEAD"]

#: the first columns of tune_results.csv; then one column per searched key, then TABLE_TAIL
TABLE_LEAD = ("base", "scenario", "trial_id")
TABLE_TAIL = ("sigma_w2", "objective", "metric", "mode", "step", "stopped_early", "diverged", "status", "critical")


def sigma_w2(sc: Scenario, param: str, value: float) -> float | None:
    """The hidden layers' ``sw2 = N Var(W)`` of ``sc`` with scheme parameter ``param = value``; None when
    the model has no square hidden layer or the scheme's variance depends on more than the fans."""
    widths = sc.model.widths
    if sc.model.kind != "mlp" or len(widths) < 4 or len(set(widths[1:-1])) != 1:
        return None
    n = int(widths[1])
    try:
        std = get_scheme(sc.scheme, **{**dict(sc.params), param: value}).target_std((n, n))
    except (InitlabError, TypeError, ValueError):
        return None
    return None if std is None else float(std) ** 2 * n


def critical_value(sc: Scenario, key: str) -> float | None:
    """The value of the searched ``key`` (``scheme.<p>``) at which the hidden layers sit at the theory's
    critical ``sw2`` (``sb2 = 0``), when ``sw2`` is a power law of it; else None."""
    section, _, param = key.partition(".")
    if section != "scheme":
        return None
    s1, s2, s4 = (sigma_w2(sc, param, v) for v in (1.0, 2.0, 4.0))
    if not s1 or not s2 or not s4 or s1 <= 0:
        return None
    k = math.log2(s2 / s1)
    if k <= 0 or abs(math.log2(s4 / s2) - k) > 1e-6:
        return None
    try:
        crit = critical_sw2(sc.activation, 0.0)
    except InitlabError:
        return None
    return (crit / s1) ** (1.0 / k)


def write_table(path: Path, trials: Sequence[Mapping[str, Any]], search: Search) -> Path:
    """``tune_results.csv``, atomically: a reader never sees a half-written table."""
    cols = [*TABLE_LEAD, *search.keys, *TABLE_TAIL]
    return atomic_write_csv(path, [{c: _cell(t.get(c)) for c in cols} for t in trials], cols)


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    return "" if v is None else v


def _panel(ax: Any, trials: Sequence[Mapping[str, Any]], key: str, search: Search, crit: float | None) -> None:
    dist = dict(search.params)[key]
    finite = [t for t in trials if math.isfinite(t["objective"])]
    ys = [t["objective"] for t in finite]
    top = max(ys) if ys else 1.0
    bottom = min(ys) if ys else 0.0
    pad = 0.05 * (top - bottom or 1.0)
    worst = top + 3 * pad if search.mode == "min" else bottom - 3 * pad
    for stopped, marker, label in ((False, "o", "trained to the end"), (True, "x", "stopped early (ASHA)")):
        pts = [t for t in trials if bool(t["stopped_early"]) == stopped]
        if pts:
            ax.scatter([t[key] for t in pts], [t["objective"] if math.isfinite(t["objective"]) else worst for t in pts],
                       marker=marker, s=28, color="C0" if not stopped else "C3", label=label, zorder=3)
    bad = [t for t in trials if not math.isfinite(t["objective"])]
    if bad:
        ax.scatter([t[key] for t in bad], [worst] * len(bad), marker="v", s=36, facecolors="none",
                   edgecolors="k", label="diverged", zorder=4)
    best = _best([t for t in finite if not t["stopped_early"]] or finite, search.mode)
    if best is not None:
        ax.scatter([best[key]], [best["objective"]], marker="*", s=160, color="gold", edgecolors="k",
                   label=f"best: {key} = {best[key]:.3g}", zorder=5)
    if crit is not None:
        ax.axvline(crit, color="k", linestyle="--", linewidth=1, label=f"critical (theory): {crit:.3g}")
    if dist.kind == "loguniform":
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=2.0))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(key)
    ax.set_ylabel(f"{search.metric} (mean over seeds)")
    ax.legend(fontsize=7, loc="best")


def _best(trials: Sequence[Mapping[str, Any]], mode: str) -> Mapping[str, Any] | None:
    if not trials:
        return None
    pick = min if mode == "min" else max
    return pick(trials, key=lambda t: t["objective"])


def write_figure(path: Path, by_base: Mapping[str, Sequence[Mapping[str, Any]]], scenarios: Mapping[str, Scenario],
                 search: Search) -> Path:
    """``tune_search.png``: one row per base scenario, one panel per searched key."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = search.keys
    rows = list(by_base)
    fig = Figure(figsize=(4.6 * len(keys), 3.4 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(keys), squeeze=False)
    for i, base in enumerate(rows):
        for j, key in enumerate(keys):
            _panel(axes[i][j], by_base[base], key, search, critical_value(scenarios[base], key))
            axes[i][j].set_title(f"{base}: {len(by_base[base])} trials", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return atomic_write_bytes(path, buf.getvalue())
