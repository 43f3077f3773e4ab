"""Run an experiment into a run directory: resumable, crash-safe, with TensorBoard logs and a report.

``run_experiment(exp, out_dir)`` trains every member (scenario x seed) of ``exp`` with the
batched ensemble trainer (:func:`initlab.lab.training.run_group`) and writes the run directory
(layout: :mod:`initlab.lab.rundir`): config.toml, run.json, metrics.csv, first_pass.csv, the
members' parts and TensorBoard logs, and, once every member is done, figures/ and report.html
(:mod:`initlab.lab.report`).

Units of work and resuming. The work is split by :func:`~initlab.lab.training.plan_groups`
into groups of members that share a model shape (optionally at most ``max_members`` each);
one group is one call of ``run_group`` and trains all its members at once. Completion is
recorded per *member* (:func:`~initlab.lab.rundir.commit_member`). Re-running on the same
directory skips every recorded member and plans groups over the remaining ones only (members
train independently, so regrouping does not change their results). ``metrics.csv`` and
``first_pass.csv`` are rebuilt from the parts after every group: rows are never duplicated,
whatever was interrupted when.

Safety. A directory that holds another experiment (a different config fingerprint) is refused
with an :class:`~initlab._errors.InitlabError` naming both experiments and fingerprints, and so is
a non-empty directory that is not a run directory; a second process writing to the same
directory is refused through ``run.lock``. Input errors (unknown data set, missing data files)
are raised before anything is written.

Executors. ``executor=None`` runs the groups in this process (with step-level progress). Any
:class:`~initlab.lab.executors.Executor` runs them elsewhere: ``fn`` is the module-level
:func:`~initlab.lab.training.run_unit` and each item is a picklable ``(GroupSpec, Dataset)``
pair; results are committed as they arrive.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import InitlabError
from .._schemes import get_scheme
from ._io import atomic_write_text, clean_tmp, read_csv
from .config import config_fingerprint, experiment_to_toml
from .data import Dataset, load_dataset
from .executors import Executor, InProcess
from .metrics import METRICS_COLUMNS
from .report import write_report
from .report.tensorboard import write_member_events
from .rundir import (check_out_dir, clear_results, commit_member, config_differences, done_members, lock, member_dir,
                     merge, read_run_meta, tb_dir, write_meta)
from .specs import Experiment
from .training import GroupResult, GroupSpec, init_member, plan_groups, resolve_device, run_group, run_unit

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


def _preflight(exp: Experiment) -> None:
    """Fail on an unavailable device or a scenario whose model cannot be built and initialised,
    before anything is written: each scenario's model is built and initialised once on CPU."""
    resolve_device(exp.train.device)
    seed = int(exp.train.seeds[0]) if exp.train.seeds else 0
    for sc in exp.scenarios:
        if get_scheme(sc.scheme).needs_batch:
            continue  # data-dependent: needs the first-pass batch
        try:
            init_member(sc, seed)
        except InitlabError as e:
            raise InitlabError(f"scenario {sc.name!r}: {e}") from None


def _write_tb(run_dir: Path, scenario: str, seed: int, values: dict[str, np.ndarray] | None = None,
              metrics: Sequence[dict[str, Any]] | None = None, *, replace: bool = True) -> None:
    """The member's TensorBoard log, from ``values`` and ``metrics`` or else from its recorded part."""
    if values is None or metrics is None:
        part = member_dir(run_dir, scenario, seed)
        _, metrics = read_csv(part / "metrics.csv")
        with np.load(part / "values.npz") as z:
            values = {k: z[k] for k in z.files}
    write_member_events(tb_dir(run_dir, scenario, seed), values, metrics, replace=replace)




class _InProcessUnit:
    """The in-process unit of work: ``run_group`` with step-level progress events."""

    def __init__(self, run: _Run) -> None:
        self.run, self.index = run, 0

    def __call__(self, item: tuple[GroupSpec, Dataset]) -> GroupResult:
        unit, data = item
        i, self.index = self.index, self.index + 1
        on_step = None
        if self.run.callback is not None:
            self.run.emit("unit_start", i, 0, tuple(unit.keys))

            def on_step(n: int) -> None:
                self.run.emit("step", i, int(n), tuple(unit.keys))
        return run_group(unit, data, progress=on_step)


# ----------------------------------------------------------------------------- the run


