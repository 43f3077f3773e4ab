"""Run an experiment into a run directory: resumable, crash-safe, with TensorBoard logs and a report.

``run_experiment(exp, out_dir)`` trains every member (scenario x seed) of ``exp`` with the
batched ensemble trainer (:func:`initlab.lab.training.run_group`) and writes the run directory
(layout: :mod:`initlab.lab.rundir`): config.toml, run.json, metrics.csv, first_pass.csv, the
members' parts and TensorBoard logs, and, once every member is done, figures/ and report.html
(:mod:`initlab.lab.report`).

Units of work and resuming. The work is split by :func:`~initlab.lab.training.plan_groups`
into groups of members that share a model shape (optionally at most ``max_members`` each);
one group is one call of ``run_group`` and trains all its members at once. A member's last bits
depend on which members share its ensemble (batched kernels round differently at different
sizes), so the groups are fixed when a run starts (run.json records them) and a group always
trains whole: re-running on the same directory skips every group whose members are all
recorded and trains the others again in full, continuing from the group's last checkpoint
(``checkpoints/``, saved at log steps: ``checkpoint_every``) when there is one. Completion is
recorded per member (:func:`~initlab.lab.rundir.commit_member`; only the missing members of a
group are recorded again). ``metrics.csv`` and ``first_pass.csv`` are rebuilt from the parts
after every group and when a run finishes: rows are never duplicated, whatever was interrupted
when. An interrupted run (an exception, Ctrl-C, SIGTERM from the command line, ``kill -9``, a
full disk) therefore resumes to files identical to an uninterrupted run's
(``tests/test_fault_injection.py``).

Safety. A directory that holds another experiment (a different config fingerprint) is refused
with an :class:`~initlab._errors.InitlabError` naming both experiments and fingerprints, and so is
a non-empty directory that is not a run directory, or a path that cannot be written; one process
writes to a directory at a time (``run.lock``, an OS file lock: see
:func:`~initlab.lab.rundir.lock`). Input errors (unknown data set, missing data files, a model
too large for memory) are raised before anything is written.

Executors (:mod:`initlab.lab.executors`). ``executor=None`` runs the groups in this process;
:class:`~initlab.lab.executors.ProcessPool` in local worker processes and
:class:`~initlab.lab.executors.RayExecutor` on a Ray cluster. Whichever runs a unit, it reports
its metrics rows, weight histograms and checkpoints as it trains, and this process (the driver)
writes the TensorBoard logs (live, flushed at each log step), moves the progress bar, saves the
checkpoints and commits each unit's results as they arrive, so the run directory is the same,
file for file, and only the driver needs to reach it. A unit whose worker dies, or that raises
on a pool or a cluster, is retried up to ``retries`` times from its last checkpoint; a unit that
keeps failing is recorded in run.json (``failed``: members, attempts, error) and in
:attr:`RunSummary.failed`, the others complete, and re-running the same command trains it again.
Any other object with ``map(fn, items)`` (a ``concurrent.futures`` executor) gets the
module-level :func:`~initlab.lab.training.run_unit` and picklable ``(GroupSpec, Dataset)`` items
(no live events, retries or checkpoints).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._errors import InitlabError
from .._schemes import get_scheme
from .._undo import memory_available
from ._io import atomic_write_text, clean_tmp
from ._threads import choose_threads, idle_cpus, using_threads
from .config import config_fingerprint, experiment_to_toml
from .data import Dataset, load_dataset
from .executors import Executor, InProcess, UnitTask
from .metrics import METRICS_COLUMNS, registered
from .report.workers import FigureWorkers, write_report_forked
from .report.tensorboard import MemberLog, flush_logs, write_member_events
from .rundir import (DurableBatch, check_out_dir, check_out_path, clear_results, commit_member, config_differences, done_members,
                     drop_checkpoint, load_checkpoint, lock, member_dir, merge, read_part_csv, read_part_histograms,
                     read_part_values, read_run_meta, save_checkpoint, tb_dir, write_meta)
from .specs import Experiment
from .training import GroupResult, GroupSpec, Member, group_memory, init_member, plan_groups, resolve_device, run_unit

__all__ = ["run_experiment", "RunSummary", "RunProgress", "TqdmProgress", "METRICS_COLUMNS", "member_dir",
           "read_run_meta", "config_differences", "Executor"]


@dataclass(frozen=True)
class RunProgress:
    """One progress event of :func:`run_experiment` (passed to a ``progress`` callable).

    ``event``: "plan" (before any unit; ``units`` = groups to run), "unit_start" (``worker``:
    "pid@host" of the process training it; again when a unit is retried), "step" (``step`` of
    ``steps`` done in unit ``unit``, from any executor), "unit_done" (the unit's members are
    committed), "unit_failed" (it failed for good: ``worker`` holds the error), "done".
    ``members``: the unit's (scenario, seed) keys. Units on a pool or a cluster run at once, so
    their events interleave.
    """

    event: str
    unit: int
    units: int
    step: int = 0
    steps: int = 0
    members: tuple[tuple[str, int], ...] = ()
    members_done: int = 0
    members_total: int = 0
    worker: str = ""


@dataclass
class RunSummary:
    """What :func:`run_experiment` did: where the results are and what was (re)run."""

    run_dir: Path
    name: str
    fingerprint: str
    members_total: int
    members_run: int
    members_skipped: int
    units_run: int
    diverged: list[dict[str, Any]]
    wall_s: float
    report: Path | None
    figures: list[Path] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    retries: int = 0
    #: seconds per phase of this call: ``train`` (the units, from the first event to the last result, with
    #: ``events`` and ``commit`` inside it), ``events`` (TensorBoard live logs and checkpoints from the units'
    #: events), ``commit`` (recording members: parts, canonical logs, merged CSVs), ``unit.<phase>`` (summed
    #: over units, from :attr:`GroupResult.timings`: ``init_first_pass``, ``setup``, ``train``, ``eval``),
    #: ``finish`` (logs left to write, merged CSVs, run.json) and ``report`` (figures and report.html)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def tb_dir(self) -> Path:
        """The TensorBoard log root: ``tensorboard --logdir <tb_dir>``."""
        return self.run_dir / "tb"

    @property
    def complete(self) -> bool:
        return self.members_run + self.members_skipped == self.members_total


# ----------------------------------------------------------------------------- progress


class TqdmProgress:
    """A ``progress`` callable drawing one tqdm bar on stderr, in training steps over all units.

    ``disable=None`` (the default) hides the bar when stderr is not a terminal.
    """

    def __init__(self, *, disable: bool | None = None, desc: str = "training") -> None:
        self.disable = disable
        self.desc = desc
        self.bar: Any = None
        self._last: dict[int, int] = {}

    def __call__(self, ev: RunProgress) -> None:
        from tqdm.auto import tqdm

        if ev.event == "plan":
            self.bar = tqdm(total=ev.units * ev.steps, desc=self.desc, unit="step", disable=self.disable,
                            dynamic_ncols=True, leave=True)
        elif self.bar is None:
            return
        elif ev.event == "unit_start":
            self.bar.update(-self._last.pop(ev.unit, 0))
            self.bar.set_postfix_str(f"group {ev.unit + 1}/{ev.units}, {len(ev.members)} models")
        elif ev.event == "step":
            self.bar.update(ev.step - self._last.get(ev.unit, 0))
            self._last[ev.unit] = ev.step
        elif ev.event in ("unit_done", "unit_failed"):
            self.bar.update(ev.steps - self._last.pop(ev.unit, 0))
        elif ev.event == "done":
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ----------------------------------------------------------------------------- units


def _check_memory(exp: Experiment, groups: Sequence[GroupSpec]) -> None:
    """Refuse a group that cannot fit in this machine's memory (CPU training), before anything is written."""
    if resolve_device(exp.train.device).type != "cpu":
        return
    avail = memory_available(torch.device("cpu"))
    if not avail:
        return
    for g in groups:
        need = group_memory(g)
        if need > avail:
            raise InitlabError(
                f"model.widths: {len(g.members)} model(s) of widths {list(g.model.widths)} need about "
                f"{need / 2 ** 30:.1f} GiB of memory to train together, but {avail / 2 ** 30:.1f} GiB are available; "
                "use smaller widths, or fewer seeds or scenarios")


