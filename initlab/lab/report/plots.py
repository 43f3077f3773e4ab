"""Figures of a run (PNG, matplotlib's Agg renderer, no pyplot and no display needed).

* ``layer1_histograms.png``: per scenario, the histogram of the layer-1 pre-activation
  ``W_1 x`` (no bias) and of the layer-1 output after its activation, pooled over seeds.
  With sigmoid and N(0,1) weights the pre-activation has variance 784 E[x^2] (about 88 on
  MNIST pixels in [0, 1]) and the outputs pile up at 0 and 1 (saturation); with Xavier weights
  (Var(w) = 2/(fan_in + fan_out), Glorot & Bengio 2010) they stay near 0.5. Scenarios whose
  layer-1 values are identical (e.g. a depth sweep: same first layer, same seeds) share a panel.
* ``variance_per_layer.png``: per scenario, the measured pre-activation variance of every
  weight layer (mean over seeds, bars = min..max) beside the prediction of the variance
  recursion of :mod:`initlab.theory` (dashed), on a log scale. Colour = scheme, marker =
  activation where that identifies the scenarios.
* one figure per metric of :mod:`initlab.lab.metrics` that has a ``plot`` file (``accuracy.png``,
  ``loss.png``, ...): training curves, one panel per comparison group (same activation and
  model shape; see :func:`~initlab.lab.report.labels.comparison_groups`) and split (train,
  held-out test) and component; mean over seeds with a band of +-1 standard deviation (one
  seed: line only).

matplotlib is imported inside the functions; figures go through ``Figure`` + the Agg canvas,
so no global pyplot state is touched. Files are written atomically.
"""
from __future__ import annotations

import functools
import gc
import io
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ..._activations import ActivationRow, activation_row
from ..._errors import InitlabError
from .._io import atomic_write_bytes
from ..metrics import Metric, component_label, component_names, display_order, owner
from .labels import Info, comparison_groups, label, names, widths_label

if TYPE_CHECKING:  # pragma: no cover
    import pandas
    from matplotlib.figure import Figure

__all__ = ["layer1_histograms", "variance_per_layer", "training_curves", "make_figures", "figures",
           "scenario_colors", "scenario_markers", "comparison_groups", "widths_label", "output_bounds"]

#: the first-pass figures: file name -> short caption
_FIRST_PASS_FIGURES: dict[str, str] = {
    "layer1_histograms.png": "Layer-1 pre-activation (W\u2081x, no bias) and output histograms on the first-pass batch, pooled over seeds",
    "variance_per_layer.png": "Pre-activation variance per layer on the first-pass batch: measured (markers, min..max over seeds) vs the variance recursion (dashed)",
}

