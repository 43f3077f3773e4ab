"""How many threads the lab gives torch: physical cores, capped by the CPUs this process may use
(affinity, cgroup quota), by how busy other processes keep them right now (measured over 50 ms;
the 1-minute load average where that cannot be measured), and by the work.

On a shared machine an OpenMP parallel region waits at its barrier for every one of its threads;
a thread that has to queue behind other processes for a time slice (several ms) stalls every small
op of the batched trainer, which then runs several times slower than on one thread. Using only the
cores that are idle avoids that; the results do not depend on the thread count (the lab's
metrics are bit-identical for any ``torch.get_num_threads()``).

:func:`choose_threads` is the policy (also per worker, for process pools and Ray actors:
``choose_threads(workers=k)``), :func:`using_threads` applies it for the duration of a block.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from .._engine import using_threads
from .._errors import InitlabError

__all__ = ["choose_threads", "using_threads", "one_thread", "usable_cpus", "physical_cores", "idle_cpus",
           "busy_elsewhere", "busy_now"]

# below this many floating-point operations per parallel op, an extra thread costs more than it saves
MIN_FLOPS_PER_THREAD = 2e6


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 / v1 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, quota) if quota else n)


def _cgroup_quota() -> int | None:
    """``floor(quota / period)`` of the cgroup CPU limit, or None when there is none."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return max(1, int(text[0]) // int(text[1]))
    except (OSError, ValueError, IndexError):
        pass
    try:
        q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if q > 0 and p > 0:
            return max(1, q // p)
    except (OSError, ValueError):
        pass
    return None


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (hyper-threads counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return usable_cpus()
    cores = set()
    for c in cpus:
        base = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add((base / "physical_package_id").read_text().strip() + ":" + (base / "core_id").read_text().strip())
        except OSError:
            cores.add(str(c))
    return max(1, min(len(cores), usable_cpus()))


def _jiffies(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks of ``cpus`` since boot, from ``/proc/stat``'s per-CPU lines; None
    where there is no such file (not Linux) or it names none of ``cpus``."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    seen = False
    for line in lines:
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        ticks = [int(v) for v in rest.split()[:8]]  # user nice system idle iowait irq softirq steal
        if len(ticks) < 5:
            continue
        seen = True
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if seen and total else None


def busy_elsewhere(window: float = 0.05) -> float | None:
    """How many of this process's CPUs other processes keep busy right now: the busy share of their
    clock ticks over ``window`` seconds, times the number of CPUs, less this process's own CPU time in
    that window (its idle OpenMP threads may still be spinning). None where ``/proc/stat`` is not
    available. Unlike the load average (a one-minute mean), it does not count work that has already
    stopped, such as this process's own previous command."""
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    before, own0, t0 = _jiffies(cpus), os.times(), time.monotonic()
    if before is None:
        return None
    time.sleep(window)
    after, own1, t1 = _jiffies(cpus), os.times(), time.monotonic()
    if after is None or after[1] <= before[1]:
        return None
    share = (after[0] - before[0]) / (after[1] - before[1])
    own = (own1.user + own1.system - own0.user - own0.system) / max(t1 - t0, 1e-9)
    return max(0.0, share * len(cpus) - own)


_measured: list[tuple[float, float | None]] = []  # the last (time.monotonic(), busy_elsewhere())


def busy_now(max_age: float = 2.0) -> float | None:
    """:func:`busy_elsewhere`, or its last value when it was measured less than ``max_age`` seconds
    ago (the thread policy and the figure workers' priority read the same measurement)."""
    now = time.monotonic()
    if _measured and now - _measured[-1][0] < max_age:
        return _measured[-1][1]
    value = busy_elsewhere()
    _measured[:] = [(time.monotonic(), value)]
    return value


def idle_cpus(load: float | None = None) -> int:
    """Usable CPUs not taken by other runnable work: ``usable - round(busy)``, at least 1, where
    ``busy`` is ``load`` when given, else :func:`busy_now` (measured over 50 ms), else
    the 1-minute load average (0 where the platform has none)."""
    if load is None:
        load = busy_now()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, usable_cpus() - int(math.floor(load + 0.5)))


def choose_threads(requested: int | None = None, *, workers: int = 1, flops: float | None = None,
                   load: float | None = None) -> int:
    """Threads for torch in each of ``workers`` workers.

    ``requested`` (``--threads N``) wins when given. Otherwise ``OMP_NUM_THREADS`` in the environment
    (the user's own choice) wins; otherwise ``min(physical cores, idle CPUs) // workers``, and no
    more than ``flops / MIN_FLOPS_PER_THREAD`` when ``flops`` (the work of one parallel op) is given.
    Always at least 1."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise InitlabError(f"threads: expected a positive integer, got {requested!r}")
        return requested
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InitlabError(f"workers: expected a positive integer, got {workers!r}")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    n = min(physical_cores(), idle_cpus(load)) // workers
    if flops is not None:
        n = min(n, int(flops // MIN_FLOPS_PER_THREAD))
    return max(1, n)




def one_thread() -> using_threads:
    """One torch thread for the block: the lab's data-dependent initialisation (``auto``'s correction
    pass, LSUV) and its first pass run under it. Their forward passes and statistics are sums whose
    last bits depend on how torch splits them over threads, and the run directory must not depend on
    ``--threads``, on how busy the machine was, or on which executor ran the unit (a Ray worker starts
    with one thread, a local process with the machine's count). Training is bit-identical for any count
    and keeps the policy's. The cost is one batch through each model on one core."""
    return using_threads(1)