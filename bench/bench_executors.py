"""Benchmark: one preset's wall time in this process, on a local process pool and on a Ray cluster, back to
back in the same driver process, with the run directories compared file for file.

Issue #11 asks, for the ``deep`` preset: in-process vs process pool (2 workers) vs Ray (2 single-CPU
nodes). The Ray cluster is started here (a head and a second node with ``ray start``, one CPU each, on
127.0.0.1) and stopped at the end, this cluster only. The runs go one after the other on the same machine,
so they see comparable load; the script also prints the load average before each run. Workers train with
the driver's torch thread count (the default, which gives bit-identical results).

    python bench/bench_executors.py [--preset deep] [--workers 2] [--out DIR] [--skip-ray]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from initlab.lab.config import load_experiment
from initlab.lab.executors import ProcessPool, RayExecutor
from initlab.lab.run import run_experiment

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids(temp_dir: str) -> list[int]:
    marker, out = f"INITLAB_BENCH_RAY={temp_dir}\0".encode(), []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "environ").read_bytes() + b"\0" or temp_dir.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def start_cluster() -> tuple[str, str]:
    temp_dir = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_USAGE_STATS_ENABLED": "0", "INITLAB_BENCH_RAY": temp_dir, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    common = ["--num-cpus=1", "--num-gpus=0", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
              f"--temp-dir={temp_dir}"]
    ray = [sys.executable, "-m", "ray.scripts.scripts", "start"]
    subprocess.run([*ray, "--head", f"--port={port}", "--include-dashboard=false",
                    f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
                    f"--metrics-export-port={_free_port()}", *common], env=env, check=True, capture_output=True)
    subprocess.run([*ray, f"--address=127.0.0.1:{port}", f"--dashboard-agent-listen-port={_free_port()}",
                    f"--metrics-export-port={_free_port()}", *common], env=env, check=True, capture_output=True)
    return f"127.0.0.1:{port}", temp_dir


def stop_cluster(temp_dir: str) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        for pid in _pids(temp_dir):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        end = time.monotonic() + wait
        while time.monotonic() < end and _pids(temp_dir):
            time.sleep(0.2)


def same(a: Path, b: Path) -> str:
    diffs = [n for n in ("metrics.csv", "first_pass.csv") if (a / n).read_bytes() != (b / n).read_bytes()]
    return "identical" if not diffs else "DIFFERENT: " + ", ".join(diffs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="deep")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_executors_"))
    exp = load_experiment(args.preset)
    runs: list[tuple[str, object]] = [("in-process", None), (f"process pool ({args.workers} workers)",
                                                            ProcessPool(args.workers))]
    cluster = None
    if not args.skip_ray:
        import ray

        address, cluster = start_cluster()
        ray.init(address=address, _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=False)
        runs.append(("Ray (2 single-CPU nodes)", RayExecutor(address)))
    times = {}
    try:
        for i, (name, ex) in enumerate(runs):
            d = out / f"run{i}"
            shutil.rmtree(d, ignore_errors=True)
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            s = run_experiment(exp, d, executor=ex, report=False)
            times[name] = time.perf_counter() - t0
            print(f"{name:28s} {times[name]:8.1f} s  (units {s.units_run}, load average before {load:.1f}, "
                  f"{os.cpu_count()} cores)  {same(out / 'run0', d) if i else ''}", flush=True)
    finally:
        if cluster is not None:
            import ray

            ray.shutdown()
            stop_cluster(cluster)
    base = times["in-process"]
    for name, t in times.items():
        print(f"ratio {name}: {base / t:.2f}x the in-process speed")


if __name__ == "__main__":
    main()
