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

Executors. ``executor=None`` runs the groups in this process (with step-level progress). Any
:class:`~initlab.lab.executors.Executor` runs them elsewhere: ``fn`` is the module-level
:func:`~initlab.lab.training.run_unit` and each item is a picklable ``(GroupSpec, Dataset)``
pair; results are committed as they arrive.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
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
from ._threads import choose_threads, using_threads
from .config import config_fingerprint, experiment_to_toml
from .data import Dataset, load_dataset
from .executors import Executor, InProcess
from .metrics import METRICS_COLUMNS
from .report import write_report
from .report.tensorboard import write_member_events
from .rundir import (check_out_dir, check_out_path, clear_results, commit_member, config_differences, done_members,
                     drop_checkpoint, load_checkpoint, lock, member_dir, merge, read_part_csv, read_part_values,
                     read_run_meta, save_checkpoint, tb_dir, write_meta)
from .specs import Experiment
from .training import (GroupResult, GroupSpec, group_memory, init_member, plan_groups, resolve_device, run_group,
                       run_unit)

__all__ = ["run_experiment", "RunSummary", "RunProgress", "TqdmProgress", "METRICS_COLUMNS", "member_dir",
           "read_run_meta", "config_differences", "Executor"]


@dataclass(frozen=True)
class RunProgress:
    """One progress event of :func:`run_experiment` (passed to a ``progress`` callable).

    ``event``: "plan" (before any unit; ``units`` = groups to run), "unit_start", "step"
    (``step`` of ``steps`` done in the current unit; in-process only), "unit_done" (the unit's
    members are committed), "done". ``members``: the current unit's (scenario, seed) keys.
    """

    event: str
    unit: int
    units: int
    step: int = 0
    steps: int = 0
    members: tuple[tuple[str, int], ...] = ()
    members_done: int = 0
    members_total: int = 0


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
        self._last = 0

    def __call__(self, ev: RunProgress) -> None:
        from tqdm.auto import tqdm

        if ev.event == "plan":
            self.bar = tqdm(total=ev.units * ev.steps, desc=self.desc, unit="step", disable=self.disable,
                            dynamic_ncols=True, leave=True)
        elif self.bar is None:
            return
        elif ev.event == "unit_start":
            self._last = 0
            self.bar.set_postfix_str(f"group {ev.unit + 1}/{ev.units}, {len(ev.members)} models")
        elif ev.event == "step":
            self.bar.update(ev.step - self._last)
            self._last = ev.step
        elif ev.event == "unit_done":
            self.bar.update(ev.steps - self._last)
            self._last = 0
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
    if executor is not None and not callable(getattr(executor, "map", None)):
        raise bad("executor", "None or an object with map(fn, items)", executor)
    if data is not None and not isinstance(data, Dataset):
        raise bad("data", "None or a Dataset (initlab.lab.load_dataset)", data)
    if max_members is not None and (isinstance(max_members, bool) or not isinstance(max_members, int) or max_members < 1):
        raise bad("max_members", "None or an integer >= 1", max_members)
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, float))
                                         or not checkpoint_every >= 0 or not math.isfinite(checkpoint_every)):
        raise bad("checkpoint_every", "None or a number of seconds >= 0", checkpoint_every)


def _write_tb(run_dir: Path, scenario: str, seed: int, values: dict[str, np.ndarray] | None = None,
              metrics: Sequence[dict[str, Any]] | None = None, *, replace: bool = True) -> None:
    """The member's TensorBoard log, from ``values`` and ``metrics`` or else from its recorded part."""
    if values is None or metrics is None:
        part = member_dir(run_dir, scenario, seed)
        _, metrics = read_part_csv(part, "metrics.csv")
        values = read_part_values(part)
    write_member_events(tb_dir(run_dir, scenario, seed), values, metrics, replace=replace)


