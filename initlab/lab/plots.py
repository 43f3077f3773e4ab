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
* ``accuracy.png`` and ``loss.png``: training curves, one panel per comparison group (same
  activation and model shape; see :func:`comparison_groups`) and split (train minibatches,
  held-out test); mean over seeds with a band of +-1 standard deviation (one seed: line only).

matplotlib is imported inside the functions; figures go through ``Figure`` + the Agg canvas,
so no global pyplot state is touched. Files are written atomically.
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._io import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    import pandas
    from matplotlib.figure import Figure

__all__ = ["layer1_histograms", "variance_per_layer", "training_curves", "make_figures", "FIGURES",
           "scenario_colors", "scenario_markers", "comparison_groups", "widths_label"]

#: file name -> short caption, in the order the report shows them
FIGURES: dict[str, str] = {
    "layer1_histograms.png": "Layer-1 pre-activation (W\u2081x, no bias) and output histograms on the first-pass batch, pooled over seeds",
    "variance_per_layer.png": "Pre-activation variance per layer on the first-pass batch: measured (markers, min..max over seeds) vs the variance recursion (dashed)",
    "accuracy.png": "Accuracy during training: mean over seeds, band = \u00b11 standard deviation",
    "loss.png": "Cross-entropy loss during training: mean over seeds, band = \u00b11 standard deviation",
}

_SPLIT_TITLE = {"train": "train (minibatch mean)", "test": "test (held out)"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
_BOUNDED = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "hardtanh": (-1.0, 1.0), "softsign": (-1.0, 1.0)}

Info = Mapping[str, tuple[str, str]]


# ----------------------------------------------------------------------------- building blocks


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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return atomic_write_bytes(path, buf.getvalue())


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


def _group_label(names: Sequence[str], info: Info) -> str:
    """A short title for scenarios that share a panel: their (activation + scheme) pairs and count."""
    pairs = list(dict.fromkeys(info.get(n) for n in names))
    if len(names) == 1:
        return _label(names[0], info)
    if all(p is not None for p in pairs) and len(pairs) <= 3:
        return " = ".join(f"{p[0]} + {p[1]}" for p in pairs) + f" ({len(names)} scenarios)"  # type: ignore[index]
    return _names(names, 3)


def scenario_markers(scenarios: Sequence[str], info: Info | None = None) -> dict[str, str]:
    """A marker per scenario, by activation (so colour = scheme, marker = activation)."""
    info = info or {}
    acts = list(dict.fromkeys(info.get(s, (s, ""))[0] for s in scenarios))
    return {s: _MARKERS[acts.index(info.get(s, (s, ""))[0]) % len(_MARKERS)] for s in scenarios}


def _label(scenario: str, info: Info) -> str:
    """The scenario's name, with activation and scheme when the name does not say them."""
    if scenario in info:
        act, scheme = info[scenario]
        if act and scheme and not (act in scenario and scheme.split("_")[0] in scenario):
            return f"{scenario} ({act} + {scheme})"
    return scenario


def _names(names: Sequence[str], limit: int = 4) -> str:
    return ", ".join(names) if len(names) <= limit else ", ".join(names[:limit - 1]) + f" and {len(names) - limit + 1} more"


def _pooled(values: Mapping[tuple[str, int], Mapping[str, np.ndarray]], scenario: str, key: str) -> np.ndarray:
    parts = [np.asarray(v[key], dtype=np.float64).ravel() for (sc, _), v in sorted(values.items(), key=lambda kv: kv[0][1])
             if sc == scenario and key in v]
    if not parts:
        return np.empty(0)
    a = np.concatenate(parts)
    return a[np.isfinite(a)]