_SPLIT_TITLE = {"train": "train (minibatch mean)", "test": "test (held out)"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def figures() -> dict[str, str]:
    """File name -> short caption of every figure, in the order the report shows them: the first
    pass, then one per plotted metric of :mod:`initlab.lab.metrics` (headline first)."""
    out = dict(_FIRST_PASS_FIGURES)
    out.update({m.plot: m.caption or f"{m.label} during training" for m in display_order() if m.plot})
    return out


def _table_row(activation: str) -> ActivationRow | None:
    """The activation table's row of a scenario's activation name, None for an unknown or empty name."""
    try:
        return activation_row(activation) if activation else None
    except InitlabError:
        return None


def output_bounds(activation: str) -> tuple[float, float] | None:
    """(lo, hi) of a bounded activation's outputs (the table's ``bounds``), None when unbounded."""
    row = _table_row(activation)
    return None if row is None else row.bounds


def zero_on_negative(activation: str) -> bool:
    """Whether the activation outputs exactly 0 for every negative input (the table's ``zero_on_negative``)."""
    row = _table_row(activation)
    return row is not None and row.zero_on_negative


# ----------------------------------------------------------------------------- building blocks

_F = TypeVar("_F", bound=Callable[..., Any])


def drawing(fn: _F) -> _F:
    """Run a figure function with the cyclic garbage collector paused.

    A figure allocates tens of thousands of small objects (artists, transforms, ticks); each
    allocation burst triggers collections that walk every object of the process (torch, pandas and
    matplotlib's own), which cost about a quarter of the drawing. The figure's garbage is collected
    at the next collection after the function returns.
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was:
                gc.enable()

    return wrapper  # type: ignore[return-value]


def _lean_ticks(ax: Any) -> None:
    """Fewer ticks, the same labels: each tick is five artists to build, lay out and draw, and the ticks
    cost more than the data. A linear axis left to matplotlib's default locator (one tick every ~3 label
    heights: 9 on a histogram panel) gets at most 6 major ticks on x and 5 on y at the same round steps;
    a log axis spanning 3 decades or more gets no minor ticks (its decades are labelled; below that the
    minor ticks carry the labels and stay)."""
    from matplotlib.ticker import AutoLocator, LogFormatterSciNotation, MaxNLocator, NullLocator

    if ax.get_label() == "<colorbar>":
        return
    for axis, n, lim in ((ax.xaxis, 5, ax.get_xlim), (ax.yaxis, 4, ax.get_ylim)):
        scale = axis.get_scale()
        if scale == "linear" and type(axis.get_major_locator()) is AutoLocator:
            axis.set_major_locator(MaxNLocator(n, steps=[1, 2, 2.5, 5, 10]))
        elif scale == "log":
            lo, hi = sorted(lim())
            if lo > 0 and hi >= 1e3 * lo:
                axis.set_minor_locator(NullLocator())
            for get, put in ((axis.get_major_formatter, axis.set_major_formatter),
                             (axis.get_minor_formatter, axis.set_minor_formatter)):
                if type(get()) is LogFormatterSciNotation:
                    put(_plain_log_formatter(get()))


#: superscript digits and minus, for powers of ten written as plain text
_SUPERSCRIPT = str.maketrans("-\u22120123456789", "\u207b\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def _plain_power(label: str) -> str:
    """A log axis label of matplotlib's mathtext (``$\\mathdefault{2\\times10^{-3}}$``) as plain text
    (``2\u00d710\u207b\u00b3``): the same label, without the mathtext parser and its layout (about a fifth
    of a second per log axis)."""
    if not (label.startswith("$") and label.endswith("$")):
        return label
    body = label[1:-1]
    if body.startswith("\\mathdefault{") and body.endswith("}"):
        body = body[len("\\mathdefault{"):-1]
    body = body.replace("\\times", "\u00d7").replace("\\cdot", "\u00b7").replace("\\minus", "-")
    body = re.sub(r"\^\{([^}]*)\}", lambda m: m.group(1).translate(_SUPERSCRIPT), body)
    return body.replace("{", "").replace("}", "").replace("\\", "")


def _plain_log_formatter(base: Any) -> Any:
    """``base`` (a ``LogFormatterSciNotation``: which ticks get a label, and the label) with plain-text labels."""
    from matplotlib.ticker import FuncFormatter

    class _Plain(FuncFormatter):
        def set_locs(self, locs: Any) -> None:
            base.set_locs(locs)

        def set_axis(self, axis: Any) -> None:
            super().set_axis(axis)
            base.set_axis(axis)

    return _Plain(lambda x, pos=None: _plain_power(base(x, pos)))


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _margins(fig: Figure, *, top: float = 0.5, bottom: float = 0.55, left: float = 0.75, right: float = 0.2,
             hspace: float = 0.55, wspace: float = 0.25) -> None:
    """Fixed margins in inches (a constrained layout costs more than drawing the figure)."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h,
                        hspace=hspace, wspace=wspace)


def _hist(ax: Any, values: np.ndarray, bins: int, color: Any) -> None:
    """A filled histogram as one artist (``stairs``), much faster to draw than one bar per bin."""
    counts, edges = np.histogram(values, bins=bins)
    ax.stairs(counts, edges, fill=True, color=color, alpha=0.85)
    ax.set_ylim(0, max(1, counts.max()) * 1.05)


def _save(fig: Figure, path: str | Path) -> Path:
    for ax in fig.axes:
        _lean_ticks(ax)
    # titles stay where they are (on top of each panel: nothing is drawn above the axes): without
    # this, every draw measures each axis's tight bounding box to move the titles clear of it,
    # which costs about as much as drawing the figure
    for ax in fig.axes:
        ax._autotitlepos = False
    buf = io.BytesIO()
    # zlib level 1: flat colours compress almost as well as at the default level 6 (files ~10% larger)
    # in about half the time
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None}, pil_kwargs={"compress_level": 1})
    return atomic_write_bytes(path, buf.getvalue())


