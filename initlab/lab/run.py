"""Run an experiment into a run directory: resumable, crash-safe, with TensorBoard logs and a report.

``run_experiment(exp, out_dir)`` trains every member (scenario x seed) of ``exp`` with the
batched ensemble trainer (:func:`initlab.lab.ensemble.run_group`) and writes::

    out_dir/
      config.toml        the resolved experiment (experiment_to_toml); loading it gives ``exp`` back
      run.json           name, config fingerprint, status ("running", "interrupted", "complete"),
                         members done, diverged members, training seconds
      metrics.csv        scenario, seed, step, split ("train"/"test"), metric ("loss"/"acc"), value
      first_pass.csv     the probe table (initlab.probe) per scenario x seed x weight layer:
                         scenario, seed, scheme, then the probe's columns (measured statistics
                         next to ``predicted_*`` from the variance recursion)
      tb/<scenario>/seed<k>/   TensorBoard events of one member (tags: see initlab.lab.tb)
      figures/*.png      histograms, variance per layer, accuracy and loss curves
      report.html        self-contained report (initlab.lab.report)
      parts/<scenario>/seed<k>/   the finished member's own results (metrics.csv, first_pass.csv,
                         values.npz with the first-pass arrays, member.json)

Units of work and resuming. The work is split by :func:`~initlab.lab.ensemble.plan_groups`
into groups of members that share a model shape (optionally at most ``max_members`` each);
one group is one call of ``run_group`` and trains all its members at once. Completion is
recorded per *member*: when a group returns, each member's results are committed as one
directory ``parts/<scenario>/seed<k>/``, built under a temporary name and renamed into place,
so a member is either completely recorded or not at all. Re-running on the same directory
skips every recorded member and plans groups over the remaining ones only (members train
independently, so regrouping does not change their results). ``metrics.csv`` and
``first_pass.csv`` are rebuilt from the parts after every group, atomically, in experiment
order: rows are never duplicated, whatever was interrupted when.

Safety. A directory that holds another experiment (a different config fingerprint) is refused
with an :class:`~initlab._errors.InitlabError` naming both experiments and fingerprints, and so is
a non-empty directory that is not a run directory; a second process writing to the same
directory is refused through ``run.lock``. Every file is written atomically
(:mod:`initlab.lab._io`). Input errors (unknown data set, missing data files) are raised
before anything is written.

Executors. ``executor=None`` runs the groups in this process (with step-level progress). Any
object with ``map(fn, items)`` returning the results in order (``concurrent.futures``
executors, or an adapter over a Ray cluster: ``map`` = submit ``ray.remote(fn)`` per item and
``ray.get`` them in order) runs them elsewhere: ``fn`` is a module-level function and each item
is a picklable ``(GroupSpec, Dataset)`` pair; results are committed as they arrive.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .._errors import InitlabError
from ._io import (TMP_PREFIX, atomic_dir, atomic_write_csv, atomic_write_text, clean_tmp, csv_text, read_csv,
                  slug)
from .tb import member_log_dir

if TYPE_CHECKING:  # pragma: no cover
    from .config import Experiment
    from .data import Dataset
    from .ensemble import GroupResult, GroupSpec

__all__ = ["run_experiment", "RunSummary", "RunProgress", "TqdmProgress", "METRICS_COLUMNS", "member_dir",
           "read_run_meta", "config_differences", "Executor"]

METRICS_COLUMNS = ("scenario", "seed", "step", "split", "metric", "value")
_FIRST_PASS_LEAD = ("scenario", "seed", "scheme")
_FORMAT = 1


class Executor(Protocol):
    """Anything with ``map(fn, items)`` yielding ``fn(item)`` for each item, in order."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], /) -> Iterable[Any]: ...  # pragma: no cover


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


# ----------------------------------------------------------------------------- layout


def member_dir(run_dir: str | Path, scenario: str, seed: int) -> Path:
    """``run_dir/parts/<scenario>/seed<k>``: where one finished member's results live."""
    return Path(run_dir) / "parts" / slug(scenario) / f"seed{int(seed)}"


