"""The run's HTML report, rebuilt at any time from the run directory's files.

``write_report(run_dir)`` reads ``config.toml``, ``metrics.csv``, ``first_pass.csv`` and the
first-pass arrays under ``parts/`` (for the histograms), redraws ``figures/*.png`` and writes
``report.html``: one self-contained file (CSS inline, figures embedded as base64 ``data:``
URIs, no external resource) that opens offline in any browser.

The report holds:

* findings, each computed from the numbers of this run (nothing is hard-coded): the input
  statistics and why the layer-1 pre-activation variance is ``fan_in Var(w) E[x^2]`` rather
  than ``fan_in Var(w) Var(x)`` (for independent w and x with E[w] = 0,
  Var(wx) = E[w^2] E[x^2]; LeCun et al. 1998, Glorot & Bengio 2010), saturation of bounded
  units, dead ReLU units, agreement of the variance recursion with the measurement, divergent
  members, and the accuracy ordering of the schemes per activation, where ``>`` is written only
  when the difference of the seed means exceeds twice its standard error;
* a summary table: final train and test accuracy, mean +- standard deviation over seeds (n);
* the first-pass table: per scenario and layer, measured pre-activation variance beside the
  prediction of :mod:`initlab.theory`;
* the figures of :mod:`initlab.lab.plots`.

A tiny inline script records, once the page has loaded, each image's ``naturalWidth`` and any
script error in the hidden element ``#render-status`` (the browser test reads it back).

pandas and matplotlib are imported inside the functions.
"""
from __future__ import annotations

import base64
import html
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import InitlabError
from ._io import atomic_write_text, slug
from .plots import _label, _names
from .run import METRICS_COLUMNS, read_run_meta

if TYPE_CHECKING:  # pragma: no cover
    import pandas

__all__ = ["RunData", "load_run", "findings", "summary_rows", "first_pass_rows", "render_html", "write_report",
           "final_values", "accuracy_ordering", "Finding"]

# ----------------------------------------------------------------------------- loading


@dataclass
class RunData:
    """Everything the report needs, read from a run directory (see :func:`load_run`)."""

    run_dir: Path
    name: str
    description: str
    config_text: str
    metrics: pandas.DataFrame
    first_pass: pandas.DataFrame
    values: dict[tuple[str, int], dict[str, np.ndarray]]
    scenarios: list[str]
    info: dict[str, tuple[str, str]]  # scenario -> (activation, scheme)
    models: dict[str, tuple[int, ...]] = field(default_factory=dict)  # scenario -> model widths
    meta: dict[str, Any] = field(default_factory=dict)  # run.json
    train: dict[str, Any] = field(default_factory=dict)  # steps, batch size, ... from the config


