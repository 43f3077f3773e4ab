"""Claims as data: each preset's ``[[claims]]`` (:class:`~initlab.lab.specs.Claim`) measured on a finished run,
judged with a test across seeds, and written as ``claims.csv``.

A claim names a **quantity**: a registered function ``fn(data, **args)`` that reads the run
(``data.metrics``: metrics.csv as a DataFrame, ``data.first_pass``: first_pass.csv, ``data.init``:
init.csv, the init report's per-layer numbers) and returns
one value per seed (``{seed: value}``). A new quantity is one :func:`register_quantity` call; the
built-in ones are generic (a metric's final value or its value at a step, a first-pass column at a
layer, its ratio between layers or scenarios, its per-layer factor, the least-squares slope of its
log2 over layers, its mean and spread over layers, the largest init-report number over layers).

The verdict (:func:`judge`) compares the seeds' values, on the claim's ``scale`` (the value, or
its log2 / log10), with the expected region: ``approx`` is ``[value - tolerance, value +
tolerance]``, ``above`` is ``x > value``, ``below`` is ``x < value``.

* ``t95``: the 95% Student-t confidence interval of the mean over the n seeds,
  ``mean +- t(0.975, n - 1) * sd / sqrt(n)``: inside the region -> **reproduced**, disjoint from it ->
  **not reproduced**, overlapping its edge (or n < 2) -> **inconclusive**;
* ``every_seed`` (for claims that hold exactly per seed): every seed inside -> reproduced, every
  seed outside -> not reproduced, else inconclusive.

A quantity that cannot be measured (a scenario or column the run does not have, every value
NaN) gives an inconclusive row that says why, never a crash of the report.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import InitlabError
from .specs import Claim

__all__ = ["Quantity", "register_quantity", "unregister_quantity", "quantities", "measure", "judge",
           "evaluate_claims", "claims_csv", "CLAIMS_COLUMNS", "VERDICTS", "t_quantile"]

#: the columns of claims.csv
CLAIMS_COLUMNS = ("claim_id", "source", "claim", "quantity", "expected", "measured", "verdict", "test")
VERDICTS = ("reproduced", "not reproduced", "inconclusive")

# two-sided 95% quantiles t(0.975, df) of Student's t, df = 1..30 (then the normal's 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: int) -> float:
    """t(0.975, df): the half-width of a two-sided 95% interval in standard errors."""
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Quantity:
    """A claim quantity: ``fn(data, **args) -> {seed: value}`` and what it measures, in one line."""

    name: str
    fn: Callable[..., Mapping[int, float]]
    doc: str


_QUANTITIES: dict[str, Quantity] = {}


def register_quantity(name: str, fn: Callable[..., Mapping[int, float]], doc: str = "") -> Quantity:
    """Register ``fn`` as the claim quantity ``name`` (new names only); returns the entry."""
    if not isinstance(name, str) or not name or name in _QUANTITIES or not callable(fn):
        raise InitlabError(f"register_quantity: expected a new name and a function, got {name!r} "
                           f"(registered: {', '.join(_QUANTITIES)})")
    entry = Quantity(name, fn, doc or ((fn.__doc__ or "").strip().splitlines() or [""])[0])
    _QUANTITIES[name] = entry
    return entry


def unregister_quantity(name: str) -> None:
    """Remove the quantity ``name`` (nothing happens when it is not registered)."""
    _QUANTITIES.pop(name, None)


def quantities() -> dict[str, str]:
    """``{name: one-line description}`` of every registered quantity."""
    return {q.name: q.doc for q in _QUANTITIES.values()}


# ----------------------------------------------------------------------------- reading the run


def _need(frame: Any, what: str, **match: Any) -> Any:
    """The rows of ``frame`` matching every ``column=value``; an InitlabError naming what is missing."""
    if frame is None or frame.empty:
        raise InitlabError(f"the run has no {what}")
    rows = frame
    for key, value in match.items():
        if key not in rows:
            raise InitlabError(f"{what} has no column {key!r}")
        rows = rows[rows[key] == value]
        if rows.empty:
            raise InitlabError(f"{what} has no row with {key} = {value!r}")
    return rows


def _per_seed(rows: Any, column: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in zip(rows["seed"], rows[column])}


def _layer_index(fp: Any, layer: int) -> int:
    """A first-pass layer index: 1, 2, ... from the input, or -1, -2, ... from the readout."""
    indices = sorted(int(i) for i in fp["index"].unique())
    if layer < 0:
        if -layer > len(indices):
            raise InitlabError(f"layer {layer}: the model has {len(indices)} weight layers")
        return indices[layer]
    return int(layer)


def _fp_column(data: Any, scenario: str, column: str, layer: int) -> dict[int, float]:
    fp = _need(data.first_pass, "first_pass.csv", scenario=scenario)
    if column not in fp:
        raise InitlabError(f"first_pass.csv has no column {column!r}")
    return _per_seed(_need(fp, f"first_pass.csv of {scenario!r}", index=_layer_index(fp, int(layer))), column)


def _ratio(a: Mapping[int, float], b: Mapping[int, float]) -> dict[int, float]:
    with np.errstate(all="ignore"):
        return {s: float(np.float64(a[s]) / np.float64(b[s])) for s in sorted(set(a) & set(b))}


def _layers(fp: Any, first: int, last: int) -> list[int]:
    lo, hi = _layer_index(fp, int(first)), _layer_index(fp, int(last))
    return [int(i) for i in sorted(fp["index"].unique()) if lo <= int(i) <= hi]


def _over_layers(data: Any, scenario: str, column: str, first: int, last: int,
                 reduce: Callable[[np.ndarray], float]) -> dict[int, float]:
    fp = _need(data.first_pass, "first_pass.csv", scenario=scenario)
    if column not in fp:
        raise InitlabError(f"first_pass.csv has no column {column!r}")
    out = {}
    for seed, d in fp.groupby("seed"):
        d = d[d["index"].isin(_layers(fp, first, last))].sort_values("index")
        out[int(seed)] = reduce(d[column].to_numpy(dtype=np.float64))
    return out


# ----------------------------------------------------------------------------- built-in quantities


def _metric_rows(data: Any, scenario: str, metric: str, split: str) -> Any:
    return _need(data.metrics, "metrics.csv", scenario=scenario, metric=metric, split=split)


def q_final(data: Any, scenario: str, metric: str = "acc", split: str = "test") -> dict[int, float]:
    """A metric's value at the last log step (default: the final test accuracy)."""
    rows = _metric_rows(data, scenario, metric, split)
    last = rows.sort_values("step").groupby("seed").tail(1)
    return _per_seed(last, "value")


