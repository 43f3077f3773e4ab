"""The report's tables as rows of numbers: the per-scenario summary and the first-pass table."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..metrics import SPLITS, display_order
from .load import RunData
from .stats import Stat, col, final_values, layer_rows

__all__ = ["summary_rows", "first_pass_rows", "summary_columns"]


def summary_columns() -> list[tuple[str, str]]:
    """(row key, header) of the summary table's metric columns: each metric's ``summary`` splits,
    the headline metric first (``("train_acc", "Final train accuracy")``, ...)."""
    return [(f"{split}_{m.name}", f"Final {split} {m.label}") for m in display_order() for split in m.summary]


def summary_rows(data: RunData) -> list[dict[str, Any]]:
    """Per scenario: activation, scheme, seeds, and the final value (:class:`Stat` over seeds) of every
    one-value metric of :mod:`initlab.lab.metrics` per split, keyed ``"<split>_<metric>"`` (``test_acc``),
    plus layer 1's saturated and dead fractions."""
    rows = []
    finals = {(split, m.name): final_values(data.metrics, split, m.name)
              for split in SPLITS for m in display_order()}
    seeds = data.metrics.groupby("scenario")["seed"].nunique().to_dict() if not data.metrics.empty else {}
    l1 = layer_rows(data.first_pass, 1)
    for sc in data.scenarios:
        act, scheme = data.info.get(sc, ("", ""))
        d1 = l1[l1["scenario"] == sc] if not l1.empty else l1
        row: dict[str, Any] = {"scenario": sc, "activation": act, "scheme": scheme, "seeds": int(seeds.get(sc, 0))}
        for (split, metric), f in finals.items():
            row[f"{split}_{metric}"] = Stat.of(list(f.get(sc, {}).values()))
        row["saturated"] = Stat.of(col(d1, "saturated_frac").astype(float))
        row["dead"] = Stat.of(col(d1, "dead_frac").astype(float))
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
            meas = Stat.of(col(e, "pre_sq_mean").astype(float))
            pred = Stat.of(col(e, "predicted_pre_sq_mean").astype(float))
            rows.append({
                "scenario": sc, "index": int(idx), "layer": str(e["layer"].iloc[0]) if "layer" in e else str(idx),
                "activation": str(e["activation"].iloc[0]) if "activation" in e else "",
                "fan_in": int(e["fan_in"].iloc[0]) if "fan_in" in e and np.isfinite(float(e["fan_in"].iloc[0])) else None,
                "weight_var": Stat.of(col(e, "weight_var").astype(float)),
                "input_sq_mean": Stat.of(col(e, "input_sq_mean").astype(float)),
                "pre_sq_mean": meas, "predicted_pre_sq_mean": pred,
                "ratio": (meas.mean / pred.mean) if pred.n and pred.mean > 0 and meas.n else math.nan,
                "post_mean": Stat.of(col(e, "post_mean").astype(float)),
                "saturated": Stat.of(col(e, "saturated_frac").astype(float)),
                "dead": Stat.of(col(e, "dead_frac").astype(float)),
            })
    return rows