def _read_toml(text: str) -> dict[str, Any]:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(text)


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read a run directory written by :func:`initlab.lab.run.run_experiment`.

    Needs ``config.toml`` and ``metrics.csv``; ``first_pass.csv``, ``run.json`` and the first-pass
    arrays (``parts/<scenario>/seed<k>/values.npz``) are used when present. Raises
    :class:`InitlabError` when the directory is not a run directory or a file cannot be read.
    """
    import pandas as pd

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InitlabError(f"run directory {str(run_dir)!r} does not exist")
    cfg_path = run_dir / "config.toml"
    if not cfg_path.is_file():
        raise InitlabError(f"{str(run_dir)!r} is not an initlab run directory: it has no config.toml")
    config_text = cfg_path.read_text(encoding="utf-8")
    try:
        cfg = _read_toml(config_text)
    except Exception as e:  # tomllib.TOMLDecodeError and friends
        raise InitlabError(f"{cfg_path}: not valid TOML ({e})") from e
    metrics_path = run_dir / "metrics.csv"
    if not metrics_path.is_file():
        raise InitlabError(f"{str(run_dir)!r} has no metrics.csv yet: no unit of the run has finished; "
                           f"run `initlab run {cfg_path}` --out {run_dir} first")
    try:
        metrics = pd.read_csv(metrics_path)
    except Exception as e:
        raise InitlabError(f"{metrics_path}: cannot be read as CSV ({e})") from e
    missing = [c for c in METRICS_COLUMNS if c not in metrics.columns]
    if missing:
        raise InitlabError(f"{metrics_path}: missing column(s) {', '.join(missing)}; expected {', '.join(METRICS_COLUMNS)}")
    metrics["value"] = pd.to_numeric(metrics["value"], errors="coerce")
    metrics["scenario"] = metrics["scenario"].astype(str)
    fp_path = run_dir / "first_pass.csv"
    first_pass = pd.DataFrame()
    if fp_path.is_file() and fp_path.stat().st_size:
        try:
            first_pass = pd.read_csv(fp_path)
        except Exception as e:
            raise InitlabError(f"{fp_path}: cannot be read as CSV ({e})") from e
        if "scenario" in first_pass:
            first_pass["scenario"] = first_pass["scenario"].astype(str)
    meta = read_run_meta(run_dir)

    # scenario order and (activation, scheme) from the resolved config, else from the CSVs
    scenarios: list[str] = []
    info: dict[str, tuple[str, str]] = {}
    models: dict[str, tuple[int, ...]] = {}
    model = cfg.get("model", {}) if isinstance(cfg.get("model"), dict) else {}
    base_widths = model.get("widths", [])
    for sc in cfg.get("scenarios", []) or []:
        if isinstance(sc, dict) and "name" in sc:
            name = str(sc["name"])
            scenarios.append(name)
            info[name] = (str(sc.get("activation", "")), str(sc.get("scheme", "")))
            widths = sc.get("widths", base_widths)
            if isinstance(widths, list) and all(isinstance(w, int) for w in widths):
                models[name] = tuple(widths)
    in_csv = list(dict.fromkeys(list(metrics["scenario"]) + (list(first_pass["scenario"]) if "scenario" in first_pass else [])))
    present, seen = set(in_csv), set(scenarios)
    scenarios = [s for s in scenarios if s in present] + [s for s in in_csv if s not in seen]

    values: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    parts = run_dir / "parts"
    if parts.is_dir():
        seeds_of: dict[str, set[int]] = {}
        for _, r in metrics[["scenario", "seed"]].drop_duplicates().iterrows():
            seeds_of.setdefault(str(r["scenario"]), set()).add(int(r["seed"]))
        for sc in scenarios:
            for seed in sorted(seeds_of.get(sc, ())):
                f = parts / slug(sc) / f"seed{seed}" / "values.npz"
                if f.is_file():
                    with np.load(f) as z:
                        values[(sc, seed)] = {k: z[k] for k in z.files}
    train = cfg.get("train", {}) if isinstance(cfg.get("train"), dict) else {}
    return RunData(run_dir=run_dir, name=str(cfg.get("name", run_dir.name)), description=str(cfg.get("description", "")),
                   config_text=config_text, metrics=metrics, first_pass=first_pass, values=values,
                   scenarios=scenarios, info=info, models=models, meta=meta, train=train)


# ----------------------------------------------------------------------------- numbers


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


def _pct(s: Stat, digits: int = 1) -> str:
    if s.n == 0:
        return "n/a"
    txt = f"{100 * s.mean:.{digits}f}%"
    if s.n >= 2:
        txt += f" \u00b1 {100 * s.std:.{digits}f}"
    return txt


def _g(x: float, digits: int = 3) -> str:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "n/a"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    if abs(x) >= 10 ** digits:
        return f"{x:.0f}"
    return f"{x:#.{digits}g}".rstrip(".")


def _ms(s: Stat, digits: int = 3) -> str:
    if s.n == 0:
        return "n/a"
    return _g(s.mean, digits) + (f" \u00b1 {_g(s.std, 2)}" if s.n >= 2 else "")


def _col(df: pandas.DataFrame, name: str) -> Any:
    import pandas as pd

    return df[name] if name in df else pd.Series([math.nan] * len(df), index=df.index, dtype=float)


def _per_seed(df: pandas.DataFrame, cols: Sequence[str]) -> pandas.DataFrame:
    """Mean of ``cols`` per seed: members with the same seed share their first-pass batch."""
    if "seed" not in df:
        return df[list(cols)]
    return df.groupby("seed")[list(cols)].mean()


@dataclass
class Finding:
    """One statement of the report, computed from the run's numbers."""

    topic: str
    text: str


def _layer_rows(fp: pandas.DataFrame, index: int) -> pandas.DataFrame:
    if fp.empty or "index" not in fp:
        return fp.iloc[0:0]
    return fp[fp["index"] == index]


