"""Interrupting and resuming ``initlab tune``.

What is kept. Ray Tune keeps a search's state in ``out/ray/<scenario>/``: the trials, their
statuses and checkpoints (a trial's metric rows so far), and the sampler's state (its random
generator and how many trials it has drawn). Ctrl-C (SIGINT) is caught by Tune, which saves
that state one last time and stops its trials; SIGTERM (``initlab tune`` turns it into an
exception, and shuts Ray down) and ``kill -9`` of the driver leave the state Tune saved last
(Tune saves it every few seconds). Running the same search on the same ``out`` then
restores it (``Tuner.restore``): finished trials are kept and not run again; a trial that was
running (or errored) is run again from its start (training is deterministic, so it reports
the same values); trials not yet drawn are drawn from the saved generator, so they are the
same points an uninterrupted search draws.

ASHA's record. Tune does not save its scheduler's state, so a restored ASHA would have
forgotten the objectives recorded at its rungs, and would let through a trial that the
uninterrupted search stops. :func:`asha_scheduler` is Tune's ASHA that also writes its rungs
and its stop decisions to ``out/ray/<scenario>.asha.json`` (atomically, after each decision)
and reads them back on restore; a trial run again is stopped where it was stopped before.
With one trial at a time (``max_concurrent = 1``) a resumed search therefore equals an
uninterrupted one with the same seed, row for row (Tune's random trial ids aside). With
several trials at once ASHA's decisions depend on the order in which reports arrive, which
differs from run to run, interrupted or not; the sampled points and each trial's rows do not.

What is refused. ``out/tune.json`` records the search (experiment fingerprint and the search
settings); another search in the same ``out`` is a one-line error naming what differs;
``fresh=True`` (``initlab tune --fresh``) discards the same search's results and starts over.
"""
from __future__ import annotations

import functools
import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..._errors import InitlabError
from .._io import atomic_write_text
from .space import Search

__all__ = ["asha_scheduler", "asha_file", "expected_trials", "unfinished_trials", "search_record", "check_out",
           "clear_search", "OUTPUTS"]

#: what ``initlab tune`` writes in ``out`` besides ``tune.json`` (``--fresh`` removes them)
OUTPUTS = ("ray", "run", "tune_results.csv", "tune_search.png")


def asha_file(experiment_path: str | Path) -> Path:
    """Where the ASHA record of the Tune experiment at ``experiment_path`` is kept (beside it)."""
    p = Path(experiment_path)
    return p.parent / f"{p.name}.asha.json"


# ----------------------------------------------------------------------------- ASHA with a record


def _base(self: Any) -> Any:
    return type(self).__bases__[0]


def _load(self: Any, trial: Any) -> None:
    if getattr(self, "_initlab_file", None) is not None:
        return
    self._initlab_file = asha_file(trial.remote_experiment_path)
    self._initlab_stopped = {}
    if not self._initlab_file.is_file():
        return
    state = json.loads(self._initlab_file.read_text(encoding="utf-8"))
    for bracket, rungs in zip(self._brackets, state["rungs"]):
        bracket._rungs = [(m, dict(recorded)) for m, recorded in rungs]
    self._initlab_stopped = {k: float(v) for k, v in state["stopped"].items()}
    self._num_stopped = int(state["num_stopped"])


def _save(self: Any) -> None:
    state = {"rungs": [[[m, recorded] for m, recorded in b._rungs] for b in self._brackets],
             "stopped": self._initlab_stopped, "num_stopped": self._num_stopped}
    atomic_write_text(self._initlab_file, json.dumps(state) + "\n")


def _on_trial_add(self: Any, controller: Any, trial: Any) -> None:
    _load(self, trial)
    _base(self).on_trial_add(self, controller, trial)


def _on_trial_result(self: Any, controller: Any, trial: Any, result: Mapping[str, Any]) -> str:
    _load(self, trial)
    at = self._initlab_stopped.get(trial.trial_id)
    if at is not None and float(result.get(self._time_attr, -math.inf)) >= at:
        return "STOP"  # stopped here before the search was interrupted: the same decision again
    action = _base(self).on_trial_result(self, controller, trial, result)
    if action == "STOP" and self._time_attr in result:
        self._initlab_stopped[trial.trial_id] = float(result[self._time_attr])
    _save(self)
    return str(action)