def _preflight(exp: Experiment, groups: Sequence[GroupSpec] = ()) -> None:
    """Fail on an unavailable device, a group too large for memory, or a scenario whose model cannot be
    built and initialised, before anything is written: each scenario's model is built and initialised
    once on CPU."""
    resolve_device(exp.train.device)
    _check_memory(exp, groups)
    seed = int(exp.train.seeds[0]) if exp.train.seeds else 0
    for sc in exp.scenarios:
        if get_scheme(sc.scheme).needs_batch:
            continue  # data-dependent: needs the first-pass batch
        try:
            init_member(sc, seed)
        except InitlabError as e:
            raise InitlabError(f"scenario {sc.name!r}: {e}") from None


def _check_arguments(exp: Any, out_dir: Any, resume: Any, progress: Any, executor: Any, data: Any, download: Any,
                     max_members: Any, report: Any, checkpoint_every: Any) -> None:
    """Every argument of :func:`run_experiment` of the right kind, or an InitlabError naming it."""
    def bad(name: str, expected: str, value: Any) -> InitlabError:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return InitlabError(f"run_experiment: {name}: expected {expected}, got {type(value).__name__} {shown}")

    if not isinstance(exp, Experiment):
        raise bad("exp", "an Experiment (initlab.lab.load_experiment('classic') or a TOML path)", exp)
    if not isinstance(out_dir, (str, os.PathLike)) or not str(os.fspath(out_dir)):
        raise bad("out_dir", "a folder path (str or pathlib.Path)", out_dir)
    for name, value in (("resume", resume), ("download", download), ("report", report)):
        if not isinstance(value, bool):
            raise bad(name, "True or False", value)
    if not (progress is None or isinstance(progress, bool) or callable(progress)):
        raise bad("progress", "None, True, False or a callable taking a RunProgress", progress)
    if executor is not None and not callable(getattr(executor, "map", None)) \
            and not callable(getattr(executor, "run_units", None)):
        raise bad("executor", "None or an object with map(fn, items)", executor)
    if data is not None and not isinstance(data, Dataset):
        raise bad("data", "None or a Dataset (initlab.lab.load_dataset)", data)
    if max_members is not None and (isinstance(max_members, bool) or not isinstance(max_members, int) or max_members < 1):
        raise bad("max_members", "None or an integer >= 1", max_members)
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, float))
                                         or not checkpoint_every >= 0 or not math.isfinite(checkpoint_every)):
        raise bad("checkpoint_every", "None or a number of seconds >= 0", checkpoint_every)