def _input_findings(data: RunData) -> list[Finding]:
    l1 = _layer_rows(data.first_pass, 1)
    if l1.empty or not {"input_mean", "pre_var", "weight_var", "fan_in"} <= set(l1.columns):
        return []
    in_mean = _col(l1, "input_mean").astype(float)
    # Var(x) and E[x^2] of the batch: from the probe's layer-1 input columns
    in_var = _col(l1, "input_var").astype(float)
    in_sq = _col(l1, "input_sq_mean").astype(float)
    in_sq = in_sq.where(np.isfinite(in_sq), in_var + in_mean ** 2)
    # when both columns exist, the probe's layer-1 input_var could have been replaced by the
    # batch variance (same value for layer 1); recompute E[x^2] - mean^2 for consistency
    in_var = in_sq - in_mean ** 2
    out: list[Finding] = []
    per_seed = _per_seed(l1.assign(_m=in_mean, _v=in_var, _s=in_sq), ["_m", "_v", "_s"])
    sm, sv, ss = Stat.of(per_seed["_m"]), Stat.of(per_seed["_v"]), Stat.of(per_seed["_s"])
    if sv.n == 0:
        return out
    batch = data.train.get("first_pass_batch")
    bdesc = f"{batch} training images" if batch else "training images"
    out.append(Finding("input", (
        f"Input (first-pass batch{'es' if sv.n > 1 else ''} of {bdesc}, {sv.n} seed{'s' if sv.n > 1 else ''}): "
        f"mean pixel value {_g(sm.mean)}, "
        f"Var(x) = {_g(sv.mean)}, E[x\u00b2] = {_g(ss.mean)}."
        + (" The pixels are not zero-mean, so E[x\u00b2] = Var(x) + E[x]\u00b2 exceeds Var(x) by a factor "
           f"{_g(ss.mean / sv.mean)}." if sv.mean > 0 and ss.mean / sv.mean > 1.02 else "")
    )))

    # the layer-1 variance law, shown on the scenarios with the largest weight variance (N(0,1))
    l1 = l1.assign(_sq=in_sq, _var=in_var)
    wv = _col(l1, "weight_var").astype(float)
    if not np.isfinite(wv).any():
        return out
    chosen_schemes = [s for s in ("normal",) if any(data.info.get(sc, ("", ""))[1] == s for sc in l1["scenario"])]
    if chosen_schemes:
        pick = l1[[data.info.get(sc, ("", ""))[1] in chosen_schemes for sc in l1["scenario"]]]
    else:
        pick = l1[wv >= np.nanmax(wv) * 0.5]
    pick = pick[np.isfinite(pick["pre_var"].astype(float))]
    if pick.empty:
        return out
    fan_in = float(pick["fan_in"].astype(float).median())
    pick = pick.assign(_psq=pick["fan_in"].astype(float) * pick["weight_var"].astype(float) * pick["_sq"].astype(float),
                       _pvar=pick["fan_in"].astype(float) * pick["weight_var"].astype(float) * pick["_var"].astype(float))
    ps = _per_seed(pick, ["weight_var", "pre_var", "_sq", "_var", "_psq", "_pvar"]).astype(float)
    w = Stat.of(ps["weight_var"])
    measured = Stat.of(ps["pre_var"])
    sq = Stat.of(ps["_sq"])
    var = Stat.of(ps["_var"])
    pred_sq = float(ps["_psq"].mean())
    pred_var = float(ps["_pvar"].mean())
    scen = _names(list(dict.fromkeys(str(s) for s in pick["scenario"])), 5)
    wdesc = "N(0,1) weights" if chosen_schemes and abs(w.mean - 1) < 0.1 else f"weights of variance {_g(w.mean)}"
    ndesc = f"mean \u00b1 std over {measured.n} seeds" if measured.n > 1 else "1 seed"
    head = (f"Layer-1 pre-activation variance with {wdesc} ({scen}; {ndesc}): measured {_ms(measured)}. "
            f"{int(fan_in)}\u00b7Var(w)\u00b7E[x\u00b2] = {int(fan_in)} \u00d7 {_g(w.mean)} \u00d7 {_g(sq.mean)} = {_g(pred_sq)}; "
            f"{int(fan_in)}\u00b7Var(w)\u00b7Var(x) = {int(fan_in)} \u00d7 {_g(w.mean)} \u00d7 {_g(var.mean)} = {_g(pred_var)}. ")
    err_sq = abs(measured.mean / pred_sq - 1) if pred_sq > 0 else math.inf
    err_var = abs(measured.mean / pred_var - 1) if pred_var > 0 else math.inf
    if pred_sq > 0 and pred_var > 0 and abs(pred_sq / pred_var - 1) < 0.02:
        tail = ("The input is (nearly) zero-mean here, so E[x\u00b2] \u2248 Var(x) and both rules agree.")
    elif err_sq < err_var:
        tail = (f"The measurement matches the E[x\u00b2] rule (off by {100 * err_sq:.1f}%), not the Var(x) rule "
                f"(off by {100 * err_var:.1f}%): the pixels are not zero-mean, and for independent w and x with "
                "E[w] = 0, Var(wx) = E[w\u00b2]E[x\u00b2] \u2212 (E[w]E[x])\u00b2 = Var(w)E[x\u00b2], not Var(w)Var(x).")
    else:
        tail = (f"Here the Var(x) rule is closer (off by {100 * err_var:.1f}% vs {100 * err_sq:.1f}%), "
                "which independent zero-mean weights do not explain: check the first-pass table.")
    out.append(Finding("variance", head + tail))
    return out