def scenario_colors(scenarios: Sequence[str], info: Info | None = None) -> dict[str, Any]:
    """A colour per scenario. When every (activation, scheme) pair is unique, the colour follows
    the scheme (so "normal" has the same colour in the sigmoid and the ReLU panels)."""
    from matplotlib import colormaps

    info = info or {}
    pairs = [info.get(s) for s in scenarios]
    if all(p is not None for p in pairs):
        if len(set(pairs)) == len(pairs):
            schemes = list(dict.fromkeys(p[1] for p in pairs))  # type: ignore[index]
            cmap = colormaps["tab10" if len(schemes) <= 10 else "tab20"]
            return {s: cmap(schemes.index(p[1]) % cmap.N) for s, p in zip(scenarios, pairs)}  # type: ignore[index]
        distinct = list(dict.fromkeys(pairs))
        if len(distinct) <= 10:  # e.g. a depth sweep: one colour per (activation, scheme)
            cmap = colormaps["tab10"]
            return {s: cmap(distinct.index(p)) for s, p in zip(scenarios, pairs)}
    cmap = colormaps["tab10" if len(scenarios) <= 10 else "tab20"]
    return {s: cmap(i % cmap.N) for i, s in enumerate(scenarios)}


def _pair_legend(scenarios: Sequence[str], info: Info) -> dict[str, str] | None:
    """When (activation, scheme) pairs repeat (a depth or width sweep) and there are at most 10 of
    them: a legend label for the first scenario of each pair, ``"_nolegend_"`` for the rest."""
    pairs = [info.get(s) for s in scenarios]
    if any(p is None for p in pairs) or len(set(pairs)) == len(pairs) or len(set(pairs)) > 10:
        return None
    seen: set = set()
    out = {}
    for s, p in zip(scenarios, pairs):
        out[s] = "_nolegend_" if p in seen else f"{p[0]} + {p[1]}"  # type: ignore[index]
        seen.add(p)
    return out


def _group_label(members: Sequence[str], info: Info) -> str:
    """A short title for scenarios that share a panel: their (activation + scheme) pairs and count."""
    pairs = list(dict.fromkeys(info.get(n) for n in members))
    if len(members) == 1:
        return label(members[0], info)
    if all(p is not None for p in pairs) and len(pairs) <= 3:
        return " = ".join(f"{p[0]} + {p[1]}" for p in pairs) + f" ({len(members)} scenarios)"  # type: ignore[index]
    return names(members, 3)


def scenario_markers(scenarios: Sequence[str], info: Info | None = None) -> dict[str, str]:
    """A marker per scenario, by activation (so colour = scheme, marker = activation)."""
    info = info or {}
    acts = list(dict.fromkeys(info.get(s, (s, ""))[0] for s in scenarios))
    return {s: _MARKERS[acts.index(info.get(s, (s, ""))[0]) % len(_MARKERS)] for s in scenarios}


def _pooled(values: Mapping[tuple[str, int], Mapping[str, np.ndarray]], scenario: str, key: str) -> np.ndarray:
    parts = [np.asarray(v[key], dtype=np.float64).ravel() for (sc, _), v in sorted(values.items(), key=lambda kv: kv[0][1])
             if sc == scenario and key in v]
    if not parts:
        return np.empty(0)
    a = np.concatenate(parts)
    return a[np.isfinite(a)]


# ----------------------------------------------------------------------------- figures


def _panels(values: Mapping[tuple[str, int], Mapping[str, np.ndarray]], scenarios: Sequence[str], info: Info,
            layer: int) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
    """(scenarios, pooled pre-activations, pooled outputs) per panel; scenarios whose layer values are
    identical (same first layer, same seeds) share one."""
    panels: list[tuple[list[str], np.ndarray, np.ndarray]] = []
    for sc in scenarios:
        pre = _pooled(values, sc, f"mat_mul_{layer}")
        post = _pooled(values, sc, f"fc_out_{layer}")
        act = info.get(sc, ("", ""))[0]
        for members, p, q in panels:
            if info.get(members[0], ("", ""))[0] == act and p.shape == pre.shape and q.shape == post.shape \
                    and np.array_equal(p, pre) and np.array_equal(q, post):
                members.append(sc)
                break
        else:
            panels.append(([sc], pre, post))
    return panels