# ----------------------------------------------------------------------------- figures


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
    # merge scenarios whose layer-1 values are identical (same first layer, same seeds)
    panels: list[tuple[list[str], np.ndarray, np.ndarray]] = []
    for sc in scenarios:
        pre = _pooled(values, sc, f"mat_mul_{layer}")
        post = _pooled(values, sc, f"fc_out_{layer}")
        act = info.get(sc, ("", ""))[0]
        for names, p, q in panels:
            if info.get(names[0], ("", ""))[0] == act and p.shape == pre.shape and q.shape == post.shape \
                    and np.array_equal(p, pre) and np.array_equal(q, post):
                names.append(sc)
                break
        else:
            panels.append(([sc], pre, post))
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
        names, pre, post = panels[k]
        sc = names[0]
        act = info.get(sc, ("", ""))[0]
        label = _group_label(names, info)
        if pre.size:
            _hist(ax_pre, pre, bins, colors[sc])
            ax_pre.set_title(f"{label}: pre-activation, Var = {pre.var():.3g}", fontsize=9)
        else:
            ax_pre.set_title(f"{label}: no layer-{layer} values", fontsize=9)
        if k % per_row == 0:
            ax_pre.set_ylabel("count")
        if post.size:
            lo, hi = float(post.min()), float(post.max())
            _hist(ax_post, post, bins, colors[sc])
            desc = f"mean = {post.mean():.3g}"
            if act in _BOUNDED:
                bottom, top = _BOUNDED[act]
                span = top - bottom
                near = np.mean((post < bottom + 0.05 * span) | (post > top - 0.05 * span))
                ends = "0 or 1" if bottom == 0 else "\u00b11"
                desc += f", {100 * near:.0f}% near {ends}"
                ax_post.set_xlim(bottom - 0.02 * span, top + 0.02 * span)
            elif act in ("relu", "relu6"):
                desc += f", {100 * np.mean(post <= 0):.0f}% zeros"
            if hi == lo:
                ax_post.set_xlim(lo - 0.5, hi + 0.5)
            ax_post.set_title(f"output after {act or 'the activation'}: {desc}", fontsize=9)
        else:
            ax_post.set_title(f"no layer-{layer} output values", fontsize=9)
        if k // per_row == rows - 1 or k + per_row >= len(panels):
            ax_pre.set_xlabel("W\u2081x (pre-activation, no bias)" if layer == 1 else f"W{layer}x")
            ax_post.set_xlabel("activation output")
    fig.suptitle(f"First pass, layer {layer}: pre-activation and output", fontsize=11)
    _margins(fig, top=0.7, hspace=0.65, wspace=0.22)
    return _save(fig, path)