def _saturation_findings(data: RunData) -> list[Finding]:
    from .._probe import SATURATION_LEVEL

    out: list[Finding] = []
    l1 = _layer_rows(data.first_pass, 1)
    if l1.empty:
        return out
    dead_groups: dict[str, list[str]] = {}
    dead_names: list[str] = []
    any_dead = False
    sat_groups: dict[str, list[str]] = {}
    for sc in data.scenarios:
        d = l1[l1["scenario"] == sc]
        if d.empty:
            continue
        sat = Stat.of(_col(d, "saturated_frac").astype(float))
        dead = Stat.of(_col(d, "dead_frac").astype(float))
        pm = Stat.of(_col(d, "post_mean").astype(float))
        ps = Stat.of(np.sqrt(_col(d, "post_var").astype(float).clip(lower=0)))
        act = str(d["activation"].iloc[0]) if "activation" in d else ""
        if sat.n:
            text = (f"{100 * sat.mean:.0f}% of layer-1 unit outputs saturated "
                    f"({act}\u2032 below {100 * SATURATION_LEVEL:.0f}% of its peak); outputs mean {_g(pm.mean)}, "
                    f"std {_g(ps.mean)}.")
            if sat.mean >= 0.5:
                text += " Most units sit on the flat ends of the curve, where gradients vanish."
            elif sat.mean <= 0.05:
                text += " The units work in the curve's steep middle part."
            sat_groups.setdefault(text, []).append(_label(sc, data.info))
        elif dead.n:
            later = data.first_pass[(data.first_pass["scenario"] == sc) & (data.first_pass["index"] > 1)]
            dead_all = Stat.of(_col(later, "dead_frac").astype(float))
            any_dead = any_dead or dead.mean > 0 or (dead_all.n > 0 and dead_all.mean > 0)
            part = f"{100 * dead.mean:.0f}% in layer 1"
            if dead_all.n:
                part += f", {100 * dead_all.mean:.0f}% in later hidden layers"
            dead_groups.setdefault(part, []).append(_label(sc, data.info))
            dead_names.append(_label(sc, data.info))
    for text, names in sat_groups.items():
        out.append(Finding("saturation", f"{_names(names, 5)}: {text}"))
    if dead_groups:
        if any_dead:
            out.append(Finding("dead units", "Dead units (zero output for every sample of the first-pass batch): "
                                             + "; ".join(f"{_names(v, 5)}: {k}" for k, v in dead_groups.items()) + "."))
        else:
            out.append(Finding("dead units", "No dead unit at initialisation: every unit of every hidden layer is "
                                             "active for some sample of the first-pass batch ("
                                             + _names(dead_names, 5) + ")."))
    return out


def _depth_finding(data: RunData) -> list[Finding]:
    """How the pre-activation variance changes from layer to layer, per scenario."""
    fp = data.first_pass
    if fp.empty or "pre_var" not in fp or "index" not in fp or fp["index"].nunique() < 2:
        return []
    parts = []
    for sc in data.scenarios:
        d = fp[fp["scenario"] == sc]
        if d.empty:
            continue
        v = d.groupby("index")["pre_var"].mean().sort_index().astype(float)
        if len(v) < 2 or not np.isfinite(v.to_numpy()).all() or (v <= 0).any():
            continue
        factor = float((v.iloc[-1] / v.iloc[0]) ** (1.0 / (len(v) - 1)))
        shown = [_g(x) for x in v]
        if len(shown) > 5:
            shown = shown[:2] + ["\u2026"] + shown[-1:]
        chain = " \u2192 ".join(shown)
        parts.append(f"{_label(sc, data.info)} {chain} ({len(v)} layers, \u00d7{_g(factor, 2)} per layer)")
    if not parts:
        return []
    return [Finding("depth", "Pre-activation variance from layer 1 to the readout (first pass, mean over seeds): "
                             + "; ".join(parts) + ".")]