def member_hparams(exp: Experiment, member: Member) -> dict[str, Any]:
    """A member's hyperparameters for TensorBoard's HParams view (plain numbers and strings)."""
    sc, t = member.scenario, exp.train
    widths = list(sc.model.widths)
    hp: dict[str, Any] = {"scenario": sc.name, "activation": str(sc.activation), "scheme": str(sc.scheme),
                          "depth": max(0, len(widths) - 2), "width": max(widths[1:-1], default=0), "seed": int(member.seed),
                          "optimizer": str(t.optimizer), "lr": float(t.lr), "batch_size": int(t.batch_size),
                          "steps": int(t.steps)}
    for k, v in sorted(dict(getattr(sc, "params", {}) or {}).items()):
        if isinstance(v, (bool, int, float, str)):
            hp[f"params.{k}"] = v
    return hp


class _Live:
    """What the driver keeps of the units in flight, from their events: each unfinished member's live
    TensorBoard log, its weight histograms so far, and which attempt of each unit is current."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.attempt: dict[int, int] = {}
        self.logs: dict[tuple[str, int], MemberLog] = {}
        self.hists: dict[int, list[tuple[str, int, int, dict[str, Any]]]] = {}
        self.preload: dict[int, list[tuple[str, int, int, dict[str, Any]]]] = {}
        self.final: dict[int, dict[str, Any]] = {}  # unit -> its state after the last step, not yet written

    def members(self, i: int) -> list[Member]:
        return [m for m in self.run.units[i].members if m.key not in self.run.done]

    def start(self, i: int, attempt: int) -> None:
        """A unit (re)starts: its unfinished members' logs are written again from the beginning."""
        self.attempt[i] = attempt
        self.close(i)
        run = self.run
        hists = self.hists[i] = list(self.preload.get(i, []))
        for m in self.members(i):
            d = tb_dir(run.run_dir, m.scenario.name, m.seed)
            if d.exists():
                shutil.rmtree(d)
            log = self.logs[m.key] = MemberLog(d, member_hparams(run.exp, m))
            for sc, seed, step, h in hists:
                if (sc, seed) == m.key:
                    log.histograms(step, h)

    def log(self, i: int, event: dict[str, Any]) -> None:
        """A log step's rows, first pass and histograms into the members' logs, flushed together."""
        step = int(event["step"])
        fp, hists = event.get("first_pass") or {}, event.get("histograms") or {}
        rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in event.get("rows", ()):
            rows.setdefault((str(r["scenario"]), int(r["seed"])), []).append(r)
        written = []
        for m in self.members(i):
            log = self.logs.get(m.key)
            if log is None:
                continue
            if m.key in fp:
                log.first_pass(fp[m.key])
            if m.key in hists:
                log.histograms(step, hists[m.key])
                self.hists.setdefault(i, []).append((m.key[0], m.key[1], step, hists[m.key]))
            log.rows(rows.get(m.key, ()))
            written.append(log)
        flush_logs(written)  # one pass over every member's new records

    def checkpoint(self, i: int, state: dict[str, Any]) -> None:
        """Save a unit's training state, with the histograms of the steps before it (those of its own
        step are computed again when it continues). The state after the last step is kept in memory
        instead: the unit's result follows at once and its commit drops the checkpoint, so writing it
        (the ensemble's weights and optimiser state, tens of MB) would be wasted; it is written only when
        the commit, or the run, is interrupted before that (:meth:`save_final`), or the unit is retried."""
        if int(state["step"]) >= int(self.run.exp.train.steps):
            self.final[i] = state
            return
        self._save(i, state)

    def save_final(self, i: int | None = None) -> None:
        """Write the kept last-step state of unit ``i`` (every unit when None), if any."""
        for k in list(self.final) if i is None else [i]:
            state = self.final.pop(k, None)
            if state is not None:
                self._save(k, state)

    def _save(self, i: int, state: dict[str, Any]) -> None:
        step = int(state["step"])
        hists = [[sc, seed, st, h] for sc, seed, st, h in self.hists.get(i, []) if st < step]
        run = self.run
        save_checkpoint(run.run_dir, run.fingerprint, run.units[i].keys, {**state, "histograms": hists})

    def member_histograms(self, i: int, key: tuple[str, int]) -> list[tuple[int, dict[str, Any]]]:
        return [(st, h) for sc, seed, st, h in self.hists.get(i, []) if (sc, seed) == key]

    def close_member(self, key: tuple[str, int]) -> None:
        log = self.logs.pop(key, None)
        if log is not None:
            log.close()

    def close(self, i: int | None = None) -> None:
        keys = list(self.logs) if i is None else [m.key for m in self.run.units[i].members]
        for k in keys:
            self.close_member(k)


