"""The Ray executor on a real local cluster: a head and a second worker node started with ``ray start``
(one CPU each, loopback only), one cluster for the whole module, stopped by the finaliser. A small preset
runs through it while a worker process is killed during a unit; the run directory equals the in-process one.

Needs the ``ray`` extra (CI installs it through the ``test`` extra); skipped cleanly without it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("fixed_threads")]

from initlab.lab.config import with_overrides  # noqa: E402
from initlab.lab.executors import RayExecutor  # noqa: E402
from initlab.lab.run import run_experiment  # noqa: E402

from conftest import stop_local_ray  # noqa: E402
from rundir_compare import SMALL_MAX_MEMBERS, KillOnce, compare_run_dirs, small  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_MEMBERS = SMALL_MAX_MEMBERS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict) -> None:
    r = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=180)
    if r.returncode:
        raise RuntimeError(f"ray {args[0]} failed: {r.stdout.decode(errors='replace')[-3000:]}")


def _cluster_pids(temp_dir: str) -> list[int]:
    """The processes of this cluster (Linux: /proc): the GCS server and raylets name its temp dir on their
    command line; the Python processes Ray starts (agents, workers) rename themselves but keep the
    environment of ``ray start``, which holds ``INITLAB_TEST_RAY=<temp_dir>``."""
    marker = f"INITLAB_TEST_RAY={temp_dir}\0".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "environ").read_bytes() + b"\0" or temp_dir.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _stop(temp_dir: str) -> None:
    """``ray stop``, for this cluster only (``ray stop`` itself stops every Ray cluster of the machine, a
    developer's own included): SIGTERM to each of this cluster's processes, a grace period of 3 s, then SIGKILL to
    what is left."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.0)):
        for pid in _cluster_pids(temp_dir):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        end = time.monotonic() + wait
        while time.monotonic() < end and _cluster_pids(temp_dir):
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster():
    """``ray start --head`` and a second node, one CPU each, on 127.0.0.1; yields the head's address."""
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    # `ray start` turns token authentication on, which a driver reads when it imports ray: a loopback-only
    # test cluster goes without (RAY_AUTH_MODE=disabled, the driver's own default)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_USAGE_STATS_ENABLED": "0", "INITLAB_TEST_RAY": temp_dir, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    common = ["--num-cpus=1", "--num-gpus=0", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
              f"--temp-dir={temp_dir}"]
    try:
        _ray("start", "--head", f"--port={port}", "--include-dashboard=false",
             f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
             f"--metrics-export-port={_free_port()}", *common, env=env)
        _ray("start", f"--address=127.0.0.1:{port}", f"--dashboard-agent-listen-port={_free_port()}",
             f"--metrics-export-port={_free_port()}", *common, env=env)
        import ray

        stop_local_ray()  # this process joins this cluster instead (one Ray connection per process)
        # the driver joins as a client of 127.0.0.1 (it would otherwise look for a node at the host's address);
        # the executor finds Ray initialised and uses that connection
        ray.init(address=f"127.0.0.1:{port}", _node_ip_address="127.0.0.1", logging_level="ERROR",
                 log_to_driver=False)
        yield f"127.0.0.1:{port}"
        ray.shutdown()
    finally:
        _stop(temp_dir)


def test_ray_cluster_gives_the_in_process_run_directory_after_a_killed_worker(cluster, tmp_path, small_reference):
    import ray

    ref = small_reference  # the in-process run (conftest.py: computed once, shared with tests/test_executors.py)
    kill = KillOnce()
    out = tmp_path / "ray"
    t0 = time.perf_counter()
    summary = run_experiment(small(), out, max_members=MAX_MEMBERS, report=False, progress=kill,
                             executor=RayExecutor(cluster), checkpoint_every=0)
    wall = time.perf_counter() - t0
    assert ray.is_initialized()  # the executor used the driver's connection, and left it open
    assert len(kill.killed) == 1 and summary.retries >= 1, (kill.killed, summary.retries)
    assert summary.complete and not summary.failed and summary.members_run == 5
    compared, diffs = compare_run_dirs(ref, out)
    print(f"ray: {wall:.1f} s, kills {len(kill.killed)}, retries {summary.retries}, files compared {compared}, "
          f"differences {len(diffs)}")
    assert compared == 2 + 5 and diffs == []


def test_units_spread_over_both_nodes(cluster, tmp_path):
    """Two single-CPU nodes: units run on both at once (the head's and the second node's raylets)."""
    seen = set()

    def progress(ev):
        if ev.event == "unit_start":
            seen.add(ev.worker)

    summary = run_experiment(with_overrides(small(), {"train.steps": 10, "train.log_every": 10}), tmp_path / "r",
                             max_members=1, report=False, progress=progress, executor=RayExecutor(cluster))
    assert summary.complete and len(seen) >= 2