def _recursion_finding(data: RunData) -> list[Finding]:
    fp = data.first_pass
    if fp.empty or "predicted_pre_var" not in fp or "pre_var" not in fp:
        return []
    d = fp[np.isfinite(fp["predicted_pre_var"].astype(float)) & np.isfinite(fp["pre_var"].astype(float))
           & (fp["predicted_pre_var"].astype(float) > 0)]
    if d.empty:
        return []
    g = d.groupby(["scenario", "index"], sort=False)[["pre_var", "predicted_pre_var"]].mean()
    ratio = g["pre_var"] / g["predicted_pre_var"]
    err = (np.log(ratio)).abs()
    worst = err.idxmax()
    r_worst = float(ratio.loc[worst])
    within = float(np.exp(err.max()) - 1)
    ok_first = g.index.get_level_values("index") == 1
    first_err = float(np.exp(err[ok_first].max()) - 1) if ok_first.any() else math.nan
    text = (f"The variance recursion (initlab.theory, fed with the batch's E[x\u00b2] and each layer's weight variance) "
            f"predicts the mean measured pre-activation variance of every layer of every scenario within a factor "
            f"{_g(1 + within)}; the largest gap is {_label(worst[0], data.info)}, layer {int(worst[1])} "
            f"(measured/predicted = {_g(r_worst)}).")
    if math.isfinite(first_err):
        text += f" At layer 1, where the Gaussian assumption is not needed, the gap is at most {100 * first_err:.1f}%."
    if within > 0.5:
        text += (" Deeper layers deviate more: the recursion assumes Gaussian, independent pre-activations, "
                 "which a 100-sample batch and saturated or dead units only approximate.")
    return [Finding("theory", text)]


def accuracy_ordering(stats: Mapping[str, Stat], labels: Mapping[str, str]) -> str | None:
    """``"a 95.1% \u00b1 0.3 \u2248 b 94.9% \u00b1 0.4 > c 88.2% \u00b1 1.1"``: scenarios by decreasing mean.

    Between neighbours, ``>`` when the difference of means exceeds twice its standard error
    sqrt(s_a^2/n_a + s_b^2/n_b) (both n >= 2), or exceeds 1 point of accuracy when a scenario
    has a single seed; otherwise ``\u2248``. None when fewer than two scenarios have a value.
    """
    items = [(sc, s) for sc, s in stats.items() if s.n > 0]
    if len(items) < 2:
        return None
    items.sort(key=lambda kv: -kv[1].mean)
    parts = [f"{labels.get(items[0][0], items[0][0])} {_pct(items[0][1])}"]
    for (_, a), (sc_b, b) in zip(items, items[1:]):
        diff = a.mean - b.mean
        if a.n >= 2 and b.n >= 2:
            se = math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n)
            sep = diff > 2 * se and diff > 0
        else:
            sep = diff > 0.01
        parts.append(("> " if sep else "\u2248 ") + f"{labels.get(sc_b, sc_b)} {_pct(b)}")
    return " ".join(parts)


def _accuracy_findings(data: RunData) -> list[Finding]:
    out: list[Finding] = []
    finals = final_values(data.metrics, "test", "acc")
    split = "test"
    if not finals:
        finals = final_values(data.metrics, "train", "acc")
        split = "train"
    if not finals:
        return out
    from .plots import comparison_groups

    groups = comparison_groups([sc for sc in data.scenarios if sc in finals], data.info, data.models)
    step = int(data.metrics["step"].max()) if not data.metrics.empty else 0
    for act, scs in groups.items():
        schemes = [data.info.get(sc, ("", ""))[1] for sc in scs]
        unique = all(schemes) and len(set(schemes)) == len(schemes)
        labels = {sc: (data.info[sc][1] if unique else sc) for sc in scs}
        stats = {sc: Stat.of(list(finals[sc].values())) for sc in scs}
        chain = accuracy_ordering(stats, labels)
        if chain is None:
            continue
        ns = sorted({s.n for s in stats.values()})
        ndesc = (f"{ns[0]} seed{'s' if ns[0] != 1 else ''} each" if len(ns) == 1
                 else f"{ns[0]}-{ns[-1]} seeds")
        rule = ("'>' = gap above 2 standard errors" if ns[0] >= 2 else "single seed: '>' = gap above 1 point")
        out.append(Finding("accuracy", f"{act}, final {split} accuracy after {step} steps: {chain} ({ndesc}; {rule})."))
    return out


def _divergence_findings(data: RunData) -> list[Finding]:
    div = data.meta.get("diverged") or []
    if not div:
        return []
    items = ", ".join(f"{d.get('scenario')} seed {d.get('seed')} (step {d.get('step')})" for d in div)
    return [Finding("divergence", f"Diverged (loss became NaN/inf; excluded from means): {items}.")]


