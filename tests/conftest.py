"""Test-wide settings: models are built from their libraries' code and default configs, never downloaded."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: the torch thread count of the runs that tests compare bit for bit (see ``fixed_threads``)
TEST_THREADS = "2"


@contextmanager
def _omp_threads(n: str):
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = n
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old


@pytest.fixture(scope="module")
def fixed_threads():
    """One torch thread count for every run here (the default follows the machine's idle cores, which change
    between runs; results are bit-identical between runs with the same count)."""
    with _omp_threads(TEST_THREADS):
        yield


@pytest.fixture(scope="session")
def small_reference(tmp_path_factory):
    """The uninterrupted in-process run of ``rundir_compare.small()`` (``max_members=SMALL_MAX_MEMBERS``, no
    report, the ``fixed_threads`` count), computed once for every test that compares another executor's or an
    interrupted run's directory with it (tests/test_executors.py, tests/test_ray_cluster.py). Read only."""
    from initlab.lab.run import run_experiment

    from rundir_compare import SMALL_MAX_MEMBERS, small

    out = tmp_path_factory.mktemp("small-ref") / "run"
    with _omp_threads(TEST_THREADS):
        summary = run_experiment(small(), out, max_members=SMALL_MAX_MEMBERS, report=False)
    assert summary.complete
    return out


_LOCAL_RAY = {"started": False}


@pytest.fixture
def local_ray():
    """Ray on this machine (127.0.0.1, one CPU, no dashboard) in the test process: started by the first test that
    asks for it and kept for the next ones (each start costs seconds), shut down at the end of the session or
    when a test connects Ray elsewhere (tests/test_ray_cluster.py calls :func:`stop_local_ray` first)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
        _LOCAL_RAY["started"] = True
    return ray


def stop_local_ray() -> None:
    """Shut down the Ray that :func:`local_ray` started, if it is still up."""
    if _LOCAL_RAY["started"]:
        import ray

        ray.shutdown()
        _LOCAL_RAY["started"] = False


def pytest_sessionfinish(session, exitstatus):
    if "ray" in sys.modules:
        stop_local_ray()
