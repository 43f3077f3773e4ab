"""``initlab tune``: a Ray Tune search over a continuous range of an experiment's parameters,
with early stopping by ASHA, written as a run directory plus Tune's results table and a figure.

``run_tune(exp, search, out)`` runs, for each scenario of ``exp``, one Tune search over the
:class:`~initlab.lab.tune.space.Search` space (``samples`` trials; the sampler seeded by
``search.seed``, so the same seed draws the same points). A trial trains every seed of the
experiment at once with the sampled values (:mod:`initlab.lab.tune.trial`) and reports the
objective at each log step; ASHA (Li et al. 2020, "A system for massively parallel
hyperparameter tuning"; ``time_attr`` = training steps, ``max_t`` = ``train.steps``, rungs at
``grace_period * reduction_factor^k`` steps) stops a trial at a rung when it is worse than the
best ``1 / reduction_factor`` of the trials that reached the rung before it.

``out`` then holds:

- ``run/``: a lab run directory (``initlab report out/run`` rebuilds its report) whose
  scenarios are the trials (``<scenario>-tNN-<key>=<value>``): config.toml, run.json,
  metrics.csv (an early-stopped trial's rows end where it was stopped), first_pass.csv,
  TensorBoard logs, figures and report.html. Its config.toml holds the base training settings:
  a searched ``train.*`` value is in the scenario name and the results table.
- ``tune_results.csv``: one row per trial: the sampled values, the hidden layers' ``sigma_w2``
  where the scheme gives one, the last objective and step, whether ASHA stopped it, diverged
  seeds, the trial's status and the critical value of the searched key (see
  :mod:`initlab.lab.tune.results`).
- ``tune_search.png``: the search figure; ``tune.json``: the search (for resuming);
  ``ray/``: Tune's own experiment state.

Interrupted and resumed (see :mod:`initlab.lab.tune.resume`): Ctrl-C stops the search within
seconds, keeps what finished (Tune's state in ``ray/``) and raises ``KeyboardInterrupt``;
running the same search on the same ``out`` (after Ctrl-C or ``kill -9``) resumes it: finished
trials are not run again, unfinished ones are, and the files are then written as by an
uninterrupted search. Another search or experiment in ``out`` is refused (``fresh=True``
restarts the same search). Every file is written atomically, so an interruption never leaves a
half-written table.

Ray runs locally (``ray.init(address="local")`` on 127.0.0.1 without the dashboard, shut down
at the end) or on a cluster (``address``: ``auto``, ``ray://HOST:PORT``, or ``RAY_ADDRESS``);
on a multi-node cluster, ``out`` must be on storage every node can write (Tune keeps the
trials' checkpoints under ``out/ray``). Ray is imported only here, when a search runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..._errors import InitlabError
from .._io import atomic_write_text
from ..config import _source, config_fingerprint, read_toml
from ..data import Dataset, load_dataset
from ..run import run_experiment
from ..specs import Experiment, Scenario
from ..training import GroupResult, GroupSpec
from ..training.group import _init_members
from . import trial
from .resume import asha_file, asha_scheduler, check_out, clear_search, expected_trials, search_record, \
    unfinished_trials
from .results import critical_value, sigma_w2, write_figure, write_table
from .space import Dist, Search, parse_dist, parse_param, search_from_dict, trial_scenario

__all__ = ["run_tune", "TuneSummary", "Search", "Dist", "parse_dist", "parse_param", "search_from_dict",
           "search_table", "summary_lines", "best_trial", "import_ray"]

RAY_HINT = "pip install 'initlab[ray]'"


@dataclass
class TuneSummary:
    """What :func:`run_tune` did: the trials (rows of the results table) and where the files are."""

    out: Path
    trials: list[dict[str, Any]]
    table: Path
    figure: Path
    run_dir: Path
    best: dict[str, dict[str, Any]] = field(default_factory=dict)  # base scenario -> best trial


def import_ray() -> Any:
    """``ray`` (with ``ray.tune``), or a one-line InitlabError saying how to install it."""
    try:
        import ray
        import ray.tune  # noqa: F401
    except ImportError:
        raise InitlabError(f"initlab tune needs Ray Tune, which is not installed: {RAY_HINT}") from None
    return ray


def _fingerprint(exp: Experiment, search: Search) -> str:
    spec = {"experiment": config_fingerprint(exp), "search": [[k, str(d)] for k, d in search.params],
            **{k: getattr(search, k) for k in ("metric", "mode", "samples", "seed", "grace_period",
                                                "reduction_factor")}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


class _Ray:
    """``with _Ray(address, cpus):`` Ray connected for the block; started (and shut down) here unless the
    caller already connected it."""

    def __init__(self, address: str | None, cpus: int | None) -> None:
        self.address, self.cpus, self.ray, self.started = address, cpus, import_ray(), False

    def __enter__(self) -> Any:
        ray = self.ray
        if not ray.is_initialized():
            # ray.init replaces the SIGTERM handler with one that dumps a stack and aborts: put the caller's back
            main = threading.current_thread() is threading.main_thread()
            term = signal.getsignal(signal.SIGTERM) if main else None
            try:
                if self.address:
                    ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address="local", num_cpus=self.cpus, include_dashboard=False,
                             _node_ip_address="127.0.0.1", log_to_driver=False)
            except BaseException:  # Ctrl-C while Ray starts: stop what it started so far
                ray.shutdown()
                raise
            self.started = True
            if term is not None:
                signal.signal(signal.SIGTERM, term)
        return ray

    def __exit__(self, *exc: Any) -> None:
        if self.started:
            self.ray.shutdown()


def _tuner(tune: Any, sc: Scenario, exp: Experiment, search: Search, data: Dataset, path: Path) -> Any:
    """The Tune search of one base scenario, restored from ``path`` when it was started before."""
    fn = tune.with_resources(
        tune.with_parameters(trial.trainable, scenario=sc, train=exp.train, data=data, metric=search.metric,
                             mode=search.mode),
        {"cpu": search.cpus_per_trial})
    if path.is_dir() and tune.Tuner.can_restore(str(path)):
        return tune.Tuner.restore(str(path), trainable=fn, resume_unfinished=True, resume_errored=True)
    asha_file(path).unlink(missing_ok=True)  # a record left by a search that Tune never saved
    grace = search.grace_period or exp.train.log_every
    scheduler = asha_scheduler(tune, time_attr="step", max_t=int(exp.train.steps), grace_period=grace,
                               reduction_factor=search.reduction_factor)
    sampler = tune.search.basic_variant.BasicVariantGenerator(random_state=search.seed,
                                                              max_concurrent=search.max_concurrent)
    return tune.Tuner(
        fn, param_space={k: d.to_tune() for k, d in search.params},
        tune_config=tune.TuneConfig(metric="objective", mode=search.mode, scheduler=scheduler, search_alg=sampler,
                                    num_samples=search.samples),
        run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent), verbose=0))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hold back Tune's lines on how to resume from Python, and its warnings that a trial stopped before
    its first report has no results yet (``initlab tune`` says what to do)."""
    logs = [logging.getLogger(name) for name in ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def _fit(tuner: Any) -> tuple[Any, bool]:
    """``tuner.fit()``, and whether Tune's Ctrl-C handler stopped it. During a search Tune catches the first
    SIGINT itself (it saves the search's state, stops the trials and returns) and then puts back the
    handler it found; it leaves its own handler installed after a search that ran to the end. So the
    handler found before is put back here, and finding it already back means a Ctrl-C stopped the search.
    Tune's own log lines (how to resume from Python) are held back: the caller says what to do."""
    main = threading.current_thread() is threading.main_thread()
    catches = main and os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") in ("", "0")
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        with _quiet():
            results = tuner.fit()
    finally:
        stopped = catches and signal.getsignal(signal.SIGINT) is before
        if before is not None:
            signal.signal(signal.SIGINT, before)
    return results, stopped


def _search(tune: Any, sc: Scenario, exp: Experiment, search: Search, data: Dataset, path: Path) -> Any:
    """The finished search of one base scenario (run, resumed, or restored as it is). Stopped before its
    end: ``KeyboardInterrupt`` after Ctrl-C, else a one-line InitlabError; what finished is kept."""
    with _quiet():
        tuner = _tuner(tune, sc, exp, search, data, path)
    results, interrupted = _fit(tuner)
    with _quiet():
        left = unfinished_trials(tune, path, search)
    if left and interrupted:
        raise KeyboardInterrupt
    if left:
        raise InitlabError(f"tune {sc.name!r}: stopped with {left} of {expected_trials(search)} trials unfinished; "
                           f"the search is kept in {str(path)!r}: run the same command to resume")
    return results


def _value_text(key: str, v: Any) -> str:
    return f"{key.partition('.')[2]}={v:.4g}" if isinstance(v, float) else f"{key.partition('.')[2]}={v}"


def _trial_rows(results: Any, sc: Scenario, exp: Experiment, search: Search) -> list[dict[str, Any]]:
    """One dict per trial of a finished search (the results table's row, plus its checkpointed rows)."""
    out = []
    ordered = sorted(results, key=lambda r: (str((r.metrics or {}).get("trial_id", "")), str(r.path)))
    for i, res in enumerate(ordered):  # in creation order (a restored search lists its trials in another order)
        config = {k: res.config[k] for k in search.keys}
        name = "-".join([sc.name, f"t{i:02d}", *(_value_text(k, v) for k, v in config.items())])
        saved = _saved_rows(res)
        step = int(saved["step"]) if saved else 0
        metrics = res.metrics or {}
        first = search.keys[0]
        row = {"base": sc.name, "scenario": name, "trial_id": metrics.get("trial_id", ""), **config,
               "sigma_w2": sigma_w2(sc, first.partition(".")[2], float(config[first]))
               if first.startswith("scheme.") else None,
               "objective": float(metrics.get("objective", float("nan"))), "metric": search.metric,
               "mode": search.mode, "step": step, "stopped_early": res.error is None and step < exp.train.steps
               and len(saved.get("diverged", [])) < len(exp.train.seeds) if saved else False,
               "diverged": len(saved.get("diverged", [])) if saved else 0,
               "status": "error" if res.error is not None else "done", "critical": critical_value(sc, first),
               "_rows": saved, "_config": config}
        out.append(row)
    return out


def _saved_rows(res: Any) -> dict[str, Any] | None:
    ckpt = res.checkpoint
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return pickle.loads((Path(d) / trial.ROWS_FILE).read_bytes())


class _Replay:
    """An executor that trains nothing: each unit's result is the trial's recorded rows, renamed, with
    the first pass recomputed here (deterministic: the same initial models on the same batch)."""

    def __init__(self, saved: Mapping[str, dict[str, Any]]) -> None:
        self.saved = saved

    def map(self, fn: Callable[[Any], Any], items: Iterable[tuple[GroupSpec, Dataset]], /) -> Iterator[GroupResult]:
        for unit, data in items:
            yield self._result(unit, data)

    def _result(self, unit: GroupSpec, data: Dataset) -> GroupResult:
        name = unit.members[0].scenario.name
        saved = self.saved[name]

        def renamed(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{**r, "scenario": name} for r in rows]

        _, first_pass, values, init_rows = _init_members(unit, data)
        return GroupResult(metrics=renamed(saved["metrics"]), first_pass=first_pass, first_pass_values=values,
                           diverged=renamed(saved["diverged"]), wall_s=0.0, init=init_rows)


def _write_run_dir(exp: Experiment, trials: Sequence[dict[str, Any]], out: Path, data: Dataset) -> Path:
    """The lab run directory ``out/run`` of the trials that reported (one scenario per trial)."""
    base = {sc.name: sc for sc in exp.scenarios}
    kept = [t for t in trials if t["_rows"]]
    if not kept:
        raise InitlabError("no trial reported a result (see the errors above and out/ray/)")
    scenarios = tuple(trial_scenario(base[t["base"]], exp.train, t["_config"], t["scenario"])[0] for t in kept)
    texp = replace(exp, name=f"{exp.name}-tune", description=f"initlab tune of {exp.name}: one scenario per trial",
                   scenarios=scenarios)
    run_dir = out / "run"
    run_experiment(texp, run_dir, executor=_Replay({t["scenario"]: t["_rows"] for t in kept}), data=data,
                   max_members=len(exp.train.seeds), progress=False, checkpoint_every=None)
    return run_dir


def search_table(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``[tune]`` table of a preset or experiment file (``{}`` when it has none)."""
    text, where, _ = _source(name_or_path)
    raw = read_toml(text, where).get("tune", {})
    if not isinstance(raw, dict):
        raise InitlabError(f"{where}: tune: expected a table ([tune]), got {type(raw).__name__}")
    return raw


def run_tune(exp: Experiment, search: Search | Mapping[str, Any], out_dir: str | os.PathLike[str], *,
             address: str | None = None, data: Dataset | None = None, cpus: int | None = None,
             params: Mapping[str, Dist] | None = None, fresh: bool = False) -> TuneSummary:
    """Run the search (see the module docstring) and write ``out_dir``.

    ``search``: a :class:`Search`, or a ``[tune]`` table (a dict) checked against ``exp`` with ``params``
    (``{"scheme.factor": Dist(...)}``, replacing the table's entries); ``address``: a Ray cluster
    (default ``RAY_ADDRESS``, else a local Ray); ``cpus``: at most this many CPUs for a local Ray;
    ``fresh``: discard what an earlier run of this same search left in ``out_dir`` and start over
    (another search there is refused either way; see :mod:`initlab.lab.tune.resume`).
    """
    if not isinstance(exp, Experiment):
        raise InitlabError(f"run_tune: exp: expected an Experiment, got {type(exp).__name__}")
    if not isinstance(search, Search):
        search = search_from_dict(search, exp, params)
    out = Path(out_dir)
    record = search_record(_fingerprint(exp, search), exp.name, search)
    if check_out(out, record) and fresh:
        clear_search(out)
    data = data if data is not None else load_dataset(exp.data)
    address = address or os.environ.get("RAY_ADDRESS") or None
    with _Ray(address, cpus) as ray:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "tune.json", json.dumps(record) + "\n")
        trials: list[dict[str, Any]] = []
        for sc in exp.scenarios:
            path = (out / "ray" / sc.name).resolve()
            trials += _trial_rows(_search(ray.tune, sc, exp, search, data, path), sc, exp, search)
    table = write_table(out / "tune_results.csv", trials, search)
    by_base = {sc.name: [t for t in trials if t["base"] == sc.name] for sc in exp.scenarios}
    figure = write_figure(out / "tune_search.png", by_base, {sc.name: sc for sc in exp.scenarios}, search)
    run_dir = _write_run_dir(exp, trials, out, data)
    clean = [{k: v for k, v in t.items() if not k.startswith("_")} for t in trials]
    return TuneSummary(out=out, trials=clean, table=table, figure=figure, run_dir=run_dir,
                       best={b: best_trial([t for t in clean if t["base"] == b], search, exp.train.steps)
                             for b in by_base})


def best_trial(trials: Sequence[Mapping[str, Any]], search: Search, steps: int) -> dict[str, Any]:
    """The best of the trials that trained to the last step (an early-stopped trial's objective is from
    fewer steps); ``{}`` when none did."""
    full = [t for t in trials if t["status"] == "done" and int(t["step"]) >= steps and math.isfinite(t["objective"])]
    if not full:
        return {}
    sign = 1.0 if search.mode == "min" else -1.0
    return dict(min(full, key=lambda t: sign * t["objective"]))


def summary_lines(s: TuneSummary) -> list[str]:
    """What ``initlab tune`` prints: per scenario, the trials, how many ASHA stopped, the best one."""
    lines = []
    for base, best in s.best.items():
        ts = [t for t in s.trials if t["base"] == base]
        stopped = sum(bool(t["stopped_early"]) for t in ts)
        line = f"initlab: {base}: {len(ts)} trials, {stopped} stopped early by ASHA"
        if best:
            keys = [k for k in best if k.startswith(("scheme.", "train."))]
            vals = ", ".join(f"{k} = {best[k]:.4g}" for k in keys)
            line += f"; best: {vals} ({best['metric']} {best['objective']:.4g}, {best['scenario']})"
            if best.get("critical") is not None:
                line += f"; theory's critical value: {best['critical']:.4g}"
        lines.append(line)
    lines += [f"  results:     {s.table}", f"  figure:      {s.figure}",
              f"  run:         {s.run_dir}  (report: {s.run_dir / 'report.html'})"]
    return lines