def q_at_step(data: Any, scenario: str, step: int, metric: str = "acc", split: str = "test") -> dict[int, float]:
    """A metric's value at the last log step at or before ``step``."""
    rows = _metric_rows(data, scenario, metric, split)
    rows = rows[rows["step"] <= int(step)]
    if rows.empty:
        raise InitlabError(f"metrics.csv has no {metric} row of {scenario!r} at or before step {step}")
    return _per_seed(rows.sort_values("step").groupby("seed").tail(1), "value")


def q_final_difference(data: Any, scenario: str, other: str, metric: str = "acc",
                       split: str = "test") -> dict[int, float]:
    """Final value of ``scenario`` minus that of ``other``, seed by seed."""
    a, b = q_final(data, scenario, metric, split), q_final(data, other, metric, split)
    return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}


def q_at_step_difference(data: Any, scenario: str, other: str, step: int, metric: str = "acc",
                         split: str = "test") -> dict[int, float]:
    """A metric at ``step`` (as :func:`q_at_step`) of ``scenario`` minus that of ``other``, seed by seed."""
    a, b = q_at_step(data, scenario, step, metric, split), q_at_step(data, other, step, metric, split)
    return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}


def q_first_pass(data: Any, scenario: str, column: str, layer: int = 1) -> dict[int, float]:
    """A first_pass.csv column at a weight layer (1 = first, -1 = the readout)."""
    return _fp_column(data, scenario, column, layer)


def q_first_pass_ratio(data: Any, scenario: str, column: str, layer: int = -1, over_layer: int | None = None,
                       over_scenario: str | None = None) -> dict[int, float]:
    """A first-pass column at ``layer`` divided by the same at ``over_layer`` (same scenario) or in
    ``over_scenario`` (same layer), seed by seed."""
    if (over_layer is None) == (over_scenario is None):
        raise InitlabError("first_pass_ratio: give exactly one of over_layer and over_scenario")
    num = _fp_column(data, scenario, column, layer)
    if over_scenario is not None:
        return _ratio(num, _fp_column(data, str(over_scenario), column, layer))
    return _ratio(num, _fp_column(data, scenario, column, int(over_layer)))  # type: ignore[arg-type]


def q_layer_factor(data: Any, scenario: str, column: str, first: int = 1, last: int = -2) -> dict[int, float]:
    """The mean factor per layer of a first-pass column, (v_last / v_first)^(1 / (last - first))."""
    def factor(v: np.ndarray) -> float:
        with np.errstate(all="ignore"):
            return float((v[-1] / v[0]) ** (1.0 / (len(v) - 1))) if len(v) >= 2 else math.nan
    return _over_layers(data, scenario, column, first, last, factor)