def _output_panel(ax: Any, post: np.ndarray, act: str, bins: int, color: Any, layer: int) -> None:
    """The output histogram; its title gives the mean and, for bounded outputs, the share within 5%
    of the range's ends, for outputs that are 0 on negative inputs the share of zeros."""
    if not post.size:
        ax.set_title(f"no layer-{layer} output values", fontsize=9)
        return
    lo, hi = float(post.min()), float(post.max())
    _hist(ax, post, bins, color)
    desc = f"mean = {post.mean():.3g}"
    bounds = output_bounds(act)
    if bounds is not None:
        bottom, top = bounds
        span = top - bottom
        near = np.mean((post < bottom + 0.05 * span) | (post > top - 0.05 * span))
        ends = "0 or 1" if bottom == 0 else "\u00b11"
        desc += f", {100 * near:.0f}% near {ends}"
        ax.set_xlim(bottom - 0.02 * span, top + 0.02 * span)
    elif zero_on_negative(act):
        desc += f", {100 * np.mean(post <= 0):.0f}% zeros"
    if hi == lo:
        ax.set_xlim(lo - 0.5, hi + 0.5)
    ax.set_title(f"output after {act or 'the activation'}: {desc}", fontsize=9)


@drawing
def layer1_histograms(values: Mapping[tuple[str, int], Mapping[str, np.ndarray]], scenarios: Sequence[str],
                      path: str | Path, *, info: Info | None = None, layer: int = 1, bins: int = 60) -> Path:
    """Histograms of ``mat_mul_<layer>`` and ``fc_out_<layer>`` side by side, per scenario.

    ``values[(scenario, seed)]`` holds the first-pass arrays (``GroupResult.first_pass_values``).
    Titles give the pooled variance (pre-activation) and the mean plus, for bounded outputs, the
    share within 5% of the range's ends, for ReLU-like outputs the share of zeros. Scenarios with
    identical arrays share one pair of panels. Up to 6 pairs one per row, more in 2 or 3 columns.
    """
    info = info or {}
    colors = scenario_colors(scenarios, info)
    panels = _panels(values, scenarios, info, layer)
    n = max(len(panels), 1)
    per_row = 1 if n <= 6 else 2 if n <= 16 else 3
    rows = math.ceil(n / per_row)
    fig = _new_figure(10.0 * per_row if per_row == 1 else 7.5 * per_row, 2.3 * rows + 0.5)
    axes = fig.subplots(rows, 2 * per_row, squeeze=False)
    for k in range(rows * per_row):
        ax_pre, ax_post = axes[k // per_row][2 * (k % per_row)], axes[k // per_row][2 * (k % per_row) + 1]
        if k >= len(panels):
            ax_pre.set_visible(False)
            ax_post.set_visible(False)
            continue
        members, pre, post = panels[k]
        sc = members[0]
        title = _group_label(members, info)
        if pre.size:
            _hist(ax_pre, pre, bins, colors[sc])
            ax_pre.set_title(f"{title}: pre-activation, Var = {pre.var():.3g}", fontsize=9)
        else:
            ax_pre.set_title(f"{title}: no layer-{layer} values", fontsize=9)
        if k % per_row == 0:
            ax_pre.set_ylabel("count")
        _output_panel(ax_post, post, info.get(sc, ("", ""))[0], bins, colors[sc], layer)
        if k // per_row == rows - 1 or k + per_row >= len(panels):
            ax_pre.set_xlabel("W\u2081x (pre-activation, no bias)" if layer == 1 else f"W{layer}x")
            ax_post.set_xlabel("activation output")
    fig.suptitle(f"First pass, layer {layer}: pre-activation and output", fontsize=11)
    _margins(fig, top=0.7, hspace=0.65, wspace=0.22)
    return _save(fig, path)


@drawing
def variance_per_layer(first_pass: pandas.DataFrame, scenarios: Sequence[str], path: str | Path, *,
                       info: Info | None = None) -> Path:
    """Measured ``pre_sq_mean`` (E[(Wx)^2], no bias) per weight layer (mean over seeds, min..max bars) and ``predicted_pre_sq_mean`` (dashed)."""
    from matplotlib.lines import Line2D

    info = info or {}
    colors = scenario_colors(scenarios, info)
    markers = scenario_markers(scenarios, info)
    legend = _pair_legend(scenarios, info)
    many = len(scenarios) > 8 and legend is None
    fig = _new_figure(11.5 if many else 8.0, 5.6 if many else 4.8)
    ax = fig.subplots()
    n = max(len(scenarios), 1)
    max_layer = 1
    spread = 0.06 if n <= 8 else 0.4 / n
    for k, sc in enumerate(scenarios):
        d = first_pass[first_pass["scenario"] == sc]
        if d.empty:
            continue
        g = d.groupby("index")
        idx = np.asarray(sorted(g.groups), dtype=float)
        max_layer = max(max_layer, int(idx.max()))
        mean = g["pre_sq_mean"].mean().reindex(idx).to_numpy(float)
        lo = g["pre_sq_mean"].min().reindex(idx).to_numpy(float)
        hi = g["pre_sq_mean"].max().reindex(idx).to_numpy(float)
        pred = (g["predicted_pre_sq_mean"].mean().reindex(idx).to_numpy(float) if "predicted_pre_sq_mean" in d
                else np.full_like(mean, np.nan))
        x = idx + (k - (n - 1) / 2) * spread  # a small offset so overlapping markers stay visible
        shown = np.isfinite(mean) & np.isfinite(lo) & np.isfinite(hi)  # an overflowed layer has no point
        x, mean, lo, hi = x[shown], mean[shown], lo[shown], hi[shown]
        ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt=markers[sc], color=colors[sc], capsize=3,
                    markersize=5 if len(scenarios) > 8 else 6, label=legend[sc] if legend else label(sc, info))
        ok = np.isfinite(pred) & (pred > 0)
        if ok.any():
            ax.plot(idx[ok], pred[ok], "--", color=colors[sc], alpha=0.8)
    ax.set_yscale("log")
    step = 1 if max_layer <= 12 else max(1, max_layer // 10)
    ax.set_xticks(range(1, max_layer + 1, step))
    ax.set_xlabel("weight layer")
    ax.set_ylabel("E[(Wx)\u00b2], first-pass batch (log scale)")
    ax.set_title("Pre-activation second moment per layer: measured vs predicted")
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="gray", linestyle="--")]
    labels += ["predicted (variance recursion)"]
    if many:
        ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if n <= 24 else 2)
        _margins(fig, top=0.4, left=0.85, right=3.3 if n <= 24 else 5.6)
    else:
        ax.legend(handles, labels, fontsize=8, loc="best")
        _margins(fig, top=0.4, left=0.85)
    return _save(fig, path)