# ----------------------------------------------------------------------------- the run


class _Run:
    """One call of :func:`run_experiment`: the run directory, its groups, what is done, and the progress events."""

    def __init__(self, exp: Experiment, run_dir: Path, resume: bool, max_members: int | None) -> None:
        self.exp, self.run_dir, self.resume, self.max_members = exp, run_dir, resume, max_members
        self.callback: Callable[[RunProgress], Any] | None = None
        self.checkpoint_every: float | None = 0.0
        self.fingerprint = config_fingerprint(exp)
        self.toml_text = experiment_to_toml(exp)
        check_out_path(run_dir)
        self.members = [(sc.name, int(seed)) for sc in exp.scenarios for seed in exp.train.seeds]
        self.existing = False
        self.done: set[tuple[str, int]] = set()
        self.groups: list[GroupSpec] = []
        self.units: list[GroupSpec] = []
        self.n_done = self.units_run = self.members_run = self.skipped = 0
        self.wall = 0.0
        self.meta_written = False
        self.diverged: list[dict[str, Any]] = []
        self.report_path: Path | None = None
        self.figures: list[Path] = []
        self.retries = 2
        self.live = _Live(self)
        self.failed: list[dict[str, Any]] = []
        self.retried = 0
        self.figure_workers = 0
        self.workers: FigureWorkers | None = None
        self.timings: dict[str, float] = defaultdict(float)

    def emit(self, event: str, unit: int, step: int = 0, members: tuple = (), worker: str = "") -> None:
        if self.callback is not None:
            steps = int(self.exp.train.steps)
            self.callback(RunProgress(event, unit, len(self.units), step, steps, members, self.n_done, len(self.members),
                                      worker))

    def plan(self) -> list[GroupSpec]:
        """The groups still to train (read-only: called again under the lock before anything is written).

        A group trains whole, as it was first planned (its members' numbers depend on which members
        share the ensemble), so a group with any member still to record is trained again in full,
        from its checkpoint when there is one; only the missing members are then recorded.
        """
        self.existing = check_out_dir(self.run_dir, self.exp, self.fingerprint)
        keep = self.existing and self.resume
        self.done = done_members(self.run_dir, self.fingerprint) & set(self.members) if keep else set()
        self.groups = (self._recorded_groups() if keep else None) or plan_groups(self.exp, max_members=self.max_members)
        self.units = [g for g in self.groups if any(k not in self.done for k in g.keys)]
        self.n_done = self.skipped = len(self.done)
        return self.units

    def _recorded_groups(self) -> list[GroupSpec] | None:
        """The groups run.json records for this experiment, when they still partition its members."""
        raw = read_run_meta(self.run_dir).get("groups")
        by_key = {m.key: m for g in plan_groups(self.exp) for m in g.members}
        try:
            groups = [tuple(by_key[(str(k[0]), int(k[1]))] for k in g) for g in raw]  # type: ignore[union-attr]
        except (TypeError, KeyError, IndexError, ValueError):
            return None
        flat = sorted(m.key for g in groups for m in g)
        if flat != sorted(by_key) or any(not g or len({m.scenario.model for m in g}) != 1 for g in groups):
            return None
        return [GroupSpec(model=g[0].scenario.model, train=self.exp.train, members=g) for g in groups]

    def execute(self, data: Callable[[], Dataset | None], executor: Executor | None, report: bool) -> None:
        """Under the run directory's lock: check it again, train the units, then finish it; an
        interruption is recorded and the lock released."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with lock(self.run_dir):
            if self.plan() and self.existing and not self.resume:
                clear_results(self.run_dir)
            try:
                self._start()
                self.emit("plan", -1, 0)
                if report and self.figure_workers and self.units:  # they import the report's modules meanwhile
                    self.workers = FigureWorkers(self.figure_workers)
                self._train(data() if self.units else None, executor)
                self._finish(report)
                self.emit("done", -1, int(self.exp.train.steps))
            except BaseException:
                with contextlib.suppress(Exception):
                    self.live.save_final()
                with contextlib.suppress(Exception):  # the training time is counted once
                    write_meta(self.run_dir, self.exp, self.fingerprint, "interrupted", self.members,
                               0.0 if self.meta_written else self.wall, failed=self.failed)
                if isinstance(self.callback, TqdmProgress):
                    self.callback.close()
                raise
            finally:
                if self.workers is not None:
                    self.workers.close()

    def _start(self) -> None:
        clean_tmp(self.run_dir)
        cfg_path = self.run_dir / "config.toml"
        if not cfg_path.is_file() or cfg_path.read_bytes() != self.toml_text.encode("utf-8"):
            atomic_write_text(cfg_path, self.toml_text)
        if self.units or not (self.run_dir / "run.json").is_file() or "groups" not in read_run_meta(self.run_dir):
            write_meta(self.run_dir, self.exp, self.fingerprint, "running", self.members, 0.0,
                       groups=[g.keys for g in self.groups])

    def _train(self, data: Dataset | None, executor: Any) -> None:
        t_train = time.perf_counter()
        try:
            if executor is None or callable(getattr(executor, "run_units", None)):
                self._train_units(data, executor or InProcess())
            else:  # any map(fn, items) executor: whole units, results only
                results = executor.map(run_unit, [(u, data) for u in self.units])
                for i, (_unit, result) in enumerate(zip(self.units, results)):
                    self._commit(i, result)
        finally:
            self.live.close()
            self.wall = time.perf_counter() - t_train if self.units else 0.0
            self.timings["train"] += time.perf_counter() - t_train

    def _train_units(self, data: Dataset | None, executor: Any) -> None:
        tasks = [self._task(i, 0, data) for i in range(len(self.units))]
        for task, result in executor.run_units(tasks, self._on_event, self._retry):
            self._commit(task.index, result)

    def _task(self, i: int, attempt: int, data: Any) -> UnitTask:
        """Unit ``i``'s task: from its checkpoint when there is one (with the histograms logged before it)."""
        state = load_checkpoint(self.run_dir, self.fingerprint, self.units[i].keys)
        if state is not None:
            state = dict(state)
            self.live.preload[i] = [(str(h[0]), int(h[1]), int(h[2]), h[3]) for h in state.pop("histograms", None) or []]
        else:
            self.live.preload.pop(i, None)
        return UnitTask(i, attempt, self.units[i], data, state, int(getattr(self.exp.train, "histograms_every", 1)),
                        self.checkpoint_every, torch.get_num_threads(),
                        tuple(m for m in registered() if m.compute is not None))

    def _on_event(self, ev: tuple) -> None:
        """An event of a unit (see :mod:`initlab.lab.executors`); those of an attempt that was given up are ignored."""
        t0 = time.perf_counter()
        try:
            self._event(ev)
        finally:
            self.timings["events"] += time.perf_counter() - t0

    def _event(self, ev: tuple) -> None:
        kind, i, attempt = ev[0], int(ev[1]), int(ev[2])
        if kind == "start":
            self.live.start(i, attempt)
            self.emit("unit_start", i, 0, tuple(self.units[i].keys), str(ev[3]))
        elif attempt != self.live.attempt.get(i):
            return
        elif kind == "log":
            self.live.log(i, ev[3])
            self.emit("step", i, int(ev[3]["step"]), tuple(self.units[i].keys))
        elif kind == "checkpoint" and self.checkpoint_every is not None:
            self.live.checkpoint(i, ev[3])

    def _retry(self, task: UnitTask, error: str, started: bool) -> UnitTask | None:
        """The next attempt of a failed unit (from its last checkpoint), or None after ``retries`` retries:
        the unit is then recorded as failed, with its error, and the run goes on without it."""
        self.live.attempt.pop(task.index, None)
        self.live.close(task.index)
        self.live.save_final(task.index)  # a unit that failed after its last step continues from there
        if task.attempt < self.retries:
            self.retried += 1
            return self._task(task.index, task.attempt + 1, task.data)
        keys = tuple(self.units[task.index].keys)
        self.failed.append({"members": [list(k) for k in keys], "attempts": task.attempt + 1, "error": error})
        self.emit("unit_failed", task.index, int(self.exp.train.steps), keys, error)
        return None

    def _commit(self, i: int, result: GroupResult) -> None:
        """Record the group's members that are not recorded yet, merge the CSVs, drop its checkpoint (an
        interruption before that writes the unit's last-step state, so the next run continues from there)."""
        t0 = time.perf_counter()
        unit = self.units[i]
        try:
            with DurableBatch() as batch:  # the members' parts and logs flushed to disk together
                todo = [m for m in unit.members if m.key not in self.done]
                for m in todo:
                    self._commit_member(i, m, result, batch)
            for m in todo:
                self.done.add(m.key)
                self.n_done += 1
                self.members_run += 1
            self.live.attempt.pop(i, None)
            merge(self.run_dir, self.members)
        except BaseException:
            with contextlib.suppress(Exception):
                self.live.save_final(i)
            raise
        self.live.final.pop(i, None)
        drop_checkpoint(self.run_dir, unit.keys)
        self.units_run += 1
        for k, v in (getattr(result, "timings", None) or {}).items():
            self.timings[f"unit.{k}"] += float(v)
        self.timings["commit"] += time.perf_counter() - t0
        self.emit("unit_done", i, int(self.exp.train.steps), tuple(unit.keys))

    def _commit_member(self, i: int, m: Member, result: GroupResult, batch: DurableBatch) -> None:
        unit = self.units[i]
        hists = self.live.member_histograms(i, m.key)
        self.live.close_member(m.key)
        # the live log gives way to the canonical one, written from what is recorded: the same file (wall
        # times aside) however the unit was interrupted, retried or resumed (an interruption in between
        # leaves no log, which the end of the run, or the next run, writes from the part)
        shutil.rmtree(tb_dir(self.run_dir, m.scenario.name, m.seed), ignore_errors=True)
        values, rows = commit_member(self.run_dir, self.fingerprint, m.scenario, m.seed, result,
                                     self.groups.index(unit), hists, batch=batch)
        self._write_tb(m, values, rows, hists, replace=False, batch=batch)

    def _write_tb(self, m: Member, values: dict[str, np.ndarray] | None = None,
                  metrics: Sequence[dict[str, Any]] | None = None,
                  hists: Sequence[tuple[int, dict[str, Any]]] | None = None, *, replace: bool = True,
                  batch: DurableBatch | None = None) -> None:
        """The member's TensorBoard log, from ``values``, ``metrics`` and ``hists`` or else from its recorded part."""
        if values is None or metrics is None or hists is None:
            part = member_dir(self.run_dir, m.scenario.name, m.seed)
            _, metrics = read_part_csv(part, "metrics.csv")
            values = read_part_values(part)
            hists = read_part_histograms(part)
        write_member_events(tb_dir(self.run_dir, m.scenario.name, m.seed), values, metrics, replace=replace,
                            histograms=hists, hparams=member_hparams(self.exp, m), batch=batch)

    def _finish(self, report: bool) -> None:
        """Logs whose writing was interrupted, the merged CSVs, run.json and (when complete) the report."""
        t0 = time.perf_counter()
        for m in (m for g in self.groups for m in g.members):
            if (member_dir(self.run_dir, *m.key) / "member.json").is_file() and not tb_dir(self.run_dir, *m.key).is_dir():
                self._write_tb(m, replace=False)
        merge(self.run_dir, self.members)  # also after an interruption between a commit and its merge
        status = "complete" if self.n_done == len(self.members) else "failed" if self.failed else "running"
        if status == "complete":
            drop_checkpoint(self.run_dir)
        meta = write_meta(self.run_dir, self.exp, self.fingerprint, status, self.members, self.wall, failed=self.failed)
        self.meta_written = True
        self.diverged = list(meta["diverged"])
        self.timings["finish"] += time.perf_counter() - t0
        if status == "complete" and report:
            t0 = time.perf_counter()
            self._report()
            self.timings["report"] += time.perf_counter() - t0

    def _report(self) -> None:
        """Figures and report.html: drawn by the figure workers when there are some, else here."""
        need = self.units_run > 0 or not (self.run_dir / "report.html").is_file()
        if not need:
            self.report_path = self.run_dir / "report.html"
        elif self.workers is not None:
            self.report_path = self.workers.write_report(self.run_dir)
        else:  # the training is done: its CPUs draw the figures, in this process and a fork of it
            self.report_path = write_report_forked(self.run_dir)
        self.figures = sorted((self.run_dir / "figures").glob("*.png"))

    def summary(self, t0: float) -> RunSummary:
        return RunSummary(run_dir=self.run_dir, name=self.exp.name, fingerprint=self.fingerprint,
                          members_total=len(self.members), members_run=self.members_run,
                          members_skipped=self.skipped, units_run=self.units_run, diverged=self.diverged,
                          wall_s=time.perf_counter() - t0, report=self.report_path, figures=self.figures,
                          failed=list(self.failed), retries=self.retried, timings=dict(self.timings))