def variance_per_layer(first_pass: pandas.DataFrame, scenarios: Sequence[str], path: str | Path, *,
                       info: Info | None = None) -> Path:
    """Measured ``pre_var`` per weight layer (mean over seeds, min..max bars) and ``predicted_pre_var`` (dashed)."""
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
        mean = g["pre_var"].mean().reindex(idx).to_numpy(float)
        lo = g["pre_var"].min().reindex(idx).to_numpy(float)
        hi = g["pre_var"].max().reindex(idx).to_numpy(float)
        pred = (g["predicted_pre_var"].mean().reindex(idx).to_numpy(float) if "predicted_pre_var" in d
                else np.full_like(mean, np.nan))
        x = idx + (k - (n - 1) / 2) * spread  # a small offset so overlapping markers stay visible
        ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt=markers[sc], color=colors[sc], capsize=3,
                    markersize=5 if len(scenarios) > 8 else 6, label=legend[sc] if legend else _label(sc, info))
        ok = np.isfinite(pred) & (pred > 0)
        if ok.any():
            ax.plot(idx[ok], pred[ok], "--", color=colors[sc], alpha=0.8)
    ax.set_yscale("log")
    step = 1 if max_layer <= 12 else max(1, max_layer // 10)
    ax.set_xticks(range(1, max_layer + 1, step))
    ax.set_xlabel("weight layer")
    ax.set_ylabel("Var(Wx), first-pass batch (log scale)")
    ax.set_title("Pre-activation variance per layer: measured vs predicted")
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


def training_curves(metrics: pandas.DataFrame, scenarios: Sequence[str], metric: str, path: str | Path, *,
                    info: Info | None = None, models: Mapping[str, Sequence[int]] | None = None) -> Path:
    """Curves of ``metric`` ("acc" or "loss") over steps, one panel per comparison group and split.

    Up to 3 groups: a column per group, a row per split; more: a row per group. Lines are
    means over seeds at each logged step; the band is mean +- 1 standard deviation (ddof = 1)
    where at least two seeds have a finite value. Diverged members (NaN) drop out.
    """
    info = info or {}
    colors = scenario_colors(scenarios, info)
    d = metrics[metrics["metric"] == metric]
    splits = [s for s in ("train", "test") if (d["split"] == s).any()] or ["train"]
    groups = comparison_groups(scenarios, info, models) or {"all": list(scenarios)}
    wide = len(groups) <= 3
    n_rows, n_cols = (len(splits), len(groups)) if wide else (len(groups), len(splits))
    fig = _new_figure(5.0 * n_cols + 0.5, 3.4 * n_rows + 0.4)
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharey="row" if wide else False)
    name = {"acc": "accuracy", "loss": "loss"}.get(metric, metric)
    ys = d["value"].to_numpy(float)
    pos = ys[np.isfinite(ys) & (ys > 0)]
    log_loss = metric == "loss" and pos.size > 0 and pos.max() / pos.min() > 50
    for gi, (glabel, members) in enumerate(groups.items()):
        schemes = [info.get(sc, ("", ""))[1] for sc in members]
        by_scheme = all(schemes) and len(set(schemes)) == len(schemes)
        for si, split in enumerate(splits):
            ax = axes[si][gi] if wide else axes[gi][si]
            for sc in members:
                e = d[(d["scenario"] == sc) & (d["split"] == split)]
                if e.empty:
                    continue
                g = e.groupby("step")["value"]
                steps = np.asarray(sorted(g.groups), dtype=float)
                mean = g.mean().reindex(steps).to_numpy(float)
                std = g.std(ddof=1).reindex(steps).to_numpy(float)
                cnt = g.count().reindex(steps).to_numpy(int)
                n_seeds = int(e["seed"].nunique())
                name_sc = info[sc][1] if by_scheme else _label(sc, info)
                ax.plot(steps, mean, color=colors[sc], marker=".", label=f"{name_sc} (n={n_seeds})")
                band = (cnt >= 2) & np.isfinite(std)
                if band.any():
                    ax.fill_between(steps[band], (mean - std)[band], (mean + std)[band], color=colors[sc], alpha=0.2,
                                    linewidth=0)
            title = f"{glabel}: {name}, {_SPLIT_TITLE.get(split, split)}" if glabel != "all" else \
                f"{name}, {_SPLIT_TITLE.get(split, split)}"
            ax.set_title(title, fontsize=10)
            ax.grid(True, alpha=0.3)
            if log_loss:
                ax.set_yscale("log")
            if (wide and si == len(splits) - 1) or (not wide and gi == len(groups) - 1):
                ax.set_xlabel("training step")
            if (wide and gi == 0) or (not wide and si == 0):
                ax.set_ylabel(name)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="lower right" if metric == "acc" else "upper right")
    _margins(fig, top=0.4, hspace=0.35 if wide else 0.45, wspace=0.12 if wide else 0.18)
    return _save(fig, path)


def make_figures(metrics: pandas.DataFrame, first_pass: pandas.DataFrame,
                 values: Mapping[tuple[str, int], Mapping[str, np.ndarray]], scenarios: Sequence[str],
                 fig_dir: str | Path, *, info: Info | None = None,
                 models: Mapping[str, Sequence[int]] | None = None) -> dict[str, Path]:
    """Write every figure of :data:`FIGURES` that the data allows into ``fig_dir``; return name -> path."""
    fig_dir = Path(fig_dir)
    out: dict[str, Path] = {}
    if values:
        out["layer1_histograms.png"] = layer1_histograms(values, scenarios, fig_dir / "layer1_histograms.png", info=info)
    if first_pass is not None and not first_pass.empty and "pre_var" in first_pass:
        out["variance_per_layer.png"] = variance_per_layer(first_pass, scenarios, fig_dir / "variance_per_layer.png",
                                                           info=info)
    if metrics is not None and not metrics.empty:
        for metric, fname in (("acc", "accuracy.png"), ("loss", "loss.png")):
            if (metrics["metric"] == metric).any():
                out[fname] = training_curves(metrics, scenarios, metric, fig_dir / fname, info=info, models=models)
    return {k: out[k] for k in FIGURES if k in out}
