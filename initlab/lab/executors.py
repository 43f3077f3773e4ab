"""Where the units of work run: in this process, in a local process pool, or on a Ray cluster.

A unit of work is one group of members (:class:`~initlab.lab.training.GroupSpec`) trained by
:func:`~initlab.lab.training.run_group`. :func:`initlab.lab.run.run_experiment` hands the
executor :class:`UnitTask` objects and an ``emit`` callable, and the executor's
``run_units(tasks, emit, retry)`` yields ``(task, result)`` as units finish, in any order:

- **events**: a unit reports as it trains, through :func:`execute_unit`: ``("start", index,
  attempt, worker)``, then at each log step ``("log", index, attempt, event)`` (new metrics rows,
  the first-pass arrays, weight histograms: see :mod:`initlab.lab.training.group`) and, at most
  every ``checkpoint_every`` seconds and at the last log step, ``("checkpoint", index, attempt,
  state)``. The driver writes TensorBoard events, moves the progress bar and saves checkpoints
  from them, in its own process, so remote work is live and the run directory only needs to be
  reachable from the driver. Every event of a unit reaches ``emit`` before its result is yielded.
- **faults**: when a unit fails (its worker process died, or it raised), the executor calls
  ``retry(task, error, started)``, which returns the task to submit instead (the next attempt,
  continuing from the unit's last checkpoint) or None (the unit has failed for good: it is
  recorded with its error and the others go on). ``started`` says whether the unit had begun
  (a pool that breaks also fails the units that were only queued; they are resubmitted as they
  were).

Executors:

- :class:`InProcess`: one unit after the other in this process (the default). A unit's exception
  propagates (Ctrl-C stops the run; the finished units stay recorded).
- :class:`ProcessPool`: ``workers`` spawned processes on this machine (``initlab run --executor
  process --workers N``), each with ``threads`` torch threads (default: the machine's cores
  divided among the workers). Events travel through a multiprocessing manager queue.
- :class:`RayExecutor`: a Ray cluster (``--executor ray [--address auto|ray://HOST:PORT]``; the
  address defaults to ``RAY_ADDRESS``, else a local Ray instance is started). Each unit is a Ray
  task asking for ``cpus_per_unit`` CPUs (and one GPU when its ``train.device`` is cuda), with
  as many torch threads; the data set is put in Ray's object store once; results come back
  through the object store and events through a Ray queue actor, so worker nodes need no shared
  storage. ``ray`` is imported only here, when this executor is used.

Any object with ``map(fn, items)`` (``concurrent.futures`` executors) still works as before:
it is given the module-level :func:`~initlab.lab.training.run_unit` and picklable ``(GroupSpec,
Dataset)`` items, without live events or retries.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from .._errors import InitlabError, unknown_choice
from .metrics import Metric, register_metric, registered, unregister_metric
from .training import GroupResult, GroupSpec, run_group

__all__ = ["Executor", "InProcess", "ProcessPool", "RayExecutor", "UnitTask", "execute_unit", "make_executor",
           "EXECUTORS"]

EXECUTORS = ("inprocess", "process", "ray")


class Executor(Protocol):
    """Anything with ``map(fn, items)`` yielding ``fn(item)`` for each item, in order."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], /) -> Iterable[Any]: ...  # pragma: no cover


Emit = Callable[[tuple], Any]
Retry = Callable[["UnitTask", str, bool], "UnitTask | None"]


@dataclass(frozen=True)
class UnitTask:
    """One unit of work as it travels to a worker: the group, the data, where to continue from.

    ``index``: the unit's position in the run's list of units to train; ``attempt``: 0, 1, ...
    (events of an older attempt are ignored); ``resume``: a training state to continue from (a
    checkpoint) or None; ``histograms_every``: weight histograms every that many log steps (0:
    none); ``checkpoint_every``: seconds between checkpoint events (None: none);
    ``threads``: the torch threads the unit trains with (the run passes its own count: matrix
    products and sums split their work by thread count, so the last bits of a result depend on it,
    and a unit trained with the driver's count gives the in-process numbers wherever it runs);
    ``metrics``: the driver's computed metrics (:mod:`initlab.lab.metrics`), which a worker
    registers in the same order before training, so that a metric registered at run time is
    computed on every executor (its ``compute`` must be importable there: a module-level function).
    """

    index: int
    attempt: int
    spec: GroupSpec
    data: Any
    resume: dict[str, Any] | None = None
    histograms_every: int = 1
    checkpoint_every: float | None = 5.0
    threads: int | None = None
    metrics: tuple[Metric, ...] = ()

    @property
    def cuda(self) -> bool:
        return str(self.spec.train.device).startswith("cuda")


def _worker_name() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