def _callback(progress: Callable[[RunProgress], Any] | bool | None) -> Callable[[RunProgress], Any] | None:
    if progress is True:
        return TqdmProgress()
    return None if progress is False else progress  # type: ignore[return-value]


def run_experiment(exp: Experiment, out_dir: str | os.PathLike[str], *, resume: bool = True,
                   progress: Callable[[RunProgress], Any] | bool | None = None, executor: Executor | None = None,
                   data: Dataset | None = None, download: bool = False, max_members: int | None = None,
                   report: bool = True, checkpoint_every: float | None = 5.0, retries: int = 2,
                   threads: int | None = None, figure_workers: int | None = 0) -> RunSummary:
    """Train every member of ``exp`` and write the run directory ``out_dir`` (see the module docstring).

    - ``resume``: skip members already recorded in ``out_dir`` (True), or discard the results of
      a previous run of the *same* experiment and start over (False). A directory holding a
      different experiment is refused either way.
    - ``progress``: None/False (quiet), True (a tqdm bar on stderr, hidden when it is not a
      terminal), or a callable receiving :class:`RunProgress` events. An exception raised by the
      callable (e.g. ``KeyboardInterrupt``) stops the run; finished members stay recorded.
    - ``executor``: None (in this process), an executor of :mod:`initlab.lab.executors`
      (``ProcessPool(workers)``, ``RayExecutor(address)``, or ``make_executor(name, ...)``), or any
      object with ``map(fn, items)``.
    - ``data``: an already loaded :class:`~initlab.lab.data.Dataset` (default: ``load_dataset(exp.data)``,
      loaded only when some member is still to run); ``download``: let the loader fetch missing
      MNIST files.
    - ``max_members``: cap a group's size (finer-grained resuming; spreading over workers). It
      applies when a run starts: a resumed run keeps the groups it started with (run.json records
      them), because a member's last bits depend on which members share its ensemble.
    - ``report``: write figures and report.html once every member is done.
    - ``checkpoint_every``: seconds between checkpoints of a training group (taken at log steps, and
      always at the last one, which is written only when the run is interrupted before the group's
      members are recorded; 0 = every log step, None = none); an interrupted group continues from
      its last checkpoint, bit-identical to an uninterrupted run. Units on a pool or a cluster send
      their checkpoints to this process, which saves them (a ``map`` executor trains from step 0).
    - ``retries``: how many times a failed unit is tried again on a pool or a cluster (in this
      process an exception stops the run).
    - ``figure_workers``: 0 (draw the figures after training, in this process and a child forked from it:
      :func:`~initlab.lab.report.workers.write_report_forked`; in this process alone where fewer than 2
      usable CPUs are idle or there is no ``os.fork``), or how many worker
      processes to start before training: they import the report's modules while the run trains and
      draw the figures in parallel when it is done (:mod:`initlab.lab.report.workers`; a figure that
      fails is named on the page as missing, the run is kept); None: :func:`auto_figure_workers`
      (workers only on CPUs the training leaves idle; ``initlab run``'s default).
    - ``threads``: torch threads for the run (None: :func:`~initlab.lab._threads.choose_threads`'s
      policy: physical cores that are idle); the previous count is restored afterwards.
    """
    with using_threads(choose_threads(threads)):
        return _run_experiment(exp, out_dir, resume, progress, executor, data, download, max_members, report,
                               checkpoint_every, retries, figure_workers)


