"""How many threads the lab gives torch: physical cores, capped by the CPUs this process may use
(affinity, cgroup quota), by how busy the machine is (the 1-minute load average), and by the work.

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
from pathlib import Path

from .._engine import using_threads
from .._errors import InitlabError

__all__ = ["choose_threads", "using_threads", "one_thread", "usable_cpus", "physical_cores", "idle_cpus"]

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


def idle_cpus(load: float | None = None) -> int:
    """Usable CPUs not taken by other runnable work: ``usable - round(load average)``, at least 1.
    ``load`` defaults to the 1-minute load average (0 where the platform has none)."""
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