"""One trial of ``initlab tune``, run by a Ray Tune worker: the scenario with the sampled values,
every seed of the experiment trained at once (:func:`initlab.lab.training.run_group`), and at
each log step a report to Tune of the objective (so ASHA can stop the trial there) with a
checkpoint of the metric rows so far (so a stopped trial's curves reach the run directory).

The objective at a log step is the mean over seeds of the chosen metric at that step; a seed
that diverged counts as the worst value (``+inf`` for a metric to minimise, ``-inf`` for one
to maximise), so a trial with a diverged seed is never preferred over one without.
"""
from __future__ import annotations

import math
import os
import pickle
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..specs import Scenario, TrainSpec
from ..training import GroupSpec, Member, run_group
from .space import trial_scenario

__all__ = ["objective", "trainable", "ROWS_FILE", "TRIAL_SCENARIO"]

#: the file in a trial's checkpoint: a pickled dict (metrics rows, diverged rows, step)
ROWS_FILE = "rows.pkl"
#: the scenario name inside a trial (the driver renames it when it writes the run directory)
TRIAL_SCENARIO = "trial"
#: a test hook, off unless set: with this environment variable naming a folder, each trial writes a marker
#: file there (``trial-1``, ``trial-2``, ... in the order they start) before it trains, and every trial
#: but the first then waits there until it is stopped, so a test can interrupt a search inside its
#: second trial when that trial's marker appears, however fast the trials train
HOLD_ENV = "INITLAB_TUNE_TEST_HOLD"


def objective(rows: Sequence[Mapping[str, Any]], step: int, metric: str, seeds: Sequence[int], mode: str) -> float:
    """Mean over ``seeds`` of ``metric`` (``<split>_<name>``) at ``step``; a missing or non-finite value
    (a diverged seed) counts as the worst value."""
    split, _, name = metric.partition("_")
    worst = math.inf if mode == "min" else -math.inf
    found = {int(r["seed"]): float(r["value"]) for r in rows
             if int(r["step"]) == step and r["split"] == split and r["metric"] == name}
    vals = [found.get(int(s), math.nan) for s in seeds]
    if any(not math.isfinite(v) for v in vals):
        return worst
    return sum(vals) / len(vals)


def _report(result: Mapping[str, Any], rows: dict[str, Any]) -> None:
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / ROWS_FILE).write_bytes(pickle.dumps(rows))
        tune.report(dict(result), checkpoint=tune.Checkpoint.from_directory(tmp))


def _hold(folder: str) -> None:
    """The test hook of :data:`HOLD_ENV`: write this trial's marker in ``folder``; wait there unless it is
    the first."""
    k = 1
    while True:
        try:
            os.close(os.open(os.path.join(folder, f"trial-{k}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            k += 1
    while k > 1:
        time.sleep(0.05)


def trainable(config: dict[str, Any], *, scenario: Scenario, train: TrainSpec, data: Any, metric: str,
              mode: str) -> None:
    """Ray Tune's function trainable for one trial (``tune.with_parameters(trainable, ...)``)."""
    if os.environ.get(HOLD_ENV):
        _hold(os.environ[HOLD_ENV])
    sc, tr = trial_scenario(scenario, train, config, TRIAL_SCENARIO)
    seeds = [int(s) for s in tr.seeds]
    spec = GroupSpec(model=sc.model, train=tr, members=tuple(Member(sc, s) for s in seeds))
    last = [-1]

    def on_log(state: dict[str, Any]) -> None:
        step = int(state["step"])
        if step == last[0]:
            return
        last[0] = step
        value = objective(state["metrics"], step, metric, seeds, mode)
        _report({"step": step, "objective": value, metric: value, "diverged": len(state["diverged"])},
                {"step": step, "metrics": list(state["metrics"]), "diverged": list(state["diverged"])})

    result = run_group(spec, data, checkpoint=on_log)
    steps_done = max((int(r["step"]) for r in result.metrics), default=0)
    if steps_done != last[0]:  # every member diverged before the last log step: one final report
        value = objective(result.metrics, steps_done, metric, seeds, mode)
        _report({"step": int(tr.steps), "objective": value, metric: value, "diverged": len(result.diverged)},
                {"step": steps_done, "metrics": result.metrics, "diverged": result.diverged})