class _InProcessUnit:
    """The in-process unit of work: ``run_group`` with step-level progress events, continuing from the
    group's checkpoint when there is one and saving new ones as it trains."""

    def __init__(self, run: _Run) -> None:
        self.run, self.index = run, 0

    def __call__(self, item: tuple[GroupSpec, Dataset]) -> GroupResult:
        unit, data = item
        i, self.index = self.index, self.index + 1
        run = self.run
        on_step = None
        if run.callback is not None:
            run.emit("unit_start", i, 0, tuple(unit.keys))

            def on_step(n: int) -> None:
                run.emit("step", i, int(n), tuple(unit.keys))
        state = load_checkpoint(run.run_dir, run.fingerprint, unit.keys)
        return run_group(unit, data, progress=on_step, checkpoint=_Saver(run, unit), resume=state)


class _Saver:
    """Saves a group's training state at its log steps: at most every ``run.checkpoint_every`` seconds,
    and always at the last step (so that an interruption while its members are committed costs nothing)."""

    def __init__(self, run: _Run, unit: GroupSpec) -> None:
        self.run, self.keys, self.last = run, unit.keys, time.monotonic()

    def __call__(self, state: dict[str, Any]) -> None:
        every = self.run.checkpoint_every
        if every is None:
            return
        now = time.monotonic()
        if now - self.last >= every or int(state["step"]) >= int(self.run.exp.train.steps):
            save_checkpoint(self.run.run_dir, self.run.fingerprint, self.keys, state)
            self.last = time.monotonic()


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

    def emit(self, event: str, unit: int, step: int = 0, members: tuple = ()) -> None:
        if self.callback is not None:
            steps = int(self.exp.train.steps)
            self.callback(RunProgress(event, unit, len(self.units), step, steps, members, self.n_done, len(self.members)))

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
                self._train(data() if self.units else None, executor)
                self._finish(report)
                self.emit("done", -1, int(self.exp.train.steps))
            except BaseException:
                with contextlib.suppress(Exception):  # the training time is counted once
                    write_meta(self.run_dir, self.exp, self.fingerprint, "interrupted", self.members,
                               0.0 if self.meta_written else self.wall)
                if isinstance(self.callback, TqdmProgress):
                    self.callback.close()
                raise

    def _start(self) -> None:
        clean_tmp(self.run_dir)
        cfg_path = self.run_dir / "config.toml"
        if not cfg_path.is_file() or cfg_path.read_bytes() != self.toml_text.encode("utf-8"):
            atomic_write_text(cfg_path, self.toml_text)
        if self.units or not (self.run_dir / "run.json").is_file() or "groups" not in read_run_meta(self.run_dir):
            write_meta(self.run_dir, self.exp, self.fingerprint, "running", self.members, 0.0,
                       groups=[g.keys for g in self.groups])

    def _train(self, data: Dataset | None, executor: Executor | None) -> None:
        t_train = time.perf_counter()
        try:
            fn: Callable[[Any], GroupResult] = run_unit if executor is not None else _InProcessUnit(self)
            results = (executor or InProcess()).map(fn, [(u, data) for u in self.units])
            for i, (unit, result) in enumerate(zip(self.units, results)):
                self._commit(i, unit, result)
        finally:
            self.wall = time.perf_counter() - t_train if self.units else 0.0

    def _commit(self, i: int, unit: GroupSpec, result: GroupResult) -> None:
        """Record the group's members that are not recorded yet, merge the CSVs, drop its checkpoint."""
        for m in unit.members:
            if m.key in self.done:
                continue
            values, rows = commit_member(self.run_dir, self.fingerprint, m.scenario, m.seed, result,
                                         self.groups.index(unit))
            _write_tb(self.run_dir, m.scenario.name, m.seed, values, rows)
            self.done.add(m.key)
            self.n_done += 1
            self.members_run += 1
        merge(self.run_dir, self.members)
        drop_checkpoint(self.run_dir, unit.keys)
        self.units_run += 1
        self.emit("unit_done", i, int(self.exp.train.steps), tuple(unit.keys))

    def _finish(self, report: bool) -> None:
        """Logs whose writing was interrupted, the merged CSVs, run.json and (when complete) the report."""
        for sc, seed in self.members:
            if (member_dir(self.run_dir, sc, seed) / "member.json").is_file() and not tb_dir(self.run_dir, sc, seed).is_dir():
                _write_tb(self.run_dir, sc, seed, replace=False)
        merge(self.run_dir, self.members)  # also after an interruption between a commit and its merge
        status = "complete" if self.n_done == len(self.members) else "running"
        if status == "complete":
            drop_checkpoint(self.run_dir)
        meta = write_meta(self.run_dir, self.exp, self.fingerprint, status, self.members, self.wall)
        self.meta_written = True
        self.diverged = list(meta["diverged"])
        if status == "complete" and report:
            need = self.units_run > 0 or not (self.run_dir / "report.html").is_file()
            self.report_path = write_report(self.run_dir) if need else self.run_dir / "report.html"
            self.figures = sorted((self.run_dir / "figures").glob("*.png"))

    def summary(self, t0: float) -> RunSummary:
        return RunSummary(run_dir=self.run_dir, name=self.exp.name, fingerprint=self.fingerprint,
                          members_total=len(self.members), members_run=self.members_run,
                          members_skipped=self.skipped, units_run=self.units_run, diverged=self.diverged,
                          wall_s=time.perf_counter() - t0, report=self.report_path, figures=self.figures)


