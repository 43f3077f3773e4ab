"""Figures for grids and depth (PNG, matplotlib's Agg renderer through :mod:`.plots`' helpers).

Five figures, each a function on plain tables, so a preset, a test or a notebook can draw them:

* :func:`metric_vs_depth` (``accuracy_vs_depth.png``): the final test accuracy (and loss) against
  the number of hidden layers, one line per scheme, one panel per activation; the line is the
  mean over seeds, the band spans the seeds (min..max), the dots are the seeds.
* :func:`grid_heatmap` (``heatmap.png``): a metric over two grid axes (e.g. the weight variance
  ``sw2`` and the depth ``L``), the mean over seeds as colour and each cell labelled
  ``mean (min..max)``, with a theory curve on top, e.g. ``L = 6 xi_c(sw2)``: the depth scale of
  Schoenholz et al. (2017) from :func:`initlab.theory.depth_scales`, beyond which a network
  should not train.
* :func:`variance_vs_depth` (``variance_vs_depth.png``): the pre-activation variance of every
  weight layer at initialisation, ``Var(h_l)``, measured on the first-pass batch (mean over seeds,
  band min..max), beside the variance recursion ``Var(h_l) = fan_in * Var(w) * E[phi(h_{l-1})^2]
  + Var(b)`` of :func:`initlab.theory.forward_variances` (dashed).
* :func:`layer_histograms` (``layer_histograms.png``): per layer (rows) and training step
  (columns) the histogram of a layer's values (activations or back-propagated gradients), pooled
  over seeds, so saturation or collapse shows where and when it happens (Glorot & Bengio 2010,
  Figs. 6-8).
* :func:`layer_densities` (``activation_densities.png``, ``gradient_densities.png``): from
  ``layer_histograms.csv`` (``train.layer_stats``), per scenario (rows) one panel at initialisation and
  one at the end of training (columns), per hidden layer the density of the activations h_l =
  phi(z_l) or of the back-propagated gradients dC/dz_l on the held-out statistics batch, mean over
  seeds, layers coloured from low (dark) to high (bright): Glorot & Bengio (2010), Figs. 6-7.
* :func:`init_iterations` (``init_iterations.png``): from ``init.csv``, the rescaling iterations LSUV
  (Mishkin & Matas 2016) took at each layer, one line per scenario (mean over seeds, band min..max).
* :func:`jacobian_spectra` (``jacobian_spectra.png``): the singular values ``s`` of the
  input-output Jacobian (:func:`initlab.theory.jacobian_spectrum`) as histograms of ``log10 s``
  and as empirical distribution functions (band over seeds): dynamical isometry (Pennington,
  Schoenholz & Ganguli 2017) is a spectrum concentrated at ``s = 1``.

:func:`grid_figures` picks the figures a run's grid calls for (a depth axis: the depth figure and
the variance figure; a second numeric grid axis: the heatmap; claims on Jacobian spreads: the spectra of
their scenarios, rebuilt at initialisation) and :func:`grid_captions` gives each
file's caption: what is plotted, and what to see.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._errors import InitlabError
from ...theory import depth_scales
from ..studies import run_experiment_spec, scenario_sw2, spectra_of
from .load import RunData
from .plots import _hist, _margins, _new_figure, _save, drawing
from .stats import final_values

if TYPE_CHECKING:  # pragma: no cover
    import pandas

__all__ = ["metric_vs_depth", "grid_heatmap", "variance_vs_depth", "layer_histograms", "jacobian_spectra",
           "layer_densities", "pooled_densities", "init_iterations",
           "grid_figures", "grid_captions", "depth_table", "sw2_depth_heatmap", "CAPTIONS"]

#: file name -> caption (what is plotted, then what to see)
CAPTIONS: dict[str, str] = {
    "accuracy_vs_depth.png": (
        "Final test accuracy (top) and test loss (bottom) against the number of hidden layers, one line per "
        "scheme and one panel per activation; line = mean over seeds, band = min..max over seeds, dots = seeds. "
        "What to see: where a scheme's accuracy falls towards chance (10%) as the network gets deeper."),
    "heatmap.png": (
        "Final test accuracy over two grid axes (colour = mean over seeds; each cell: mean and min..max over "
        "seeds), with the theory curve drawn over it. What to see: whether the trainable region (bright) ends "
        "where the curve says, e.g. depth 6\u00b7\u03be_c (Schoenholz et al. 2017), widest at the critical "
        "weight variance."),
    "variance_vs_depth.png": (
        "Pre-activation variance Var(h_l) of every weight layer at initialisation on the first-pass batch "
        "(log scale; line = mean over seeds, band = min..max) beside the variance recursion of initlab.theory "
        "(dashed), for the deepest model of each scheme. What to see: a scheme that keeps the variance flat, "
        "one that shrinks or grows it geometrically, and whether the recursion predicts it."),
    "layer_histograms.png": (
        "Histograms of each layer's values (rows: layers, columns: training steps), pooled over seeds; the "
        "title gives the standard deviation. What to see: layers that saturate (mass at the bounds) or "
        "collapse (a spike at 0), and whether that changes during training."),
    "activation_densities.png": (
        "Density of the activations h_l = \u03c6(z_l) of each hidden layer (colour: layer 1 dark to the top layer "
        "bright) on the fixed held-out batch of the per-layer statistics, mean density over seeds; left: at "
        "initialisation (step 0), right: after the last training step; one row per scenario (Glorot & Bengio "
        "2010, Fig. 6). What to see: curves that narrow going up (activations shrinking layer by layer) or "
        "pile up at the bounds (saturation), and how training changes them."),
    "gradient_densities.png": (
        "Density of the back-propagated gradients dC/dz_l (C: the batch's mean cross-entropy) of each hidden "
        "layer (colour: layer 1 dark to the top layer bright) on the same batch, mean density over seeds; left: at "
        "initialisation, right: after the last training step; one row per scenario (Glorot & Bengio 2010, "
        "Fig. 7). What to see: under the standard init the lower layers' curves are narrower (gradients "
        "vanishing going down); under the normalised init the layers overlap."),
    "init_iterations.png": (
        "Rescaling iterations LSUV took at each weight layer to bring its output variance within the "
        "tolerance (init.csv; line = mean over seeds, band = min..max, dots = seeds). What to see: Mishkin & "
        "Matas (2016) say at most a couple per layer; a layer needing many more, or hitting max_iter, "
        "does not fit that claim. A Linear or Conv layer's output is linear in its weights and bias "
        "(Var(cWx + cb) = c\u00b2 Var(Wx + b) on the same input), so one rescale lands on the target and 1 per "
        "layer is what to expect there; more iterations come from layers whose output is not linear in "
        "their weights (e.g. ones that normalise their weights in forward)."),
    "jacobian_spectra.png": (
        "Singular values of the input-output Jacobian at initialisation: histogram of log10 s (left) and the "
        "fraction of values below s (right; line = mean over seeds, band = min..max). What to see: dynamical "
        "isometry is a spectrum concentrated at s = 1 (the dotted line); a wide spread means some directions "
        "are amplified and others lost."),
}

_SEED_ALPHA = 0.18


def grid_captions() -> dict[str, str]:
    """File name -> caption of every figure of this module."""
    return dict(CAPTIONS)


def _colors(keys: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(keys) <= 10 else "tab20"]
    return {k: cmap(i % cmap.N) for i, k in enumerate(keys)}


def _seed_band(ax: Any, x: np.ndarray, per_x: Sequence[np.ndarray], color: Any, label: str, *,
               style: str = "-", dots: bool = True) -> None:
    """Mean over seeds at each x (line), min..max (band) and each seed (dots); NaN seeds drop out."""
    mean = np.array([np.nanmean(v) if np.isfinite(v).any() else np.nan for v in per_x])
    lo = np.array([np.nanmin(v) if np.isfinite(v).any() else np.nan for v in per_x])
    hi = np.array([np.nanmax(v) if np.isfinite(v).any() else np.nan for v in per_x])
    n = max((int(np.isfinite(v).sum()) for v in per_x), default=0)
    ax.plot(x, mean, style, color=color, marker="o", markersize=4, label=f"{label} (n={n} seeds)")
    ok = np.isfinite(lo) & np.isfinite(hi)
    if n >= 2 and ok.any():
        ax.fill_between(x[ok], lo[ok], hi[ok], color=color, alpha=_SEED_ALPHA, linewidth=0)
    if dots:
        for xi, v in zip(x, per_x):
            v = v[np.isfinite(v)]
            ax.plot(np.full(v.shape, xi), v, ".", color=color, alpha=0.6, markersize=3)


# ----------------------------------------------------------------------------- metric against depth


@drawing
def metric_vs_depth(tables: Mapping[str, pandas.DataFrame], path: str | Path, *,
                    ylabels: Mapping[str, str] | None = None, chance: float | None = 0.1) -> Path:
    """One row per metric (``tables``: metric -> frame with columns activation, scheme, depth, seed,
    value), one column per activation, one line per scheme against depth (see the module docstring).
    ``chance`` draws a dotted line on rows whose metric is ``"acc"``."""
    ylabels = ylabels or {}
    metrics = list(tables)
    acts = list(dict.fromkeys(a for t in tables.values() for a in t["activation"]))
    schemes = list(dict.fromkeys(s for t in tables.values() for s in t["scheme"]))
    colors = _colors(schemes)
    fig = _new_figure(4.6 * max(len(acts), 1) + 0.6, 3.2 * max(len(metrics), 1) + 0.5)
    axes = fig.subplots(max(len(metrics), 1), max(len(acts), 1), squeeze=False)
    for ri, m in enumerate(metrics):
        t = tables[m]
        for ci, act in enumerate(acts):
            ax = axes[ri][ci]
            for sc in schemes:
                d = t[(t["activation"] == act) & (t["scheme"] == sc)]
                if d.empty:
                    continue
                depths = np.array(sorted(d["depth"].unique()), dtype=float)
                per = [d[d["depth"] == L]["value"].to_numpy(float) for L in depths]
                _seed_band(ax, depths, per, colors[sc], sc)
            if m == "acc" and chance is not None:
                ax.axhline(chance, color="gray", linestyle=":", linewidth=1)
            ax.set_title(f"{act}: {ylabels.get(m, m)}", fontsize=10)
            ax.set_xlabel("depth (hidden layers)")
            ax.set_ylabel(ylabels.get(m, m))
            ax.grid(True, alpha=0.3)
            if m == "loss" and (t["value"].to_numpy(float) > 0).all() and len(t):
                ax.set_yscale("log")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
    _margins(fig, top=0.4, left=0.95, hspace=0.55, wspace=0.35)
    return _save(fig, path)


# ----------------------------------------------------------------------------- heatmap over two axes


def _index_coord(values: np.ndarray, grid: np.ndarray, log: bool) -> np.ndarray:
    """Positions of ``values`` on a categorical axis whose cell k is centred at ``grid[k]`` (linear
    or log interpolation between cell centres; NaN outside the grid)."""
    v, g = (np.log(values), np.log(grid)) if log else (values, grid)
    out = np.interp(v, g, np.arange(len(grid), dtype=float), left=np.nan, right=np.nan)
    return out


@drawing
def grid_heatmap(table: pandas.DataFrame, path: str | Path, *, x: str, y: str, xlabel: str, ylabel: str,
                 value_label: str, title: str,
                 curve: tuple[np.ndarray, np.ndarray, str] | None = None, vmin: float | None = 0.0,
                 vmax: float | None = 1.0) -> Path:
    """``table`` (columns ``x``, ``y``, seed, value): the mean over seeds as colour, one cell per
    (x, y) grid point, each labelled "mean" over "min..max"; ``curve`` = (xs, ys, legend) is drawn
    in the grid's coordinates (interpolated between cell centres; ``y`` on a log scale)."""
    xs = np.array(sorted(table[x].unique()), dtype=float)
    ys = np.array(sorted(table[y].unique()), dtype=float)
    mean = np.full((len(ys), len(xs)), np.nan)
    lo, hi = mean.copy(), mean.copy()
    for (xv, yv), g in table.groupby([x, y]):
        v = g["value"].to_numpy(float)
        v = v[np.isfinite(v)]
        if v.size:
            i, j = int(np.searchsorted(ys, yv)), int(np.searchsorted(xs, xv))
            mean[i, j], lo[i, j], hi[i, j] = v.mean(), v.min(), v.max()
    fig = _new_figure(1.1 * len(xs) + 2.6, 0.75 * len(ys) + 1.9)
    ax = fig.subplots()
    im = ax.imshow(mean, origin="lower", aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
    for i in range(len(ys)):
        for j in range(len(xs)):
            if np.isfinite(mean[i, j]):
                dark = mean[i, j] < (0.5 if vmax is None else (vmin or 0) + 0.55 * (vmax - (vmin or 0)))
                ax.text(j, i, f"{mean[i, j]:.2f}\n{lo[i, j]:.2f}..{hi[i, j]:.2f}", ha="center", va="center",
                        fontsize=6.5, color="white" if dark else "black")
    ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
    ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if curve is not None:
        cx, cy, legend = curve
        px = _index_coord(np.asarray(cx, float), xs, False)
        with np.errstate(divide="ignore", invalid="ignore"):
            py = _index_coord(np.clip(np.asarray(cy, float), ys[0] * 0.5, ys[-1] * 2), ys, bool((ys > 0).all()))
        ax.plot(px, py, color="red", linewidth=2, label=legend)
        ax.set_ylim(-0.5, len(ys) - 0.5)
        ax.legend(fontsize=8, loc="upper right")
    fig.colorbar(im, ax=ax, label=value_label)
    _margins(fig, top=0.45, left=0.8, bottom=0.65, right=0.3)
    return _save(fig, path)


# ----------------------------------------------------------------------------- variance against depth


@drawing
def variance_vs_depth(table: pandas.DataFrame, path: str | Path) -> Path:
    """``table`` (columns activation, scheme, layer, seed, measured, predicted): per activation a
    panel, per scheme the measured variance (mean, min..max band over seeds) and the prediction
    (dashed, mean over seeds), log y-axis."""
    acts = list(dict.fromkeys(table["activation"]))
    schemes = list(dict.fromkeys(table["scheme"]))
    colors = _colors(schemes)
    fig = _new_figure(4.8 * max(len(acts), 1) + 0.6, 3.9)
    axes = fig.subplots(1, max(len(acts), 1), squeeze=False)[0]
    for ax, act in zip(axes, acts):
        for sc in schemes:
            d = table[(table["activation"] == act) & (table["scheme"] == sc)]
            if d.empty:
                continue
            layers = np.array(sorted(d["layer"].unique()), dtype=float)
            per = [d[d["layer"] == k]["measured"].to_numpy(float) for k in layers]
            per = [np.where(v > 0, v, np.nan) for v in per]
            _seed_band(ax, layers, per, colors[sc], sc, dots=False)
            pred = np.array([d[d["layer"] == k]["predicted"].mean() for k in layers], dtype=float)
            ok = np.isfinite(pred) & (pred > 0)
            if ok.any():
                ax.plot(layers[ok], pred[ok], "--", color=colors[sc], linewidth=1.5)
        ax.plot([], [], "--", color="gray", label="theory (variance recursion)")
        ax.set_yscale("log")
        ax.set_xlabel("weight layer l (1 = first)")
        ax.set_ylabel("E[h_l\u00b2] at init (log scale)")
        ax.set_title(f"{act}: pre-activation variance by layer", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    _margins(fig, top=0.4, left=0.85, wspace=0.3)
    return _save(fig, path)


# ----------------------------------------------------------------------------- histograms over training


@drawing
def layer_histograms(snapshots: Mapping[int, Mapping[int, np.ndarray]], path: str | Path, *,
                     what: str = "activation", bins: int = 60, bounds: tuple[float, float] | None = None) -> Path:
    """``snapshots``: training step -> layer -> values (pooled over seeds). One row per layer, one
    column per step; a row shares its x-range; ``bounds`` fixes it (e.g. (-1, 1) for tanh)."""
    steps = sorted(snapshots)
    layers = sorted({k for s in steps for k in snapshots[s]})
    if not steps or not layers:
        raise ValueError("layer_histograms needs at least one step with one layer")
    fig = _new_figure(2.6 * len(steps) + 0.8, 1.7 * len(layers) + 0.8)
    axes = fig.subplots(len(layers), len(steps), squeeze=False)
    for ri, layer in enumerate(layers):
        vals = [np.asarray(snapshots[s].get(layer, np.empty(0)), float).ravel() for s in steps]
        vals = [v[np.isfinite(v)] for v in vals]
        both = np.concatenate(vals) if any(v.size for v in vals) else np.zeros(1)
        rng = bounds or (float(np.quantile(both, 0.001)), float(np.quantile(both, 0.999)))
        if rng[0] == rng[1]:
            rng = (rng[0] - 1.0, rng[1] + 1.0)
        for ci, (step, v) in enumerate(zip(steps, vals)):
            ax = axes[ri][ci]
            if v.size:
                _hist(ax, np.clip(v, *rng), bins, "C0")
            ax.set_xlim(*rng)
            ax.set_title(f"layer {layer}, step {step}: sd {v.std() if v.size else math.nan:.3g}", fontsize=8)
            ax.tick_params(labelsize=7)
            if ri == len(layers) - 1:
                ax.set_xlabel(what, fontsize=8)
            if ci == 0:
                ax.set_ylabel("count", fontsize=8)
    _margins(fig, top=0.35, left=0.7, bottom=0.5, hspace=0.75, wspace=0.3)
    return _save(fig, path)


# ----------------------------------------------------------------------------- layer densities over training


def _seed_density(d: pandas.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(bin edges, density) of one seed's histogram rows of one layer."""
    d = d.sort_values("lo")
    lo, hi, c = d["lo"].to_numpy(float), d["hi"].to_numpy(float), d["count"].to_numpy(float)
    total = c.sum()
    return np.append(lo, hi[-1]), (c / (total * (hi - lo)) if total > 0 else np.zeros_like(c))


def pooled_densities(table: pandas.DataFrame) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], int]:
    """Layer -> (edges, density) of one (scenario, step) of ``layer_histograms.csv`` rows: the mean over seeds
    of each seed's density (a step function, 0 outside its bins) on the union of their bin edges, so seeds
    whose bins differ still pool; also the number of seeds."""
    seeds = sorted(int(s) for s in table["seed"].unique())
    out = {}
    for layer, d in table.groupby("layer"):
        per = [_seed_density(d[d["seed"] == s]) for s in seeds if (d["seed"] == s).any()]
        grid = np.unique(np.concatenate([e for e, _ in per]))
        mids = (grid[:-1] + grid[1:]) / 2
        total = np.zeros_like(mids)
        for edges, dens in per:
            i = np.searchsorted(edges, mids, side="right") - 1
            ok = (i >= 0) & (i < dens.size)
            total += np.where(ok, dens[np.clip(i, 0, max(dens.size - 1, 0))], 0.0)
        out[int(layer)] = (grid, total / max(len(per), 1))
    return out, len(seeds)


_DENSITY_X = {"activation": "activation h_l = \u03c6(z_l)", "gradient": "back-propagated gradient dC/dz_l"}


@drawing
def layer_densities(table: pandas.DataFrame, path: str | Path, *, quantity: str = "activation") -> Path:
    """``table``: ``layer_histograms.csv`` rows of one quantity. One row of panels per scenario: the first
    step (initialisation) and the last; per layer the density (mean over seeds, :func:`pooled_densities`)
    as a line at the bin centres, layers coloured from low (dark) to high (bright)."""
    from matplotlib import colormaps

    scenarios = list(dict.fromkeys(table["scenario"]))
    steps = sorted(int(s) for s in table["step"].unique())
    if not scenarios or not steps:
        raise InitlabError("layer_densities: no histogram rows to draw")
    cols = [steps[0], steps[-1]] if len(steps) > 1 else steps
    layers = sorted(int(v) for v in table["layer"].unique())
    cmap = colormaps["viridis"]
    color = {k: cmap(i / max(len(layers) - 1, 1) * 0.9) for i, k in enumerate(layers)}
    fig = _new_figure(4.6 * len(cols) + 0.6, 2.9 * len(scenarios) + 0.6)
    axes = fig.subplots(len(scenarios), len(cols), squeeze=False)
    for ri, sc in enumerate(scenarios):
        for ci, step in enumerate(cols):
            ax = axes[ri][ci]
            d = table[(table["scenario"] == sc) & (table["step"] == step)]
            dens, n_seeds = pooled_densities(d)
            for layer, (edges, y) in sorted(dens.items()):
                ax.plot((edges[:-1] + edges[1:]) / 2, y, color=color.get(layer, "gray"), linewidth=1.4,
                        label=f"layer {layer}")
            when = "initialisation (step 0)" if step == 0 else f"after training (step {step})"
            ax.set_title(f"{sc}: {when}, mean of {n_seeds} seeds", fontsize=9)
            ax.set_xlabel(_DENSITY_X.get(quantity, quantity), fontsize=8)
            ax.set_ylabel("density (per unit of x)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
            ax.grid(True, alpha=0.3)
            if ri == 0 and ci == 0 and dens:
                ax.legend(fontsize=7, loc="upper right")
    _margins(fig, top=0.35, left=0.75, bottom=0.55, hspace=0.7, wspace=0.3)
    return _save(fig, path)


@drawing
def init_iterations(table: pandas.DataFrame, path: str | Path) -> Path:
    """``table``: ``init.csv`` rows of the quantity "iterations": one line per scenario over the layer index
    (mean over seeds, band min..max, dots = seeds)."""
    scenarios = list(dict.fromkeys(table["scenario"]))
    colors = _colors(scenarios)
    fig = _new_figure(8.0, 3.8)
    ax = fig.subplots()
    top = 1.0
    for k, sc in enumerate(scenarios):
        d = table[table["scenario"] == sc]
        idx = np.array(sorted(int(i) for i in d["index"].unique()), dtype=float)
        per = [d[d["index"] == i]["value"].to_numpy(float) for i in idx]
        shift = (k - (len(scenarios) - 1) / 2) * 0.12  # scenarios side by side when their counts coincide
        _seed_band(ax, idx + shift, per, colors[sc], sc)
        top = max([top] + [float(np.nanmax(v)) for v in per if np.isfinite(v).any()])
    ax.set_xlabel("weight layer (1 = first, in forward order)")
    ax.set_ylabel("rescaling iterations")
    ax.set_title("LSUV: rescaling iterations per layer (Mishkin & Matas 2016)", fontsize=10)
    ax.set_ylim(-0.3, top + 1.0)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    _margins(fig, top=0.4, left=0.75)
    return _save(fig, path)


def _record_figures(data: RunData, fig_dir: Path, want: Callable[[str], bool]) -> dict[str, Path]:
    """The figures of init.csv and layer_histograms.csv, when the run has them (those ``want`` accepts)."""
    out: dict[str, Path] = {}
    hist = data.layer_histograms
    if hist is not None and not hist.empty:
        for q in ("activation", "gradient"):
            t = hist[hist["quantity"] == q]
            if not t.empty and want(f"{q}_densities.png"):
                out[f"{q}_densities.png"] = layer_densities(t, fig_dir / f"{q}_densities.png", quantity=q)
    init = data.init
    if init is not None and not init.empty and want("init_iterations.png"):
        t = init[init["quantity"] == "iterations"]
        if not t.empty:
            out["init_iterations.png"] = init_iterations(t, fig_dir / "init_iterations.png")
    return out


# ----------------------------------------------------------------------------- Jacobian spectra


@drawing
def jacobian_spectra(spectra: Mapping[str, Sequence[np.ndarray]], path: str | Path) -> Path:
    """``spectra``: label -> one array of singular values per seed. Left: histogram of log10 s,
    pooled over seeds; right: the empirical distribution function, mean over seeds with a
    min..max band. Both x-axes are log10 s; the dotted line is s = 1."""
    labels = list(spectra)
    colors = _colors(labels)
    fig = _new_figure(10.5, 3.9)
    ax_h, ax_c = fig.subplots(1, 2)
    logs = {k: [np.log10(np.asarray(v, float).ravel()[np.asarray(v, float).ravel() > 0]) for v in spectra[k]]
            for k in labels}
    every = np.concatenate([x for k in labels for x in logs[k]] or [np.zeros(1)])
    lo, hi = float(every.min()) - 0.1, float(every.max()) + 0.1
    grid = np.linspace(lo, hi, 200)
    for k in labels:
        pooled = np.concatenate(logs[k]) if logs[k] else np.empty(0)
        counts, edges = np.histogram(pooled, bins=50, range=(lo, hi), density=True)
        ax_h.stairs(counts, edges, color=colors[k], label=k, linewidth=1.5)
        cdfs = np.array([np.searchsorted(np.sort(x), grid, side="right") / max(x.size, 1) for x in logs[k]])
        _seed_band(ax_c, grid, list(cdfs.T), colors[k], k, dots=False)
    for ax in (ax_h, ax_c):
        ax.axvline(0.0, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("log10 singular value of the input-output Jacobian")
        ax.grid(True, alpha=0.3)
    for line in ax_c.get_lines():
        line.set_marker("")
    ax_h.set_ylabel("density")
    ax_h.set_title("Jacobian singular values (pooled over seeds)", fontsize=10)
    ax_h.legend(fontsize=7, loc="best")
    ax_c.set_ylabel("fraction of singular values \u2264 s")
    ax_c.set_title("Distribution function (band = seeds)", fontsize=10)
    _margins(fig, top=0.4, left=0.75, wspace=0.28)
    return _save(fig, path)


# ----------------------------------------------------------------------------- a run's grid


def depth_table(data: RunData, split: str, metric: str) -> pandas.DataFrame:
    """activation, scheme, depth (hidden layers = len(widths) - 2), seed, final value, per member."""
    import pandas as pd

    rows = []
    try:
        sw2 = scenario_sw2(run_experiment_spec(data))
    except InitlabError:
        sw2 = {}
    for sc, by_seed in final_values(data.metrics, split, metric).items():
        widths = data.models.get(sc)
        act, scheme = data.info.get(sc, ("", ""))
        if sc in sw2:
            scheme = f"{scheme}, \u03c3_w\u00b2 = {sw2[sc]:g}"
        if not widths:
            continue
        for seed, v in by_seed.items():
            rows.append({"activation": act or "all", "scheme": scheme or sc, "depth": len(widths) - 2,
                         "seed": seed, "value": v})
    return pd.DataFrame(rows, columns=["activation", "scheme", "depth", "seed", "value"])


def _variance_table(data: RunData) -> pandas.DataFrame | None:
    """The first pass of the deepest model of each (activation, scheme): layer, measured, predicted."""
    import pandas as pd

    fp = data.first_pass
    if fp is None or fp.empty or "pre_sq_mean" not in fp or "predicted_pre_sq_mean" not in fp:
        return None
    deepest: dict[tuple[str, str], str] = {}
    for sc in data.scenarios:
        key = data.info.get(sc, ("", sc))
        if key not in deepest or len(data.models.get(sc, ())) > len(data.models.get(deepest[key], ())):
            deepest[key] = sc
    parts = []
    for (act, scheme), sc in deepest.items():
        d = fp[fp["scenario"] == sc]
        parts.append(pd.DataFrame({"activation": act or "all", "scheme": scheme or sc, "layer": d["index"],
                                   "seed": d["seed"], "measured": d["pre_sq_mean"],
                                   "predicted": d["predicted_pre_sq_mean"]}))
    return pd.concat(parts, ignore_index=True) if parts else None


def sw2_depth_heatmap(data: RunData) -> tuple[pandas.DataFrame, dict[str, Any]] | None:
    """The (sw2, depth) grid of a run whose scenarios have a weight variance sw2 (an ``sw2`` grid axis, or
    ``normal`` with a ``std``: see :func:`initlab.lab.studies.scenario_sw2`) and one activation: final test accuracy per cell and the
    curve ``L = 6 xi_c(sw2)`` from :func:`initlab.theory.depth_scales` (``sb2 = model.bias_var``)."""
    import pandas as pd

    exp = run_experiment_spec(data)
    sw2 = scenario_sw2(exp)
    acts = {sc.activation for sc in exp.scenarios if sc.name in sw2}
    depths = {len(sc.model.widths) - 2 for sc in exp.scenarios if sc.name in sw2}
    if len(set(sw2.values())) < 2 or len(depths) < 2 or len(acts) != 1:
        return None
    (act,) = acts
    finals = final_values(data.metrics, "test", "acc")
    rows = [{"sw2": sw2[sc.name], "depth": len(sc.model.widths) - 2, "seed": seed, "value": v}
            for sc in exp.scenarios if sc.name in sw2 for seed, v in finals.get(sc.name, {}).items()]
    if not rows:
        return None
    lo, hi = min(sw2.values()), max(sw2.values())
    xs = np.linspace(lo, hi, 120)
    ys = np.array([6.0 * depth_scales(act, float(s), exp.model.bias_var)[1] for s in xs])
    sb2 = exp.model.bias_var
    return pd.DataFrame(rows), {
        "x": "sw2", "y": "depth", "xlabel": "\u03c3_w\u00b2 (Var(w) = \u03c3_w\u00b2 / fan_in)",
        "ylabel": "depth L (hidden layers)", "value_label": "final test accuracy",
        "title": f"{act}, \u03c3_b\u00b2 = {sb2:g}: final test accuracy over (\u03c3_w\u00b2, depth)",
        "curve": (xs, ys, "theory: L = 6\u00b7\u03be_c(\u03c3_w\u00b2)")}


def _spectra_scenarios(exp: Any) -> list[str]:
    """The scenarios named by the run's Jacobian-spread claims, in order."""
    out: list[str] = []
    for c in exp.claims:
        if c.quantity.startswith("jacobian_spread"):
            args = dict(c.args)
            out += [str(args[k]) for k in ("scenario", "other") if k in args and str(args[k]) not in out]
    return out


@drawing
def grid_figures(data: RunData, fig_dir: str | Path, only: Collection[str] | None = None) -> dict[str, Path]:
    """The figures of this module that the run's grid calls for (with ``only``: those of these names),
    written into ``fig_dir``."""
    fig_dir = Path(fig_dir)
    out: dict[str, Path] = {}

    def want(*names: str) -> bool:
        return only is None or any(n in only for n in names)

    depths = {len(w) for w in data.models.values()}
    if len(depths) > 1 and data.metrics is not None and not data.metrics.empty \
            and want("accuracy_vs_depth.png", "variance_vs_depth.png"):
        tables = {m: depth_table(data, "test", m) for m in ("acc", "loss")}
        tables = {m: t for m, t in tables.items() if not t.empty}
        if tables and want("accuracy_vs_depth.png"):
            out["accuracy_vs_depth.png"] = metric_vs_depth(
                tables, fig_dir / "accuracy_vs_depth.png", ylabels={"acc": "final test accuracy",
                                                                  "loss": "final test loss (log scale)"})
        var = _variance_table(data) if want("variance_vs_depth.png") else None
        if var is not None and not var.empty:
            out["variance_vs_depth.png"] = variance_vs_depth(var, fig_dir / "variance_vs_depth.png")
    if want("jacobian_spectra.png"):
        try:
            names = _spectra_scenarios(run_experiment_spec(data))
            spectra = {n: list(spectra_of(data, n).values()) for n in names}
        except InitlabError:
            spectra = {}
        if spectra:
            out["jacobian_spectra.png"] = jacobian_spectra(spectra, fig_dir / "jacobian_spectra.png")
    if data.metrics is not None and not data.metrics.empty and want("heatmap.png"):
        got = sw2_depth_heatmap(data)
        if got is not None:
            out["heatmap.png"] = grid_heatmap(got[0], fig_dir / "heatmap.png", **got[1])
    out.update(_record_figures(data, fig_dir, want))
    return out