def _curve(ax: Any, e: pandas.DataFrame, color: Any, legend: str) -> None:
    """Mean over seeds at each logged step; a band of +-1 standard deviation where two seeds are finite."""
    g = e.groupby("step")["value"]
    steps = np.asarray(sorted(g.groups), dtype=float)
    mean = g.mean().reindex(steps).to_numpy(float)
    std = g.std(ddof=1).reindex(steps).to_numpy(float)
    cnt = g.count().reindex(steps).to_numpy(int)
    ax.plot(steps, mean, color=color, marker=".", label=f"{legend} (n={int(e['seed'].nunique())})")
    band = (cnt >= 2) & np.isfinite(std)
    if band.any():
        ax.fill_between(steps[band], (mean - std)[band], (mean + std)[band], color=color, alpha=0.2, linewidth=0)


def _unregistered(view: Any) -> Any:  # pragma: no cover - a stand-in entry for a metric name not in the registry
    raise NotImplementedError


def _log_axis(metric: Metric, values: np.ndarray) -> bool:
    """A log axis for a metric that asks for it when its positive values span more than 50x."""
    pos = values[np.isfinite(values) & (values > 0)]
    return metric.log_scale and pos.size > 0 and pos.max() / pos.min() > 50


@drawing
def training_curves(metrics: pandas.DataFrame, scenarios: Sequence[str], metric: str | Sequence[str], path: str | Path, *,
                    info: Info | None = None, models: Mapping[str, Sequence[int]] | None = None) -> Path:
    """Curves of a metric ("acc", "loss", or a list of one metric's components) over steps, one panel
    per comparison group, split and component.

    Up to 3 groups: a column per group, a row per split (and component); more: a row per group.
    Lines are means over seeds at each logged step; the band is mean +- 1 standard deviation
    (ddof = 1) where at least two seeds have a finite value. Diverged members (NaN) drop out.
    """
    info = info or {}
    parts = [metric] if isinstance(metric, str) else list(metric)
    known = owner(parts[0])
    entry = known[0] if known is not None else Metric(parts[0], parts[0], compute=_unregistered)
    colors = scenario_colors(scenarios, info)
    d = metrics[metrics["metric"].isin(parts)]
    rows = [(name, split) for name in parts for split in ("train", "test")
            if (d[d["metric"] == name]["split"] == split).any()] or [(parts[0], "train")]
    groups = comparison_groups(scenarios, info, models) or {"all": list(scenarios)}
    wide = len(groups) <= 3
    n_rows, n_cols = (len(rows), len(groups)) if wide else (len(groups), len(rows))
    fig = _new_figure(5.0 * n_cols + 0.5, 3.4 * n_rows + 0.4)
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharey="row" if wide else False)
    log_axis = _log_axis(entry, d["value"].to_numpy(float))
    for gi, (glabel, members) in enumerate(groups.items()):
        schemes = [info.get(sc, ("", ""))[1] for sc in members]
        by_scheme = all(schemes) and len(set(schemes)) == len(schemes)
        for ri, (name, split) in enumerate(rows):
            ax = axes[ri][gi] if wide else axes[gi][ri]
            e_all = d[(d["metric"] == name) & (d["split"] == split)]
            for sc in members:
                e = e_all[e_all["scenario"] == sc]
                if not e.empty:
                    _curve(ax, e, colors[sc], info[sc][1] if by_scheme else label(sc, info))
            what = component_label(entry, name)
            title = f"{what}, {_SPLIT_TITLE.get(split, split)}"
            ax.set_title(f"{glabel}: {title}" if glabel != "all" else title, fontsize=10)
            ax.grid(True, alpha=0.3)
            if log_axis:
                ax.set_yscale("log")
            if (wide and ri == len(rows) - 1) or (not wide and gi == len(groups) - 1):
                ax.set_xlabel("training step")
            if (wide and gi == 0) or (not wide and ri == 0):
                ax.set_ylabel(entry.label)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="lower right" if entry.higher_is_better else "upper right")
    _margins(fig, top=0.4, hspace=0.35 if wide else 0.45, wspace=0.12 if wide else 0.18)
    return _save(fig, path)


