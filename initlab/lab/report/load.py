"""Everything the report needs, read back from a run directory's files (:func:`load_run`).

pandas is imported inside the functions.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._errors import InitlabError
from .._io import slug
from ..config import read_toml
from ..metrics import METRICS_COLUMNS
from ..rundir import FIRST_PASS_LEAD, read_part_values, read_run_meta
from ..training.records import HIST_COLUMNS, INIT_COLUMNS

#: what to do about a corrupt merged CSV file
_REBUILD = "re-run the same `initlab run` command to rebuild it from parts/"

if TYPE_CHECKING:  # pragma: no cover
    import pandas

__all__ = ["RunData", "load_run"]


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
    init: pandas.DataFrame | None = None  # init.csv (the init reports' per-layer numbers), when the run has it
    layer_histograms: pandas.DataFrame | None = None  # layer_histograms.csv, when the run has it


def _read_config(run_dir: Path) -> tuple[str, dict[str, Any]]:
    """(text, parsed) of ``config.toml``; errors when the directory is not a run directory."""
    if run_dir.exists() and not run_dir.is_dir():
        raise InitlabError(f"{str(run_dir)!r} is not a directory: give the run directory written by `initlab run`")
    if not run_dir.is_dir():
        raise InitlabError(f"run directory {str(run_dir)!r} does not exist")
    cfg_path = run_dir / "config.toml"
    if not cfg_path.is_file():
        raise InitlabError(f"{str(run_dir)!r} is not an initlab run directory: it has no config.toml")
    fix = (f"re-run `initlab run` with the same experiment and --out {str(run_dir)!r} to write it again, "
           "or restore it")
    try:
        text = cfg_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InitlabError(f"{cfg_path}: not UTF-8 text (byte {e.start}); {fix}") from None
    try:
        return text, read_toml(text, str(cfg_path))
    except InitlabError as e:
        raise InitlabError(f"not valid TOML: {e}; {fix}") from None


def _read_csv(path: Path) -> pandas.DataFrame:
    import pandas as pd

    try:
        return pd.read_csv(path)
    except Exception as e:  # pandas' parser errors and friends
        raise InitlabError(f"{path}: cannot be read as CSV ({e}); {_REBUILD}") from None


def _read_metrics(run_dir: Path) -> pandas.DataFrame:
    import pandas as pd

    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise InitlabError(f"{str(run_dir)!r} has no metrics.csv yet: no unit of the run has finished; "
                           f"run `initlab run {run_dir / 'config.toml'}` --out {run_dir} first")
    metrics = _read_csv(path)
    missing = [c for c in METRICS_COLUMNS if c not in metrics.columns]
    if missing:
        raise InitlabError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(METRICS_COLUMNS)}; "
                           f"{_REBUILD}")
    for column, numbers in (("seed", "integers"), ("step", "integers"), ("value", "numbers")):
        kind = metrics[column].dtype.kind
        if kind == "i" or (kind == "f" and numbers == "numbers"):  # parsed as numbers already: nothing to check
            metrics[column] = metrics[column].astype("int64" if numbers == "integers" else float)
            continue
        text = metrics[column].map(str).astype(object).str.strip()  # NaN -> "nan", whatever the dtype
        parsed = pd.to_numeric(text, errors="coerce")
        bad = parsed.isna() & ~text.str.lower().isin(["nan", "", "<na>", "none"] if column == "value" else [])
        if numbers == "integers":
            bad |= ~bad & parsed.notna() & (parsed != parsed.round())
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise InitlabError(f"{path}, row {i + 2}: column {column!r} holds {text.iloc[i]!r}, expected {numbers}; "
                               f"{_REBUILD}")
        metrics[column] = parsed.astype("int64") if numbers == "integers" else parsed.astype(float)
    metrics["scenario"] = metrics["scenario"].astype(str)
    return metrics


def _read_first_pass(run_dir: Path) -> pandas.DataFrame:
    import pandas as pd

    path = run_dir / "first_pass.csv"
    if not (path.is_file() and path.stat().st_size):
        return pd.DataFrame()
    first_pass = _read_csv(path)
    missing = [c for c in FIRST_PASS_LEAD + ("index",) if c not in first_pass.columns]
    if missing:
        raise InitlabError(f"{path}: missing column(s) {', '.join(missing)}; {_REBUILD}")
    if "scenario" in first_pass:
        first_pass["scenario"] = first_pass["scenario"].astype(str)
    return first_pass


def _read_optional(run_dir: Path, name: str, columns: tuple[str, ...],
                   text: tuple[str, ...] = ("scenario",)) -> pandas.DataFrame | None:
    """``name`` (init.csv, layer_histograms.csv) as a frame, None when the run has no such file."""
    path = run_dir / name
    if not (path.is_file() and path.stat().st_size):
        return None
    frame = _read_csv(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InitlabError(f"{path}: missing column(s) {', '.join(missing)}; {_REBUILD}")
    for c in text:  # names that look like numbers (a Sequential's layer "0") stay names
        frame[c] = frame[c].astype(str)
    return frame


def _scenarios(cfg: dict[str, Any], in_csv: list[str]
               ) -> tuple[list[str], dict[str, tuple[str, str]], dict[str, tuple[int, ...]]]:
    """Scenario order, (activation, scheme) and widths from the resolved config, else from the CSVs."""
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
    present, seen = set(in_csv), set(scenarios)
    return [s for s in scenarios if s in present] + [s for s in in_csv if s not in seen], info, models


def _read_values(run_dir: Path, metrics: pandas.DataFrame, scenarios: list[str]
                 ) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """The first-pass arrays of every member (``parts/<scenario>/seed<k>/values.npz``) that has them."""
    values: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    parts = run_dir / "parts"
    if not parts.is_dir():
        return values
    seeds_of: dict[str, set[int]] = {}
    for _, r in metrics[["scenario", "seed"]].drop_duplicates().iterrows():
        seeds_of.setdefault(str(r["scenario"]), set()).add(int(r["seed"]))
    for sc in scenarios:
        for seed in sorted(seeds_of.get(sc, ())):
            part = parts / slug(sc) / f"seed{seed}"
            if (part / "values.npz").is_file():
                values[(sc, seed)] = read_part_values(part)
    return values


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read a run directory written by :func:`initlab.lab.run.run_experiment`.

    Needs ``config.toml`` and ``metrics.csv``; ``first_pass.csv``, ``init.csv``, ``layer_histograms.csv``,
    ``run.json`` and the first-pass arrays (``parts/<scenario>/seed<k>/values.npz``) are used when present. Raises
    :class:`InitlabError` when the directory is not a run directory or a file cannot be read.
    """
    run_dir = Path(run_dir)
    config_text, cfg = _read_config(run_dir)
    metrics = _read_metrics(run_dir)
    first_pass = _read_first_pass(run_dir)
    meta = read_run_meta(run_dir)
    fp_scenarios = list(first_pass["scenario"]) if "scenario" in first_pass else []
    scenarios, info, models = _scenarios(cfg, list(dict.fromkeys(list(metrics["scenario"]) + fp_scenarios)))
    values = _read_values(run_dir, metrics, scenarios)
    train = cfg.get("train", {}) if isinstance(cfg.get("train"), dict) else {}
    return RunData(run_dir=run_dir, name=str(cfg.get("name", run_dir.name)), description=str(cfg.get("description", "")),
                   config_text=config_text, metrics=metrics, first_pass=first_pass, values=values,
                   scenarios=scenarios, info=info, models=models, meta=meta, train=train,
                   init=_read_optional(run_dir, "init.csv", INIT_COLUMNS, ("scenario", "source", "layer", "quantity")),
                   layer_histograms=_read_optional(run_dir, "layer_histograms.csv", HIST_COLUMNS))