def findings(data: RunData) -> list[Finding]:
    """Every finding of the report, computed from ``data`` (see the module docstring)."""
    return (_input_findings(data) + _saturation_findings(data) + _depth_finding(data) + _recursion_finding(data)
            + _accuracy_findings(data) + _divergence_findings(data))


def summary_rows(data: RunData) -> list[dict[str, Any]]:
    """Per scenario: activation, scheme, seeds, final train/test accuracy and test loss (:class:`Stat`)."""
    rows = []
    finals = {(split, metric): final_values(data.metrics, split, metric)
              for split in ("train", "test") for metric in ("acc", "loss")}
    seeds = data.metrics.groupby("scenario")["seed"].nunique().to_dict() if not data.metrics.empty else {}
    l1 = _layer_rows(data.first_pass, 1)
    for sc in data.scenarios:
        act, scheme = data.info.get(sc, ("", ""))
        d1 = l1[l1["scenario"] == sc] if not l1.empty else l1
        row: dict[str, Any] = {"scenario": sc, "activation": act, "scheme": scheme, "seeds": int(seeds.get(sc, 0))}
        for (split, metric), f in finals.items():
            row[f"{split}_{metric}"] = Stat.of(list(f.get(sc, {}).values()))
        row["saturated"] = Stat.of(_col(d1, "saturated_frac").astype(float))
        row["dead"] = Stat.of(_col(d1, "dead_frac").astype(float))
        rows.append(row)
    return rows


def first_pass_rows(data: RunData) -> list[dict[str, Any]]:
    """Per scenario and weight layer: fans, Var(w), measured and predicted pre-activation variance."""
    fp = data.first_pass
    if fp.empty or "index" not in fp:
        return []
    rows = []
    for sc in data.scenarios:
        d = fp[fp["scenario"] == sc]
        for idx in sorted(d["index"].unique()):
            e = d[d["index"] == idx]
            meas = Stat.of(_col(e, "pre_var").astype(float))
            pred = Stat.of(_col(e, "predicted_pre_var").astype(float))
            rows.append({
                "scenario": sc, "index": int(idx), "layer": str(e["layer"].iloc[0]) if "layer" in e else str(idx),
                "activation": str(e["activation"].iloc[0]) if "activation" in e else "",
                "fan_in": int(e["fan_in"].iloc[0]) if "fan_in" in e and np.isfinite(float(e["fan_in"].iloc[0])) else None,
                "weight_var": Stat.of(_col(e, "weight_var").astype(float)),
                "input_sq_mean": Stat.of(_col(e, "input_sq_mean").astype(float)),
                "pre_var": meas, "predicted_pre_var": pred,
                "ratio": (meas.mean / pred.mean) if pred.n and pred.mean > 0 and meas.n else math.nan,
                "post_mean": Stat.of(_col(e, "post_mean").astype(float)),
                "saturated": Stat.of(_col(e, "saturated_frac").astype(float)),
                "dead": Stat.of(_col(e, "dead_frac").astype(float)),
            })
    return rows


# ----------------------------------------------------------------------------- HTML