def _tb_dir(run_dir: Path, scenario: str, seed: int) -> Path:
    return member_log_dir(run_dir / "tb", slug(scenario), seed)


def read_run_meta(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of a run directory as a dict ({} when absent or unreadable)."""
    p = Path(run_dir) / "run.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _dir_experiment(run_dir: Path) -> tuple[str, str, Experiment | None]:
    """(name, fingerprint, experiment or None) of what a run directory holds."""
    from .config import config_fingerprint, load_experiment

    meta = read_run_meta(run_dir)
    cfg = run_dir / "config.toml"
    other = None
    if cfg.is_file():
        try:
            other = load_experiment(cfg)
        except InitlabError as e:
            if not meta.get("fingerprint"):
                raise InitlabError(f"output directory {str(run_dir)!r} holds a config.toml that cannot be loaded "
                                   f"({e}); choose another --out directory") from e
    if meta.get("fingerprint"):
        return str(meta.get("name", "?")), str(meta["fingerprint"]), other
    assert other is not None
    return other.name, config_fingerprint(other), other


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flat(v, f"{prefix}[{i}]"))
        out[f"{prefix} (count)"] = len(d)
        return out
    return {prefix: d}


def config_differences(old: Experiment, new: Experiment, *, limit: int = 6) -> list[str]:
    """The settings that differ between two experiments, as ``"train.steps: 60 -> 20"`` (labels and device excluded)."""
    from .config import experiment_to_dict

    a, b = _flat(experiment_to_dict(old)), _flat(experiment_to_dict(new))
    skip = {"name", "description", "train.device"}
    keys = [k for k in dict.fromkeys(list(a) + list(b)) if k not in skip and a.get(k, "<none>") != b.get(k, "<none>")]
    out = [f"{k}: {a.get(k, '<none>')!r} -> {b.get(k, '<none>')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        out.append(f"... and {len(keys) - limit} more")
    return out


def _check_out_dir(run_dir: Path, exp: Experiment, fingerprint: str) -> bool:
    """Whether ``run_dir`` already is a run directory of ``exp``; raise if it holds anything else."""
    if not run_dir.exists():
        return False
    if not run_dir.is_dir():
        raise InitlabError(f"output path {str(run_dir)!r} exists and is not a directory")
    entries = [p for p in run_dir.iterdir() if not p.name.startswith(TMP_PREFIX) and p.name != "run.lock"]
    if not entries:
        return False
    if not (run_dir / "config.toml").is_file() and not (run_dir / "run.json").is_file():
        raise InitlabError(f"output directory {str(run_dir)!r} is not empty and is not an initlab run directory "
                           f"(no config.toml); choose another --out directory")
    name, fp, other = _dir_experiment(run_dir)
    if fp != fingerprint:
        diff = config_differences(other, exp) if other is not None else []
        raise InitlabError(
            f"output directory {str(run_dir)!r} holds another experiment: {name!r} (config fingerprint {fp[:12]}), "
            f"not {exp.name!r} (config fingerprint {fingerprint[:12]})"
            + (f"; they differ in {'; '.join(diff)}" if diff else "")
            + ". Refusing to mix results: use another --out directory, or delete that one to start over")
    return True


# ----------------------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _lock(run_dir: Path) -> Iterator[None]:
    """``run_dir/run.lock`` (O_EXCL): one writer per run directory; a stale lock (dead pid) is taken over."""
    path = run_dir / "run.lock"
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                other = {}
            pid = int(other.get("pid", -1)) if str(other.get("pid", "")).lstrip("-").isdigit() else -1
            same_host = other.get("host") == me["host"]
            if pid > 0 and same_host and pid != os.getpid() and _pid_alive(pid):
                raise InitlabError(f"another initlab process (pid {pid}) is writing to {str(run_dir)!r}; "
                                   f"wait for it to finish (or delete {path} if that process is gone)")
            if pid > 0 and not same_host:
                raise InitlabError(f"{str(run_dir)!r} is locked by pid {pid} on host {other.get('host')!r}; "
                                   f"delete {path} if that run is gone")
            with contextlib.suppress(OSError):
                path.unlink()  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:  # pragma: no cover - lost a race twice
        raise InitlabError(f"could not lock {str(run_dir)!r}: another process keeps taking {path}")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


# ----------------------------------------------------------------------------- units


def _preflight(exp: Experiment) -> None:
    """Fail on an unavailable device or a scenario whose model cannot be built and initialised,
    before anything is written: each scenario's model is built and initialised once on CPU."""
    from .ensemble import _resolve_device, init_member

    _resolve_device(exp.train.device)
    seed = int(exp.train.seeds[0]) if exp.train.seeds else 0
    for sc in exp.scenarios:
        if str(sc.scheme).strip().lower() == "lsuv":
            continue  # data-dependent: needs the first-pass batch
        try:
            init_member(sc, seed)
        except InitlabError as e:
            raise InitlabError(f"scenario {sc.name!r}: {e}") from None


def _run_unit(item: tuple[GroupSpec, Dataset]) -> GroupResult:
    """Module-level (picklable) unit of work for executors: ``run_group(spec, data)``."""
    from .ensemble import run_group

    spec, data = item
    return run_group(spec, data)


def _done_members(run_dir: Path, fingerprint: str) -> set[tuple[str, int]]:
    done = set()
    parts = run_dir / "parts"
    if not parts.is_dir():
        return done
    for mj in parts.glob("*/seed*/member.json"):
        try:
            meta = json.loads(mj.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if meta.get("fingerprint") != fingerprint:
            continue
        done.add((str(meta["scenario"]), int(meta["seed"])))
    return done


def _first_pass_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    from .._probe import COLUMNS

    cols = list(_FIRST_PASS_LEAD) + [c for c in COLUMNS if c not in _FIRST_PASS_LEAD]
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def _commit_member(run_dir: Path, fingerprint: str, scenario: Any, seed: int, result: GroupResult,
                   unit_index: int) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Write one member's results as ``parts/<scenario>/seed<k>/`` (atomically, all files at once).

    Returns the member's first-pass arrays and metrics rows (for its TensorBoard log)."""
    key = (scenario.name, int(seed))
    metrics = [{c: r[c] for c in METRICS_COLUMNS} for r in result.metrics
               if (r["scenario"], int(r["seed"])) == key]
    first_pass = [{**r, "scenario": scenario.name, "seed": int(seed), "scheme": str(scenario.scheme)}
                  for r in result.first_pass if (r.get("scenario"), int(r.get("seed", -1))) == key]
    values = {k: np.asarray(v) for k, v in result.first_pass_values.get(key, {}).items()}
    diverged = [d for d in result.diverged if (d["scenario"], int(d["seed"])) == key]
    meta = {
        "scenario": scenario.name, "seed": int(seed), "scheme": str(scenario.scheme),
        "activation": str(scenario.activation), "fingerprint": fingerprint,
        "diverged_step": int(diverged[0]["step"]) if diverged else None,
        "unit": unit_index, "unit_wall_s": float(result.wall_s),
        "engine": str(getattr(result, "engine", "")), "device": str(getattr(result, "device", "")),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    target = member_dir(run_dir, scenario.name, seed)
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "metrics.csv").write_text(csv_text(metrics, METRICS_COLUMNS), encoding="utf-8")
        (tmp / "first_pass.csv").write_text(csv_text(first_pass, _first_pass_columns(first_pass)), encoding="utf-8")
        with open(tmp / "values.npz", "wb") as f:
            np.savez_compressed(f, **values)
        (tmp / "member.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return values, metrics


def _write_tb(run_dir: Path, scenario: str, seed: int, values: dict[str, np.ndarray] | None = None,
              metrics: Sequence[dict[str, Any]] | None = None, *, replace: bool = True) -> None:
    """The member's TensorBoard log, from ``values`` and ``metrics`` or else from its recorded part."""
    from .tb import write_member_events

    if values is None or metrics is None:
        part = member_dir(run_dir, scenario, seed)
        _, metrics = read_csv(part / "metrics.csv")
        with np.load(part / "values.npz") as z:
            values = {k: z[k] for k in z.files}
    write_member_events(_tb_dir(run_dir, scenario, seed), values, metrics, replace=replace)


def _merge(run_dir: Path, members: Sequence[tuple[str, int]]) -> tuple[int, int]:
    """Rebuild metrics.csv and first_pass.csv from the finished members' parts, in ``members`` order."""
    metrics: list[dict[str, str]] = []
    fp_rows: list[dict[str, str]] = []
    fp_cols: list[str] = []
    for sc, seed in members:
        part = member_dir(run_dir, sc, seed)
        if not (part / "member.json").is_file():
            continue
        _, rows = read_csv(part / "metrics.csv")
        metrics.extend(rows)
        cols, rows = read_csv(part / "first_pass.csv")
        for c in cols:
            if c not in fp_cols:
                fp_cols.append(c)
        fp_rows.extend(rows)
    atomic_write_csv(run_dir / "metrics.csv", metrics, METRICS_COLUMNS)
    atomic_write_csv(run_dir / "first_pass.csv", fp_rows, fp_cols or list(_FIRST_PASS_LEAD))
    return len(metrics), len(fp_rows)


def _write_meta(run_dir: Path, exp: Experiment, fingerprint: str, status: str, members: Sequence[tuple[str, int]],
                wall_s: float) -> dict[str, Any]:
    from .. import __version__

    old = read_run_meta(run_dir)
    diverged, done = [], 0
    for sc, seed in members:
        mj = member_dir(run_dir, sc, seed) / "member.json"
        if not mj.is_file():
            continue
        m = json.loads(mj.read_text(encoding="utf-8"))
        done += 1
        if m.get("diverged_step") is not None:
            diverged.append({"scenario": sc, "seed": seed, "step": m["diverged_step"]})
    meta = {
        "format": _FORMAT, "name": exp.name, "fingerprint": fingerprint, "initlab": __version__,
        "created": old.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S"),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "status": status, "members_total": len(members), "members_done": done,
        "diverged": diverged, "wall_s": float(old.get("wall_s", 0.0)) + wall_s,
    }
    atomic_write_text(run_dir / "run.json", json.dumps(meta, indent=1) + "\n")
    return meta


def _clear_results(run_dir: Path) -> None:
    """Remove what a previous run of the same experiment wrote (``resume=False``)."""
    import shutil

    for name in ("parts", "tb", "figures"):
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
    for name in ("metrics.csv", "first_pass.csv", "report.html", "run.json"):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()


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


# ----------------------------------------------------------------------------- the run


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
    from .config import config_fingerprint, experiment_to_toml
    from .ensemble import GroupSpec, plan_groups, run_group

    t0 = time.perf_counter()
    run_dir = Path(out_dir)
    fingerprint = config_fingerprint(exp)
    toml_text = experiment_to_toml(exp)
    existing = _check_out_dir(run_dir, exp, fingerprint)

    members = [(sc.name, int(seed)) for sc in exp.scenarios for seed in exp.train.seeds]
    scen_of = {sc.name: sc for sc in exp.scenarios}
    if existing and not resume:
        with _lock(run_dir):
            _clear_results(run_dir)
    done = _done_members(run_dir, fingerprint) if existing else set()
    done &= set(members)
    groups = plan_groups(exp, max_members=max_members)
    units: list[GroupSpec] = []
    for g in groups:
        todo = tuple(m for m in g.members if m.key not in done)
        if todo:
            units.append(GroupSpec(model=g.model, train=g.train, members=todo))

    if units:
        _preflight(exp)
    if units and data is None:
        from .data import load_dataset

        data = load_dataset(exp.data, download=download)

    if progress is True:
        progress = TqdmProgress()
    elif progress is False:
        progress = None
    callback: Callable[[RunProgress], Any] | None = progress  # type: ignore[assignment]

    run_dir.mkdir(parents=True, exist_ok=True)
    steps = int(exp.train.steps)
    status = "running"
    wall = 0.0
    units_run = 0
    diverged: list[dict[str, Any]] = []
    report_path: Path | None = None
    figures: list[Path] = []
    with _lock(run_dir):
        clean_tmp(run_dir)
        cfg_path = run_dir / "config.toml"
        if not cfg_path.is_file() or cfg_path.read_text(encoding="utf-8") != toml_text:
            atomic_write_text(cfg_path, toml_text)
        if units or not (run_dir / "run.json").is_file():
            _write_meta(run_dir, exp, fingerprint, "running", members, 0.0)
        n_done = len(done)
        meta_written = False
        try:
            if callback is not None:
                callback(RunProgress("plan", -1, len(units), 0, steps, (), n_done, len(members)))

            def commit(i: int, unit: GroupSpec, result: GroupResult) -> None:
                nonlocal n_done, units_run
                for m in unit.members:
                    values, rows = _commit_member(run_dir, fingerprint, m.scenario, m.seed, result, i)
                    _write_tb(run_dir, m.scenario.name, m.seed, values, rows)
                    n_done += 1
                _merge(run_dir, members)
                units_run += 1
                if callback is not None:
                    callback(RunProgress("unit_done", i, len(units), steps, steps, tuple(unit.keys), n_done, len(members)))

            t_train = time.perf_counter()
            try:
                if executor is None:
                    for i, unit in enumerate(units):
                        keys = tuple(unit.keys)
                        if callback is not None:
                            callback(RunProgress("unit_start", i, len(units), 0, steps, keys, n_done, len(members)))

                            def on_step(n: int, _i: int = i, _keys: tuple = keys) -> None:
                                callback(RunProgress("step", _i, len(units), int(n), steps, _keys, n_done, len(members)))
                        else:
                            on_step = None  # type: ignore[assignment]
                        result = run_group(unit, data, progress=on_step)  # type: ignore[arg-type]
                        commit(i, unit, result)
                else:
                    results = executor.map(_run_unit, [(u, data) for u in units])
                    for i, (unit, result) in enumerate(zip(units, results)):
                        commit(i, unit, result)
            finally:
                wall = time.perf_counter() - t_train if units else 0.0

            # logs whose writing was interrupted after the member was recorded
            for sc, seed in members:
                if (member_dir(run_dir, sc, seed) / "member.json").is_file() and not _tb_dir(run_dir, sc, seed).is_dir():
                    _write_tb(run_dir, sc, seed, replace=False)
            if not units and not (run_dir / "metrics.csv").is_file():
                _merge(run_dir, members)
            status = "complete" if n_done == len(members) else "running"
            meta = _write_meta(run_dir, exp, fingerprint, status, members, wall)
            meta_written = True
            diverged = list(meta["diverged"])
            if status == "complete" and report:
                from .report import write_report

                need = units_run > 0 or not (run_dir / "report.html").is_file()
                if need:
                    report_path = write_report(run_dir)
                else:
                    report_path = run_dir / "report.html"
                figures = sorted((run_dir / "figures").glob("*.png"))
            if callback is not None:
                callback(RunProgress("done", -1, len(units), steps, steps, (), n_done, len(members)))
        except BaseException:
            with contextlib.suppress(Exception):
                _write_meta(run_dir, exp, fingerprint, "interrupted", members, 0.0 if meta_written else wall)
            if isinstance(callback, TqdmProgress):
                callback.close()
            raise
    return RunSummary(run_dir=run_dir, name=exp.name, fingerprint=fingerprint, members_total=len(members),
                      members_run=n_done - len(done),
                      members_skipped=len(done), units_run=units_run, diverged=diverged,
                      wall_s=time.perf_counter() - t0, report=report_path, figures=figures)