class _Checkpointer:
    """Emits a unit's training state at its log steps: at most every ``every`` seconds, and always at
    the last step (so that an interruption while its members are committed costs nothing)."""

    def __init__(self, task: UnitTask, emit: Emit) -> None:
        self.task, self.emit, self.last = task, emit, time.monotonic()
        self.steps = int(task.spec.train.steps)

    def wants(self, step: int) -> bool:
        """Whether a state at ``step`` would be emitted now (the loop builds only the states it sends)."""
        every = self.task.checkpoint_every
        return every is not None and (time.monotonic() - self.last >= every or int(step) >= self.steps)

    def __call__(self, state: dict[str, Any]) -> None:
        every = self.task.checkpoint_every
        if every is None:
            return
        now = time.monotonic()
        if now - self.last >= every or int(state["step"]) >= self.steps:
            self.emit(("checkpoint", self.task.index, self.task.attempt, state))
            self.last = time.monotonic()


def _sync_metrics(wanted: tuple[Metric, ...]) -> None:
    """Make this process's computed metrics the driver's, in the driver's order (a no-op in the driver)."""
    have = [m.name for m in registered() if m.compute is not None]
    if have == [m.name for m in wanted]:
        return
    for name in have:
        unregister_metric(name)
    for m in wanted:
        register_metric(m)


def execute_unit(task: UnitTask, emit: Emit, data: Any = None) -> GroupResult:
    """Train one unit (``run_group``), reporting its events through ``emit`` (see the module docstring)."""
    _sync_metrics(task.metrics)
    emit(("start", task.index, task.attempt, _worker_name()))

    def on_log(event: dict[str, Any]) -> None:
        emit(("log", task.index, task.attempt, event))

    before = torch.get_num_threads()
    if task.threads and task.threads != before:
        torch.set_num_threads(int(task.threads))
    try:
        return run_group(task.spec, task.data if data is None else data, checkpoint=_Checkpointer(task, emit),
                         resume=task.resume, on_log=on_log, histograms_every=task.histograms_every)
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}" if str(e).strip() else type(e).__name__
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


# ----------------------------------------------------------------------------- in process


class InProcess:
    """Runs the units one after the other in this process (nothing needs to pickle)."""

    workers = 1

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], /) -> Iterator[Any]:
        return (fn(item) for item in items)

    def run_units(self, tasks: Iterable[UnitTask], emit: Emit, retry: Retry) -> Iterator[tuple[UnitTask, GroupResult]]:
        for task in tasks:
            yield task, execute_unit(task, emit)


# ----------------------------------------------------------------------------- process pool

_CHANNEL: Any = None


def _pool_init(channel: Any) -> None:
    """A pool worker's start: where its events go."""
    global _CHANNEL
    _CHANNEL = channel


def _pool_unit(task: UnitTask) -> GroupResult:
    return execute_unit(task, _CHANNEL.put)


class ProcessPool:
    """Runs the units in ``workers`` processes on this machine (spawned: a fresh interpreter each).

    ``threads``: torch threads per unit (default: the run's own count, which gives the in-process
    numbers bit for bit; fewer threads, e.g. cores // workers, avoid oversubscribing the cores but
    may change the last bits of the results). A worker process
    that dies (killed, out of memory) breaks the pool: the pool is started again and the units that
    were running are retried (``retry``), continuing from their last checkpoint.
    """

    def __init__(self, workers: int | None = None, *, threads: int | None = None) -> None:
        n = (os.cpu_count() or 1) if workers is None else workers
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InitlabError(f"--workers: expected a positive number of worker processes, got {workers!r}")
        self.workers = n
        self.threads = None if threads is None else max(1, int(threads))

    def run_units(self, tasks: Iterable[UnitTask], emit: Emit, retry: Retry) -> Iterator[tuple[UnitTask, GroupResult]]:
        ctx = mp.get_context("spawn")
        manager = ctx.Manager()
        channel = manager.Queue()
        started: set[tuple[int, int]] = set()

        def drain() -> None:
            while True:
                try:
                    ev = channel.get_nowait()
                except Exception:  # noqa: BLE001 - queue.Empty (from the manager's queue module)
                    return
                if ev[0] == "start":
                    started.add((ev[1], ev[2]))
                emit(ev)

        todo = list(tasks)
        pool = None
        try:
            while todo:
                pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_pool_init, initargs=(channel,))
                pending = {pool.submit(_pool_unit, self._threaded(t)): t for t in todo}
                todo = []
                broken = False
                while pending:
                    done, _ = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                    drain()
                    for f in done:
                        task = pending.pop(f)
                        try:
                            result = f.result()
                        except BrokenProcessPool:
                            broken = True
                            todo.append(task)
                            continue
                        except Exception as e:  # noqa: BLE001 - the unit failed: retried or reported
                            again = retry(task, _error_text(e), True)
                            if again is not None:
                                pending[pool.submit(_pool_unit, self._threaded(again))] = again
                            continue
                        yield task, result
                    if broken:
                        break
                if broken:
                    drain()
                    pool.shutdown(wait=True, cancel_futures=True)
                    todo = self._after_break(todo + list(pending.values()), started, retry)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            manager.shutdown()

    def _threaded(self, task: UnitTask) -> UnitTask:
        return task if self.threads is None else replace(task, threads=self.threads)

    @staticmethod
    def _after_break(tasks: list[UnitTask], started: set[tuple[int, int]], retry: Retry) -> list[UnitTask]:
        """The tasks to submit to a new pool: those that had started are retried (their worker, or a
        neighbour's, died), the others go again as they were."""
        out = []
        for t in tasks:
            if (t.index, t.attempt) in started:
                again = retry(t, "a worker process died (killed or out of memory)", True)
                if again is not None:
                    out.append(again)
            else:
                out.append(t)
        return out