def q_first_pass_slope(data: Any, scenario: str, column: str, over_scenario: str | None = None, first: int = 1,
                       last: int = -1) -> dict[int, float]:
    """The least-squares slope over layers first..last of log2 of a first-pass column (of its ratio
    scenario / over_scenario, layer by layer, when ``over_scenario`` is given), seed by seed: the log2 factor
    per layer (-1: halves at every layer).

    Per seed, with y_l = log2(v_l) (or log2(v_l / u_l)) at the layer indices l: slope = sum (l - mean l)(y_l -
    mean y) / sum (l - mean l)^2. NaN when fewer than two layers have a finite, positive value."""
    num = _need(data.first_pass, "first_pass.csv", scenario=scenario)
    if column not in num:
        raise InitlabError(f"first_pass.csv has no column {column!r}")
    layers = _layers(num, first, last)
    den = None if over_scenario is None else _need(data.first_pass, "first_pass.csv", scenario=str(over_scenario))
    out = {}
    for seed, d in num.groupby("seed"):
        v = d[d["index"].isin(layers)].set_index("index")[column].astype(np.float64)
        if den is not None:
            u = den[(den["seed"] == seed) & den["index"].isin(layers)].set_index("index")[column].astype(np.float64)
            v = (v / u).dropna()
        with np.errstate(all="ignore"):
            y = np.where(v.to_numpy() > 0, np.log2(v.to_numpy()), np.nan)
        x = v.index.to_numpy(dtype=np.float64)
        ok = np.isfinite(y)
        x, y = x[ok], y[ok]
        out[int(seed)] = (float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
                          if x.size >= 2 else math.nan)
    return out


def q_layer_mean(data: Any, scenario: str, column: str, first: int = 1, last: int = -1) -> dict[int, float]:
    """The mean of a first-pass column over the layers first..last."""
    return _over_layers(data, scenario, column, first, last, lambda v: float(v.mean()) if v.size else math.nan)


def q_layer_spread(data: Any, scenario: str, column: str, first: int = 1, last: int = -1) -> dict[int, float]:
    """max / min of a first-pass column over the layers first..last (1 = the same at every layer)."""
    def spread(v: np.ndarray) -> float:
        with np.errstate(all="ignore"):
            return float(v.max() / v.min()) if v.size else math.nan
    return _over_layers(data, scenario, column, first, last, spread)


def q_layer_max_deviation(data: Any, scenario: str, column: str, target: float = 1.0, first: int = 1,
                          last: int = -2) -> dict[int, float]:
    """The largest relative deviation max_l |v_l / target - 1| of a first-pass column over the layers first..last."""
    def worst(v: np.ndarray) -> float:
        return float(np.abs(v / float(target) - 1.0).max()) if v.size else math.nan
    return _over_layers(data, scenario, column, first, last, worst)


def q_init_max(data: Any, scenario: str, quantity: str = "iterations", first: int = 1, last: int = -1,
               source: str | None = None) -> dict[int, float]:
    """The largest value over the layers first..last of an init-report number (init.csv), e.g. LSUV's
    iterations per layer (Mishkin & Matas 2016)."""
    frame = getattr(data, "init", None)
    rows = _need(frame, "init.csv (per-layer numbers of the init report)", scenario=scenario, quantity=quantity)
    if source is not None:
        rows = _need(rows, f"init.csv of {scenario!r}", source=source)
    layers = _layers(rows, first, last)
    rows = rows[rows["index"].isin(layers)]
    return {int(s): float(np.max(d["value"].to_numpy(dtype=np.float64))) for s, d in rows.groupby("seed")}


for _name, _fn in (("final", q_final), ("at_step", q_at_step), ("final_difference", q_final_difference),
                   ("at_step_difference", q_at_step_difference),
                   ("first_pass", q_first_pass), ("first_pass_ratio", q_first_pass_ratio),
                   ("first_pass_slope", q_first_pass_slope),
                   ("layer_factor", q_layer_factor), ("layer_mean", q_layer_mean), ("layer_spread", q_layer_spread),
                   ("layer_max_deviation", q_layer_max_deviation), ("init_max", q_init_max)):
    register_quantity(_name, _fn)


# ----------------------------------------------------------------------------- verdicts