def auto_figure_workers() -> int:
    """Report workers for ``figure_workers=None``: 2 when at least 2 CPUs are idle beyond the run's
    torch threads, else 1 or 0. A worker that imports and draws on a core the training uses slows
    every OpenMP op of it (measured on 2 cores, classic preset: 12.2 s end to end with 2 workers,
    7.2 s with the figures drawn in this process afterwards)."""
    return max(0, min(2, idle_cpus() - torch.get_num_threads()))


def _run_experiment(exp: Experiment, out_dir: str | os.PathLike[str], resume: bool,
                    progress: Callable[[RunProgress], Any] | bool | None, executor: Executor | None,
                    data: Dataset | None, download: bool, max_members: int | None, report: bool,
                    checkpoint_every: float | None, retries: int = 2, figure_workers: int | None = 0) -> RunSummary:
    t0 = time.perf_counter()
    _check_arguments(exp, out_dir, resume, progress, executor, data, download, max_members, report, checkpoint_every)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InitlabError(f"run_experiment: retries: expected an integer >= 0, got {type(retries).__name__} {retries!r:.60}")
    run = _Run(exp, Path(out_dir), bool(resume), max_members)
    run.retries = retries
    if figure_workers is not None and (isinstance(figure_workers, bool) or not isinstance(figure_workers, int)
                                       or not 0 <= figure_workers <= 64):
        raise InitlabError(f"run_experiment: figure_workers: expected an integer in [0, 64] or None, got "
                           f"{type(figure_workers).__name__} {figure_workers!r:.60}")
    run.figure_workers = auto_figure_workers() if figure_workers is None else figure_workers
    run.checkpoint_every = None if checkpoint_every is None else float(checkpoint_every)
    loaded: list[Dataset | None] = [data]

    def get_data() -> Dataset | None:
        if loaded[0] is None:
            _preflight(exp, run.units)
            loaded[0] = load_dataset(exp.data, download=download)
        return loaded[0]

    if run.plan():  # input errors (data, device, models) before anything is written
        if data is None:
            get_data()
        else:
            _preflight(exp, run.units)
    run.callback = _callback(progress)
    run.execute(get_data, executor, report)
    return run.summary(t0)