class _Run:
    """One call of :func:`run_experiment`: the run directory, what is done, and the progress events."""

    def __init__(self, exp: Experiment, run_dir: Path, callback: Callable[[RunProgress], Any] | None) -> None:
        self.exp, self.run_dir, self.callback = exp, run_dir, callback
        self.fingerprint = config_fingerprint(exp)
        self.toml_text = experiment_to_toml(exp)
        self.existing = check_out_dir(run_dir, exp, self.fingerprint)
        self.members = [(sc.name, int(seed)) for sc in exp.scenarios for seed in exp.train.seeds]
        self.done: set[tuple[str, int]] = set()
        self.units: list[GroupSpec] = []
        self.n_done = self.units_run = 0
        self.wall = 0.0
        self.meta_written = False
        self.diverged: list[dict[str, Any]] = []
        self.report_path: Path | None = None
        self.figures: list[Path] = []

    def emit(self, event: str, unit: int, step: int = 0, members: tuple = ()) -> None:
        if self.callback is not None:
            steps = int(self.exp.train.steps)
            self.callback(RunProgress(event, unit, len(self.units), step, steps, members, self.n_done, len(self.members)))

    def plan(self, resume: bool, max_members: int | None) -> list[GroupSpec]:
        """The units still to run: the experiment's groups without the members already recorded."""
        if self.existing and not resume:
            with lock(self.run_dir):
                clear_results(self.run_dir)
        if self.existing:
            self.done = done_members(self.run_dir, self.fingerprint) & set(self.members)
        for g in plan_groups(self.exp, max_members=max_members):
            todo = tuple(m for m in g.members if m.key not in self.done)
            if todo:
                self.units.append(GroupSpec(model=g.model, train=g.train, members=todo))
        self.n_done = len(self.done)
        return self.units

    def execute(self, data: Dataset | None, executor: Executor | None, report: bool) -> None:
        """Train the units into the (locked) run directory, then finish it; an interruption is recorded."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with lock(self.run_dir):
            self._start()
            try:
                self.emit("plan", -1, 0)
                self._train(data, executor)
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
        if not cfg_path.is_file() or cfg_path.read_text(encoding="utf-8") != self.toml_text:
            atomic_write_text(cfg_path, self.toml_text)
        if self.units or not (self.run_dir / "run.json").is_file():
            write_meta(self.run_dir, self.exp, self.fingerprint, "running", self.members, 0.0)

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
        for m in unit.members:
            values, rows = commit_member(self.run_dir, self.fingerprint, m.scenario, m.seed, result, i)
            _write_tb(self.run_dir, m.scenario.name, m.seed, values, rows)
            self.n_done += 1
        merge(self.run_dir, self.members)
        self.units_run += 1
        self.emit("unit_done", i, int(self.exp.train.steps), tuple(unit.keys))

    def _finish(self, report: bool) -> None:
        """Logs whose writing was interrupted, the merged CSVs, run.json and (when complete) the report."""
        for sc, seed in self.members:
            if (member_dir(self.run_dir, sc, seed) / "member.json").is_file() and not tb_dir(self.run_dir, sc, seed).is_dir():
                _write_tb(self.run_dir, sc, seed, replace=False)
        if not self.units and not (self.run_dir / "metrics.csv").is_file():
            merge(self.run_dir, self.members)
        status = "complete" if self.n_done == len(self.members) else "running"
        meta = write_meta(self.run_dir, self.exp, self.fingerprint, status, self.members, self.wall)
        self.meta_written = True
        self.diverged = list(meta["diverged"])
        if status == "complete" and report:
            need = self.units_run > 0 or not (self.run_dir / "report.html").is_file()
            self.report_path = write_report(self.run_dir) if need else self.run_dir / "report.html"
            self.figures = sorted((self.run_dir / "figures").glob("*.png"))

    def summary(self, t0: float) -> RunSummary:
        return RunSummary(run_dir=self.run_dir, name=self.exp.name, fingerprint=self.fingerprint,
                          members_total=len(self.members), members_run=self.n_done - len(self.done),
                          members_skipped=len(self.done), units_run=self.units_run, diverged=self.diverged,
                          wall_s=time.perf_counter() - t0, report=self.report_path, figures=self.figures)


def _callback(progress: Callable[[RunProgress], Any] | bool | None) -> Callable[[RunProgress], Any] | None:
    if progress is True:
        return TqdmProgress()
    return None if progress is False else progress  # type: ignore[return-value]


def run_experiment(exp: Experiment, out_dir: str | os.PathLike[str], *, resume: bool = True,
                   progress: Callable[[RunProgress], Any] | bool | None = None, executor: Executor | None = None,
                   data: Dataset | None = None, download: bool = False, max_members: int | None = None,
                   report: bool = True) -> RunSummary:
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
    - ``max_members``: cap a group's size (finer-grained resuming; spreading over workers).
    - ``report``: write figures and report.html once every member is done.
    """
    t0 = time.perf_counter()
    run = _Run(exp, Path(out_dir), None)
    units = run.plan(resume, max_members)
    if units:
        _preflight(exp)
        if data is None:
            data = load_dataset(exp.data, download=download)
    run.callback = _callback(progress)
    run.execute(data, executor, report)
    return run.summary(t0)