@drawing
def make_figures(metrics: pandas.DataFrame, first_pass: pandas.DataFrame,
                 values: Mapping[tuple[str, int], Mapping[str, np.ndarray]], scenarios: Sequence[str],
                 fig_dir: str | Path, *, info: Info | None = None,
                 models: Mapping[str, Sequence[int]] | None = None,
                 only: Collection[str] | None = None) -> dict[str, Path]:
    """Write every figure of :func:`figures` that the data allows into ``fig_dir`` (with ``only``: those
    of these names); return name -> path."""
    fig_dir = Path(fig_dir)
    out: dict[str, Path] = {}

    def want(name: str) -> bool:
        return only is None or name in only

    if values and want("layer1_histograms.png"):
        out["layer1_histograms.png"] = layer1_histograms(values, scenarios, fig_dir / "layer1_histograms.png", info=info)
    if first_pass is not None and not first_pass.empty and "pre_sq_mean" in first_pass and want("variance_per_layer.png"):
        out["variance_per_layer.png"] = variance_per_layer(first_pass, scenarios, fig_dir / "variance_per_layer.png",
                                                           info=info)
    if metrics is not None and not metrics.empty:
        present = list(metrics["metric"].astype(str).unique())
        for m in display_order():
            parts = component_names(m, present)
            if m.plot and parts and want(m.plot):
                out[m.plot] = training_curves(metrics, scenarios, parts, fig_dir / m.plot, info=info, models=models)
    return {k: out[k] for k in figures() if k in out}