def _on_scale(values: np.ndarray, scale: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        if scale == "log2":
            return np.where(values > 0, np.log2(values), np.nan)
        if scale == "log10":
            return np.where(values > 0, np.log10(values), np.nan)
    return values


def _region(claim: Claim) -> tuple[float, float]:
    if claim.expect == "approx":
        return claim.value - claim.tolerance, claim.value + claim.tolerance
    return (claim.value, math.inf) if claim.expect == "above" else (-math.inf, claim.value)


def expected_text(claim: Claim) -> str:
    """``log2(x) ≈ -30 ± 3``, ``x > 0.5``, ``x < 0.2``."""
    x = "x" if claim.scale == "linear" else f"{claim.scale}(x)"
    if claim.expect == "approx":
        return f"{x} \u2248 {claim.value:.4g} \u00b1 {claim.tolerance:.3g}"
    return f"{x} {'>' if claim.expect == 'above' else '<'} {claim.value:.4g}"


def _inside(lo: float, hi: float, region: tuple[float, float], strict: bool) -> bool:
    if strict:  # an open bound (above / below)
        return lo > region[0] if math.isinf(region[1]) else hi < region[1]
    return region[0] <= lo and hi <= region[1]


def _outside(lo: float, hi: float, region: tuple[float, float]) -> bool:
    return hi <= region[0] or lo >= region[1]


def judge(values: Sequence[float], claim: Claim) -> tuple[str, str, str]:
    """(verdict, measured, test) of ``values`` (one per seed) against ``claim`` (see the module docstring)."""
    raw = np.asarray(list(values), dtype=np.float64)
    x = _on_scale(raw, claim.scale)
    ok = x[np.isfinite(x)]
    n, n_all = int(ok.size), int(raw.size)
    dropped = f", {n_all - n} of {n_all} not finite" if n < n_all else ""
    region, strict = _region(claim), claim.expect != "approx"
    if claim.test == "every_seed":
        test = f"every seed ({n_all})"
        shown = ", ".join(f"{v:.4g}" for v in x)
        if n < n_all or n == 0:
            return "inconclusive", f"{shown}{dropped}", test
        inside = [_inside(v, v, region, strict) for v in ok]
        verdict = VERDICTS[0] if all(inside) else VERDICTS[1] if not any(inside) else VERDICTS[2]
        return verdict, shown, test
    if n < 2:
        shown = f"{ok[0]:.4g} (n=1{dropped})" if n else f"no finite value{dropped}"
        return "inconclusive", shown, "95% t-interval of the mean over seeds: needs at least 2 seeds"
    mean, sd = float(ok.mean()), float(ok.std(ddof=1))
    t = t_quantile(n - 1)
    lo, hi = mean - t * sd / math.sqrt(n), mean + t * sd / math.sqrt(n)
    measured = f"{mean:.4g} \u00b1 {sd:.2g} (95% CI {lo:.4g} to {hi:.4g}, n={n}{dropped})"
    test = f"95% t-interval of the mean over {n} seeds (t={t:.3g})"
    if _inside(lo, hi, region, strict):
        return VERDICTS[0], measured, test
    if _outside(lo, hi, region):
        return VERDICTS[1], measured, test
    return VERDICTS[2], measured, test


def measure(claim: Claim, data: Any) -> dict[int, float]:
    """The claim's quantity on the run ``data``: ``{seed: value}``."""
    entry = _QUANTITIES.get(claim.quantity)
    if entry is None:
        raise InitlabError(f"unknown claim quantity {claim.quantity!r}; registered: {', '.join(_QUANTITIES)}")
    try:
        out = entry.fn(data, **dict(claim.args))
    except TypeError as e:
        raise InitlabError(f"quantity {claim.quantity!r} rejects the arguments {dict(claim.args)}: {e}") from None
    return {int(k): float(v) for k, v in dict(out).items()}


def evaluate_claims(claims: Sequence[Claim], data: Any) -> list[dict[str, str]]:
    """One claims.csv row per claim (see :data:`CLAIMS_COLUMNS`); a quantity that cannot be measured
    on this run gives an inconclusive row that says why."""
    rows = []
    for c in claims:
        base = {"claim_id": c.id, "source": c.source, "claim": c.claim, "quantity": c.quantity,
                "expected": expected_text(c)}
        try:
            values = measure(c, data)
        except InitlabError as e:
            rows.append({**base, "measured": f"not measurable: {e}", "verdict": "inconclusive", "test": c.test})
            continue
        verdict, measured, test = judge([values[s] for s in sorted(values)], c)
        rows.append({**base, "measured": measured, "verdict": verdict, "test": test})
    return rows


def claims_csv(rows: Sequence[Mapping[str, str]]) -> str:
    """claims.csv as text (the header, then one row per claim)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CLAIMS_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in CLAIMS_COLUMNS})
    return buf.getvalue()
