"""The findings of the report: statements computed from the numbers of a run (nothing hard-coded).

The input statistics and why the layer-1 pre-activation variance is ``fan_in Var(w) E[x^2]``
rather than ``fan_in Var(w) Var(x)`` (for independent w and x with E[w] = 0,
Var(wx) = E[w^2] E[x^2]; LeCun et al. 1998, Glorot & Bengio 2010), saturation of bounded units,
dead ReLU units, how the variance changes with depth, agreement of the variance recursion with
the measurement, the ordering of the schemes per activation by the headline metric (accuracy),
where ``>`` is written only when the difference of the seed means exceeds twice its standard
error, members whose first pass overflowed, and divergent members.

Each is an :class:`initlab._audit.Finding` (the library's type) with severity "info", no layer,
the statement as ``message`` and the topic as ``code``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from ..._audit import Finding
from ..._probe import SATURATION_LEVEL
from ..metrics import headline
from .labels import comparison_groups, label, names
from .load import RunData
from .stats import Stat, col, final_values, layer_rows, mean_sd, num, pct, per_seed

if TYPE_CHECKING:  # pragma: no cover
    import pandas

__all__ = ["Finding", "findings", "accuracy_ordering"]


def _finding(topic: str, text: str) -> Finding:
    return Finding(severity="info", layer=None, message=text, fix="", code=topic)


def _input_findings(data: RunData) -> list[Finding]:
    l1 = layer_rows(data.first_pass, 1)
    if l1.empty or not {"input_mean", "pre_var", "weight_var", "fan_in"} <= set(l1.columns):
        return []
    in_mean = col(l1, "input_mean").astype(float)
    # Var(x) and E[x^2] of the batch: from the probe's layer-1 input columns
    in_var = col(l1, "input_var").astype(float)
    in_sq = col(l1, "input_sq_mean").astype(float)
    in_sq = in_sq.where(np.isfinite(in_sq), in_var + in_mean ** 2)
    # when both columns exist, the probe's layer-1 input_var could have been replaced by the
    # batch variance (same value for layer 1); recompute E[x^2] - mean^2 for consistency
    in_var = in_sq - in_mean ** 2
    out: list[Finding] = []
    seeds = per_seed(l1.assign(_m=in_mean, _v=in_var, _s=in_sq), ["_m", "_v", "_s"])
    sm, sv, ss = Stat.of(seeds["_m"]), Stat.of(seeds["_v"]), Stat.of(seeds["_s"])
    if sv.n == 0:
        return out
    batch = data.train.get("first_pass_batch")
    bdesc = f"{batch} training images" if batch else "training images"
    out.append(_finding("input", (
        f"Input (first-pass batch{'es' if sv.n > 1 else ''} of {bdesc}, {sv.n} seed{'s' if sv.n > 1 else ''}): "
        f"mean pixel value {num(sm.mean)}, "
        f"Var(x) = {num(sv.mean)}, E[x\u00b2] = {num(ss.mean)}."
        + (" The pixels are not zero-mean, so E[x\u00b2] = Var(x) + E[x]\u00b2 exceeds Var(x) by a factor "
           f"{num(ss.mean / sv.mean)}." if sv.mean > 0 and ss.mean / sv.mean > 1.02 else "")
    )))
    return out + _variance_finding(data, l1.assign(_sq=in_sq, _var=in_var))


def _variance_finding(data: RunData, l1: pandas.DataFrame) -> list[Finding]:
    """The layer-1 variance law, shown on the scenarios with the largest weight variance (N(0,1)):
    measured against fan_in Var(w) E[x^2] and fan_in Var(w) Var(x)."""
    wv = col(l1, "weight_var").astype(float)
    if not np.isfinite(wv).any():
        return []
    chosen_schemes = [s for s in ("normal",) if any(data.info.get(sc, ("", ""))[1] == s for sc in l1["scenario"])]
    if chosen_schemes:
        pick = l1[[data.info.get(sc, ("", ""))[1] in chosen_schemes for sc in l1["scenario"]]]
    else:
        pick = l1[wv >= np.nanmax(wv) * 0.5]
    pick = pick[np.isfinite(pick["pre_var"].astype(float))]
    if pick.empty:
        return []
    fan_in = float(pick["fan_in"].astype(float).median())
    pick = pick.assign(_psq=pick["fan_in"].astype(float) * pick["weight_var"].astype(float) * pick["_sq"].astype(float),
                       _pvar=pick["fan_in"].astype(float) * pick["weight_var"].astype(float) * pick["_var"].astype(float))
    ps = per_seed(pick, ["weight_var", "pre_var", "_sq", "_var", "_psq", "_pvar"]).astype(float)
    w = Stat.of(ps["weight_var"])
    measured = Stat.of(ps["pre_var"])
    sq = Stat.of(ps["_sq"])
    var = Stat.of(ps["_var"])
    pred_sq = float(ps["_psq"].mean())
    pred_var = float(ps["_pvar"].mean())
    scen = names(list(dict.fromkeys(str(s) for s in pick["scenario"])), 5)
    wdesc = "N(0,1) weights" if chosen_schemes and abs(w.mean - 1) < 0.1 else f"weights of variance {num(w.mean)}"
    ndesc = f"mean \u00b1 std over {measured.n} seeds" if measured.n > 1 else "1 seed"
    head = (f"Layer-1 pre-activation variance with {wdesc} ({scen}; {ndesc}): measured {mean_sd(measured)}. "
            f"{int(fan_in)}\u00b7Var(w)\u00b7E[x\u00b2] = {int(fan_in)} \u00d7 {num(w.mean)} \u00d7 {num(sq.mean)} = {num(pred_sq)}; "
            f"{int(fan_in)}\u00b7Var(w)\u00b7Var(x) = {int(fan_in)} \u00d7 {num(w.mean)} \u00d7 {num(var.mean)} = {num(pred_var)}. ")
    return [_finding("variance", head + _which_rule(measured.mean, pred_sq, pred_var))]


def _which_rule(measured: float, pred_sq: float, pred_var: float) -> str:
    """Which prediction of the layer-1 variance the measurement matches, and why."""
    err_sq = abs(measured / pred_sq - 1) if pred_sq > 0 else math.inf
    err_var = abs(measured / pred_var - 1) if pred_var > 0 else math.inf
    if pred_sq > 0 and pred_var > 0 and abs(pred_sq / pred_var - 1) < 0.02:
        return "The input is (nearly) zero-mean here, so E[x\u00b2] \u2248 Var(x) and both rules agree."
    if err_sq < err_var:
        return (f"The measurement matches the E[x\u00b2] rule (off by {100 * err_sq:.1f}%), not the Var(x) rule "
                f"(off by {100 * err_var:.1f}%): the pixels are not zero-mean, and for independent w and x with "
                "E[w] = 0, Var(wx) = E[w\u00b2]E[x\u00b2] \u2212 (E[w]E[x])\u00b2 = Var(w)E[x\u00b2], not Var(w)Var(x).")
    return (f"Here the Var(x) rule is closer (off by {100 * err_var:.1f}% vs {100 * err_sq:.1f}%), "
            "which independent zero-mean weights do not explain: check the first-pass table.")


def _saturation_findings(data: RunData) -> list[Finding]:
    out: list[Finding] = []
    l1 = layer_rows(data.first_pass, 1)
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
        sat = Stat.of(col(d, "saturated_frac").astype(float))
        dead = Stat.of(col(d, "dead_frac").astype(float))
        pm = Stat.of(col(d, "post_mean").astype(float))
        ps = Stat.of(np.sqrt(col(d, "post_var").astype(float).clip(lower=0)))
        act = str(d["activation"].iloc[0]) if "activation" in d else ""
        if sat.n:
            text = (f"{100 * sat.mean:.0f}% of layer-1 unit outputs saturated "
                    f"({act}\u2032 below {100 * SATURATION_LEVEL:.0f}% of its peak); outputs mean {num(pm.mean)}, "
                    f"std {num(ps.mean)}.")
            if sat.mean >= 0.5:
                text += " Most units sit on the flat ends of the curve, where gradients vanish."
            elif sat.mean <= 0.05:
                text += " The units work in the curve's steep middle part."
            sat_groups.setdefault(text, []).append(label(sc, data.info))
        elif dead.n:
            later = data.first_pass[(data.first_pass["scenario"] == sc) & (data.first_pass["index"] > 1)]
            dead_all = Stat.of(col(later, "dead_frac").astype(float))
            any_dead = any_dead or dead.mean > 0 or (dead_all.n > 0 and dead_all.mean > 0)
            part = f"{100 * dead.mean:.0f}% in layer 1"
            if dead_all.n:
                part += f", {100 * dead_all.mean:.0f}% in later hidden layers"
            dead_groups.setdefault(part, []).append(label(sc, data.info))
            dead_names.append(label(sc, data.info))
    for text, members in sat_groups.items():
        out.append(_finding("saturation", f"{names(members, 5)}: {text}"))
    if dead_groups:
        if any_dead:
            out.append(_finding("dead units", "Dead units (zero output for every sample of the first-pass batch): "
                                             + "; ".join(f"{names(v, 5)}: {k}" for k, v in dead_groups.items()) + "."))
        else:
            out.append(_finding("dead units", "No dead unit at initialisation: every unit of every hidden layer is "
                                             "active for some sample of the first-pass batch ("
                                             + names(dead_names, 5) + ")."))
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
        shown = [num(x) for x in v]
        if len(shown) > 5:
            shown = shown[:2] + ["\u2026"] + shown[-1:]
        chain = " \u2192 ".join(shown)
        parts.append(f"{label(sc, data.info)} {chain} ({len(v)} layers, \u00d7{num(factor, 2)} per layer)")
    if not parts:
        return []
    return [_finding("depth", "Pre-activation variance from layer 1 to the readout (first pass, mean over seeds): "
                             + "; ".join(parts) + ".")]


def _recursion_finding(data: RunData) -> list[Finding]:
    fp = data.first_pass
    if fp.empty or "predicted_pre_sq_mean" not in fp or "pre_sq_mean" not in fp:
        return []
    d = fp[np.isfinite(fp["predicted_pre_sq_mean"].astype(float)) & np.isfinite(fp["pre_sq_mean"].astype(float))
           & (fp["predicted_pre_sq_mean"].astype(float) > 0)]
    if d.empty:
        return []
    g = d.groupby(["scenario", "index"], sort=False)[["pre_sq_mean", "predicted_pre_sq_mean"]].mean()
    ratio = g["pre_sq_mean"] / g["predicted_pre_sq_mean"]
    err = (np.log(ratio)).abs()
    worst = err.idxmax()
    r_worst = float(ratio.loc[worst])
    within = float(np.exp(err.max()) - 1)
    ok_first = g.index.get_level_values("index") == 1
    first_err = float(np.exp(err[ok_first].max()) - 1) if ok_first.any() else math.nan
    text = (f"The variance recursion (initlab.theory, fed with the batch's E[x\u00b2] and each layer's weight variance) "
            f"predicts the mean measured pre-activation second moment E[(Wx)\u00b2] of every layer of every scenario within a factor "
            f"{num(1 + within)}; the largest gap is {label(worst[0], data.info)}, layer {int(worst[1])} "
            f"(measured/predicted = {num(r_worst)}).")
    if math.isfinite(first_err):
        text += f" At layer 1, where the Gaussian assumption is not needed, the gap is at most {100 * first_err:.1f}%."
    if within > 0.5:
        text += (" Deeper layers deviate more: the recursion assumes Gaussian, independent pre-activations, "
                 "which a 100-sample batch and saturated or dead units only approximate.")
    return [_finding("theory", text)]


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
    parts = [f"{labels.get(items[0][0], items[0][0])} {pct(items[0][1])}"]
    for (_, a), (sc_b, b) in zip(items, items[1:]):
        diff = a.mean - b.mean
        if a.n >= 2 and b.n >= 2:
            se = math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n)
            sep = diff > 2 * se and diff > 0
        else:
            sep = diff > 0.01
        parts.append(("> " if sep else "\u2248 ") + f"{labels.get(sc_b, sc_b)} {pct(b)}")
    return " ".join(parts)


def _accuracy_findings(data: RunData) -> list[Finding]:
    """Per comparison group, the scenarios ordered by the final value of the headline metric."""
    out: list[Finding] = []
    metric = headline()
    finals = final_values(data.metrics, "test", metric.name)
    split = "test"
    if not finals:
        finals = final_values(data.metrics, "train", metric.name)
        split = "train"
    if not finals:
        return out
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
        out.append(_finding("accuracy", f"{act}, final {split} {metric.label} after {step} steps: {chain} ({ndesc}; {rule})."))
    return out


def _divergence_findings(data: RunData) -> list[Finding]:
    div = data.meta.get("diverged") or []
    if not div:
        return []
    items = ", ".join(f"{d.get('scenario')} seed {d.get('seed')} (step {d.get('step')})" for d in div)
    return [_finding("divergence", f"Diverged (loss became NaN/inf; excluded from means): {items}.")]


def _first_overflow(d: pandas.DataFrame) -> int | None:
    """The first weight layer (numbered from 1) of one member whose first-pass statistics are not finite."""
    stats = [c for c in ("pre_var", "post_var") if c in d]
    if not stats or "index" not in d:
        return None
    bad = ~np.isfinite(d[stats].astype(float).to_numpy()).all(axis=1)
    return int(d["index"][bad].min()) if bad.any() else None


def _overflow_findings(data: RunData) -> list[Finding]:
    """Members whose first pass overflowed float32 (a non-finite variance): which layer, and the loss they start from."""
    fp = data.first_pass
    if fp.empty or "scenario" not in fp or "seed" not in fp:
        return []
    items = []
    start = data.metrics[(data.metrics["step"] == 0) & (data.metrics["split"] == "test")
                         & (data.metrics["metric"] == "loss")] if not data.metrics.empty else data.metrics
    for (sc, seed), d in fp.groupby(["scenario", "seed"], sort=False):
        layer = _first_overflow(d)
        if layer is None:
            continue
        n_layers = int(d["index"].max())
        text = f"{label(str(sc), data.info)} seed {int(seed)} from layer {layer} of {n_layers}"
        loss = start[(start["scenario"] == sc) & (start["seed"] == seed)]["value"] if not start.empty else []
        if len(loss):
            text += f" (initial test loss {num(float(loss.iloc[0]))})"
        items.append(text)
    if not items:
        return []
    return [_finding("overflow", "Overflowed at initialisation (first-pass activations beyond float32's range, "
                                 "variance not finite; such a network cannot learn): " + "; ".join(items) + ".")]


def findings(data: RunData) -> list[Finding]:
    """Every finding of the report, computed from ``data`` (see the module docstring)."""
    return (_input_findings(data) + _saturation_findings(data) + _depth_finding(data) + _recursion_finding(data)
            + _accuracy_findings(data) + _overflow_findings(data) + _divergence_findings(data))