def _on_trial_complete(self: Any, controller: Any, trial: Any, result: Mapping[str, Any]) -> None:
    _load(self, trial)
    _base(self).on_trial_complete(self, controller, trial, result)
    _save(self)


def _getstate(self: Any) -> dict[str, Any]:
    # the record is read from its file by the process that runs the search, never taken from a pickle
    return {k: v for k, v in self.__dict__.items() if not k.startswith("_initlab_")}


@functools.cache
def _asha_class(base: type) -> type:
    # a subclass made here, where Ray is imported; Tune pickles it (by value) with the search
    return type("RecordedASHA", (base,), {"__module__": __name__, "__getstate__": _getstate,
                                          "on_trial_add": _on_trial_add, "on_trial_result": _on_trial_result,
                                          "on_trial_complete": _on_trial_complete})


def asha_scheduler(tune: Any, **kwargs: Any) -> Any:
    """Tune's ``ASHAScheduler(**kwargs)`` that keeps its record beside the experiment (see the module
    docstring). ``tune`` is the ``ray.tune`` module."""
    return _asha_class(tune.schedulers.ASHAScheduler)(**kwargs)


# ----------------------------------------------------------------------------- what is left to do


def expected_trials(search: Search) -> int:
    """How many trials the search has: ``samples`` times the product of the ``grid(...)`` lengths."""
    return search.samples * math.prod(len(d.args) for _, d in search.params if d.kind == "grid")


def unfinished_trials(tune: Any, path: Path, search: Search) -> int:
    """How many of the search's trials are not finished (neither terminated nor errored) in the state
    Tune saved at ``path`` (trials not yet drawn included): what a restore would still run."""
    if not path.is_dir() or not tune.Tuner.can_restore(str(path)):
        return expected_trials(search)
    trials = tune.ExperimentAnalysis(str(path)).trials
    done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    return max(expected_trials(search) - done, 0)


# ----------------------------------------------------------------------------- the search recorded in out


def search_record(fingerprint: str, experiment: str, search: Search) -> dict[str, Any]:
    """The content of ``out/tune.json``."""
    settings = {k: getattr(search, k) for k in ("metric", "mode", "samples", "seed", "grace_period",
                                                "reduction_factor")}
    return {"fingerprint": fingerprint, "experiment": experiment, "search": {k: str(d) for k, d in search.params},
            "settings": settings}


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out = []
    if old.get("experiment") != new["experiment"]:
        out.append(f"experiment {old.get('experiment')!r} -> {new['experiment']!r}")
    olds, news = old.get("search") or {}, new["search"]
    for k in sorted(set(olds) | set(news)):
        if olds.get(k) != news.get(k):
            out.append(f"{k} {olds.get(k, '(not searched)')} -> {news.get(k, '(not searched)')}")
    for k, v in new["settings"].items():
        if k in (old.get("settings") or {}) and old["settings"][k] != v:
            out.append(f"{k} {old['settings'][k]!r} -> {v!r}")
    return out


def check_out(out: Path, record: Mapping[str, Any]) -> bool:
    """Whether ``out`` holds this very search (then it resumes); False when ``out`` is new or empty.
    Another search, or a non-empty folder that holds no search, is a one-line InitlabError."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise InitlabError(f"output path {str(out)!r} exists and is not a directory; choose another --out directory")
    meta = out / "tune.json"
    if meta.is_file():
        try:
            old = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        old = old if isinstance(old, dict) else {}
        if old.get("fingerprint") == record["fingerprint"]:
            return True
        diff = _differences(old, record) or ["the experiment's settings"]
        raise InitlabError(f"output directory {str(out)!r} holds another search (fingerprint "
                           f"{str(old.get('fingerprint'))[:12]}, now {record['fingerprint'][:12]}; it differs in "
                           f"{'; '.join(diff)}). Refusing to mix results: use another --out directory, or delete "
                           "that one to start over")
    if any(out.iterdir()):
        raise InitlabError(f"output directory {str(out)!r} is not empty and holds no initlab search (no tune.json); "
                           "choose another --out directory")
    return False


def clear_search(out: Path) -> None:
    """Remove what an earlier run of the same search wrote in ``out`` (``--fresh``), ``tune.json`` last."""
    for name in OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    (out / "tune.json").unlink(missing_ok=True)