_CSS = """
:root { --fg: #1d2433; --muted: #5b6475; --line: #d9dee7; --bg: #ffffff; --band: #f5f7fa; --accent: #2457c5; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
p.lead { color: var(--muted); margin: 0 0 12px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 10px 0; font-size: 14px; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; }
code, pre { font: 13px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: var(--band); padding: 10px 12px; border-radius: 6px; overflow-x: auto; }
ul.findings { padding-left: 0; list-style: none; }
ul.findings li { margin: 0 0 10px; padding: 8px 12px; background: var(--band); border-left: 4px solid var(--accent);
                 border-radius: 4px; }
ul.findings .topic { display: inline-block; min-width: 86px; font-size: 12px; text-transform: uppercase;
                     letter-spacing: .04em; color: var(--muted); }
table { border-collapse: collapse; width: 100%; margin: 8px 0 4px; font-size: 14px; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--band); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:hover td { background: #fafbfd; }
p.note { color: var(--muted); font-size: 13px; margin: 4px 0 0; }
figure { margin: 18px 0 26px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
details summary { cursor: pointer; color: var(--accent); }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""

# Records image status and script errors in #render-status once the page has loaded.
_STATUS_JS = """
(function () {
  var errors = [];
  window.addEventListener('error', function (e) {
    var t = e.target;
    errors.push(t && t.tagName ? ('failed to load ' + t.tagName.toLowerCase() + ' ' + (t.alt || '')) : String(e.message));
  }, true);
  window.addEventListener('load', function () {
    var images = [];
    for (var i = 0; i < document.images.length; i++) {
      var im = document.images[i];
      images.push({alt: im.alt, complete: im.complete, naturalWidth: im.naturalWidth, naturalHeight: im.naturalHeight});
    }
    var el = document.getElementById('render-status');
    el.textContent = JSON.stringify({loaded: true, images: images, errors: errors});
    el.setAttribute('data-loaded', 'true');
  });
})();
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def render_html(data: RunData, figures: Mapping[str, Path], found: Sequence[Finding]) -> str:
    """The report page as a string (see the module docstring)."""
    from . import plots

    n_members = int(data.metrics.groupby(["scenario", "seed"]).ngroups) if not data.metrics.empty else 0
    steps = int(data.metrics["step"].max()) if not data.metrics.empty else 0
    status = data.meta.get("status", "")
    tr = data.train
    meta_items = [
        ("Scenarios", f"{len(data.scenarios)} ({', '.join(data.scenarios)})"),
        ("Members", f"{n_members} (scenario \u00d7 seed)" + (f", seeds {', '.join(str(s) for s in tr.get('seeds', []))}" if tr.get("seeds") else "")),
        ("Training", (f"{tr.get('optimizer', '?')} lr {tr.get('lr', '?')}, batch {tr.get('batch_size', '?')}, "
                      f"{steps} steps, logged every {tr.get('log_every', '?')}") if tr else f"{steps} steps"),
    ]
    if status:
        meta_items.append(("Status", str(status)))
    if data.meta.get("wall_s"):
        meta_items.append(("Training time", f"{float(data.meta['wall_s']):.1f} s"))
    out: list[str] = []
    out.append("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
               "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
               f"<title>initlab report: {_e(data.name)}</title>\n<style>{_CSS}</style>\n"
               f"<script>{_STATUS_JS}</script>\n</head>\n<body>\n<main>\n")
    out.append(f"<h1>initlab report: {_e(data.name)}</h1>\n")
    if data.description:
        out.append(f"<p class=\"lead\">{_e(data.description)}</p>\n")
    if status and status != "complete":
        out.append("<p class=\"note\"><strong>This run is not complete</strong>: the tables show the finished members only. "
                   "Re-run the same command to finish it.</p>\n")
    out.append("<dl class=\"meta\">" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in meta_items) + "</dl>\n")

    out.append("<h2>Findings</h2>\n<ul class=\"findings\">\n")
    for f in found:
        out.append(f"<li><span class=\"topic\">{_e(f.topic)}</span> {_e(f.text)}</li>\n")
    if not found:
        out.append("<li>No finding: the run has too little data.</li>\n")
    out.append("</ul>\n")

    out.append("<h2>Summary</h2>\n<table>\n<thead><tr><th>Scenario</th><th>Activation</th><th>Scheme</th>"
               "<th class=\"num\">Seeds</th><th class=\"num\">Final train accuracy</th><th class=\"num\">Final test accuracy</th>"
               "<th class=\"num\">Final test loss</th><th class=\"num\">Layer-1 saturated</th><th class=\"num\">Layer-1 dead</th>"
               "</tr></thead>\n<tbody>\n")
    def frac(s: Stat) -> str:
        return f"{100 * s.mean:.0f}%" if s.n else "\u2013"

    for r in summary_rows(data):
        n_note = "" if r["test_acc"].n == r["test_acc"].n_total else f" ({r['test_acc'].n_total - r['test_acc'].n} diverged)"
        out.append(f"<tr><td>{_e(r['scenario'])}</td><td>{_e(r['activation'])}</td><td>{_e(r['scheme'])}</td>"
                   f"<td class=\"num\">{r['seeds']}{_e(n_note)}</td><td class=\"num\">{_e(_pct(r['train_acc']))}</td>"
                   f"<td class=\"num\">{_e(_pct(r['test_acc']))}</td><td class=\"num\">{_e(_ms(r['test_loss']))}</td>"
                   f"<td class=\"num\">{frac(r['saturated'])}</td><td class=\"num\">{frac(r['dead'])}</td></tr>\n")
    out.append("</tbody>\n</table>\n<p class=\"note\">Mean \u00b1 standard deviation over seeds. Train accuracy: mean over the "
               "minibatches of the last logging interval; test accuracy: the whole held-out split after the last step. "
               "Saturated: fraction of layer-1 unit outputs (first-pass batch) where the activation's slope is below 10% of "
               "its peak; dead: fraction of layer-1 units that output zero for every sample.</p>\n")

    fp_rows = first_pass_rows(data)
    if fp_rows:
        out.append("<h2>First pass: variance per layer</h2>\n<table>\n<thead><tr><th>Scenario</th><th>Layer (module)</th>"
                   "<th>Activation</th><th class=\"num\">fan_in</th><th class=\"num\">Var(w)</th>"
                   "<th class=\"num\">E[input\u00b2]</th><th class=\"num\">Var(Wx) measured</th>"
                   "<th class=\"num\">Var(Wx) predicted</th><th class=\"num\">measured / predicted</th>"
                   "<th class=\"num\">output mean</th></tr></thead>\n<tbody>\n")
        for r in fp_rows:
            out.append(f"<tr><td>{_e(r['scenario'])}</td><td>{r['index']} ({_e(r['layer'])})</td><td>{_e(r['activation'])}</td>"
                       f"<td class=\"num\">{r['fan_in'] if r['fan_in'] is not None else 'n/a'}</td>"
                       f"<td class=\"num\">{_e(_g(r['weight_var'].mean))}</td>"
                       f"<td class=\"num\">{_e(_g(r['input_sq_mean'].mean))}</td>"
                       f"<td class=\"num\">{_e(_ms(r['pre_var']))}</td><td class=\"num\">{_e(_ms(r['predicted_pre_var']))}</td>"
                       f"<td class=\"num\">{_e(_g(r['ratio']))}</td><td class=\"num\">{_e(_g(r['post_mean'].mean))}</td></tr>\n")
        out.append("</tbody>\n</table>\n<p class=\"note\">Var(Wx) is the pre-activation variance without bias on each "
                   "member's first-pass batch (mean \u00b1 std over seeds). Predicted: the variance recursion of "
                   "initlab.theory, Var(W\u2081x) = fan_in\u00b7Var(w)\u00b7E[x\u00b2] and then "
                   "Var(W\u2097h) = fan_in\u00b7Var(w)\u00b7E[\u03c6(z)\u00b2] for Gaussian z of the previous layer's "
                   "variance. Full table with all columns: first_pass.csv.</p>\n")

    if figures:
        out.append("<h2>Figures</h2>\n")
        for name, path in figures.items():
            caption = plots.FIGURES.get(name, name)
            out.append(f"<figure>{_img_tag(Path(path), caption)}<figcaption>{_e(caption)} "
                       f"(<code>figures/{_e(name)}</code>)</figcaption></figure>\n")

    out.append("<h2>Files and TensorBoard</h2>\n<p>This directory holds <code>config.toml</code> (the resolved "
               "configuration), <code>metrics.csv</code> (scenario, seed, step, split, metric, value), "
               "<code>first_pass.csv</code> (the probe table per scenario, seed and layer), <code>figures/</code> and "
               "TensorBoard logs, one run per scenario and seed:</p>\n"
               f"<pre>tensorboard --logdir {_e(os.path.join(str(data.run_dir), 'tb'))}</pre>\n"
               "<p>Regenerate this page from the CSV files with:</p>\n"
               f"<pre>initlab report {_e(str(data.run_dir))}</pre>\n"
               "<details><summary>Resolved configuration (config.toml)</summary>\n"
               f"<pre>{_e(data.config_text)}</pre></details>\n")
    out.append(f"<footer>Generated by initlab on {_e(time.strftime('%Y-%m-%d %H:%M:%S'))}."
               " Schemes: Glorot &amp; Bengio (2010), He et al. (2015), LeCun et al. (1998).</footer>\n"
               "<pre id=\"render-status\" hidden></pre>\n</main>\n</body>\n</html>\n")
    return "".join(out)


def write_report(run_dir: str | os.PathLike[str], *, figures: bool = True) -> Path:
    """(Re)build ``figures/*.png`` and ``report.html`` of ``run_dir`` from its files; return the report's path.

    With ``figures=False`` the existing PNGs are embedded as they are (none are redrawn).
    """
    from . import plots

    data = load_run(run_dir)
    fig_dir = data.run_dir / "figures"
    if figures:
        figs = plots.make_figures(data.metrics, data.first_pass, data.values, data.scenarios, fig_dir, info=data.info,
                                  models=data.models)
    else:
        figs = {name: fig_dir / name for name in plots.FIGURES if (fig_dir / name).is_file()}
    text = render_html(data, figs, findings(data))
    return atomic_write_text(data.run_dir / "report.html", text)