def _callback(progress: Callable[[RunProgress], Any] | bool | None) -> Callable[[RunProgress], Any] | None:
    if progress is True:
        return TqdmProgress()
    return None if progress is False else progress  # type: ignore[return-value]


def run_experiment(exp: Experiment, out_dir: str | os.PathLike[str], *, resume: bool = True,
                   progress: Callable[[RunProgress], Any] | bool | None = None, executor: Executor | None = None,
                   data: Dataset | None = None, download: bool = False, max_members: int | None = None,
                   report: bool = True, checkpoint_every: float | None = 5.0,
                   threads: int | None = None) -> RunSummary:
    """Train every member of ``exp`` and write the run directory ``out_dir`` (see the module docstring).

    - ``resume``: skip members already recorded in ``out_dir`` (True), or discard the results of
      a previous run of the *same* experiment and start over (False). A directory holding a
      different experiment is refused either way.
    - ``progress``: None/False (quiet), True (a tqdm bar on stderr, hidden when it is not a
      terminal), or a callable receiving :class:`RunProgress` events. An exception raised by the
      callable (e.g. ``KeyboardInterrupt``) stops the run; finished members stay recorded.
    - ``executor``: None (in this process) or an object with ``map(fn, items)``.
    - ``data``: an already loaded :class:`~initlab.lab.data.Dataset` (default: ``load_dataset(exp.data)``,
      loaded only when some member is still to run); ``download``: let the loader fetch missing
      MNIST files.
    - ``max_members``: cap a group's size (finer-grained resuming; spreading over workers). It
      applies when a run starts: a resumed run keeps the groups it started with (run.json records
      them), because a member's last bits depend on which members share its ensemble.
    - ``report``: write figures and report.html once every member is done.
    - ``checkpoint_every``: seconds between checkpoints of a training group (taken at log steps, and
      always at the last one; 0 = every log step, None = none); an interrupted group continues from
      its last checkpoint, bit-identical to an uninterrupted run. In-process only: an ``executor``
      trains each group from step 0.
    - ``threads``: torch threads for the run (None: :func:`~initlab.lab._threads.choose_threads`'s
      policy: physical cores that are idle); the previous count is restored afterwards.
    """
    with using_threads(choose_threads(threads)):
        return _run_experiment(exp, out_dir, resume, progress, executor, data, download, max_members, report,
                               checkpoint_every)


def _run_experiment(exp: Experiment, out_dir: str | os.PathLike[str], resume: bool,
                    progress: Callable[[RunProgress], Any] | bool | None, executor: Executor | None,
                    data: Dataset | None, download: bool, max_members: int | None, report: bool,
                    checkpoint_every: float | None) -> RunSummary:
    t0 = time.perf_counter()
    _check_arguments(exp, out_dir, resume, progress, executor, data, download, max_members, report, checkpoint_every)
    run = _Run(exp, Path(out_dir), bool(resume), max_members)
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