# ----------------------------------------------------------------------------- Ray


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InitlabError("the Ray executor needs Ray: pip install 'initlab[ray]'") from None
    return ray


def _ray_unit(task: UnitTask, data: Any, channel: Any) -> GroupResult:
    """The body of a unit's Ray task: its events go to the queue actor."""
    return execute_unit(task, channel.put, data)


class RayExecutor:
    """Runs the units as Ray tasks on a Ray cluster (see the module docstring).

    ``address``: "auto" (the cluster this machine belongs to), "ray://HOST:PORT" (Ray Client), a
    ``HOST:PORT`` of a head node, or None (``RAY_ADDRESS`` when set, else a new local Ray instance
    that ends with the run). ``cpus_per_unit``: the CPUs each unit asks Ray for; ``threads``: its
    torch threads (default: the run's own count, for the in-process numbers bit for bit).
    Ray itself does not retry a unit (``max_retries=0``): a unit that fails is resubmitted by the run
    (``retry``), so it continues from its last checkpoint.
    """

    def __init__(self, address: str | None = None, *, cpus_per_unit: int = 1, threads: int | None = None) -> None:
        if isinstance(cpus_per_unit, bool) or not isinstance(cpus_per_unit, int) or cpus_per_unit < 1:
            raise InitlabError(f"cpus_per_unit: expected a positive integer, got {cpus_per_unit!r}")
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.cpus_per_unit = cpus_per_unit
        self.threads = None if threads is None else max(1, int(threads))
        self.workers = 0

    def _connect(self, ray: Any) -> bool:
        """Connect to the cluster (True when this call started Ray, so it shuts it down again)."""
        if ray.is_initialized():
            return False
        extra = {} if self.address else {"include_dashboard": False}
        try:
            ray.init(address=self.address, logging_level="ERROR", log_to_driver=False, **extra)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = self.address or "a new local instance"
            raise InitlabError(f"--address: cannot connect to the Ray cluster at {where!r} ({_error_text(e)}); start "
                               "one with `ray start --head`, or pass --address auto|ray://HOST:PORT") from None
        return True

    def run_units(self, tasks: Iterable[UnitTask], emit: Emit, retry: Retry) -> Iterator[tuple[UnitTask, GroupResult]]:
        ray = _import_ray()
        from ray.util.queue import Queue

        started_here = self._connect(ray)
        self.workers = int(ray.cluster_resources().get("CPU", 1)) // self.cpus_per_unit
        channel = Queue(actor_options={"num_cpus": 0})
        remote = ray.remote(max_retries=0)(_ray_unit)
        data_refs: dict[int, Any] = {}
        started: set[tuple[int, int]] = set()

        def submit(t: UnitTask) -> Any:
            ref = data_refs.setdefault(id(t.data), ray.put(t.data))
            opts = {"num_cpus": self.cpus_per_unit, "num_gpus": 1 if t.cuda else 0}
            sent = replace(t, data=None) if self.threads is None else replace(t, data=None, threads=self.threads)
            return remote.options(**opts).remote(sent, ref, channel)

        def drain() -> None:
            while not channel.empty():
                for ev in channel.get_nowait_batch(channel.qsize()):
                    if ev[0] == "start":
                        started.add((ev[1], ev[2]))
                    emit(ev)

        try:
            pending = {submit(t): t for t in tasks}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.1)
                drain()
                for ref in done:
                    task = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - worker died or the unit raised: retried or reported
                        drain()
                        again = retry(task, _ray_error(e), (task.index, task.attempt) in started)
                        if again is not None:
                            pending[submit(again)] = again
                        continue
                    drain()
                    yield task, result
        finally:
            for ref in list(locals().get("pending", {})):
                ray.cancel(ref, force=True)
            channel.shutdown()
            if started_here:
                ray.shutdown()


def _ray_error(e: BaseException) -> str:
    """A Ray task's failure in one line: the unit's own exception when it raised, else what happened."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return _error_text(cause)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


# ----------------------------------------------------------------------------- by name


def make_executor(name: str | None, *, workers: int | None = None, address: str | None = None,
                  threads: int | None = None) -> Any:
    """The executor ``initlab run --executor NAME`` means: "inprocess" (default), "process", "ray"."""
    key = "inprocess" if name is None else str(name).strip().lower().replace("-", "")
    if key not in EXECUTORS:
        raise unknown_choice("executor", name, EXECUTORS)
    if key != "process" and workers is not None:
        raise InitlabError(f"--workers: only with --executor process (got --executor {key})")
    if key != "ray" and address is not None:
        raise InitlabError(f"--address: only with --executor ray (got --executor {key})")
    if key == "process":
        return ProcessPool(workers, threads=threads)
    if key == "ray":
        _import_ray()
        return RayExecutor(address, threads=threads)
    return InProcess()
