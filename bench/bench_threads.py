"""``initlab run`` on a busy machine: the lab's default thread policy vs ``OMP_NUM_THREADS=1``.

Starts ``--busy`` CPU-bound background processes, then runs ``initlab run PRESET`` back to back,
interleaved (A, B, A, B, ...), each into a fresh temporary folder:

- A: the default (no ``--threads``, no ``OMP_NUM_THREADS``: the lab picks the idle physical cores);
- B: ``OMP_NUM_THREADS=1`` (the issue's workaround).

Prints each wall time, the medians, the ratio A/B (goal <= 1.2) and the 1-minute load average
before each run; checks that both wrote byte-identical metrics.csv (first_pass.csv is computed at
the caller's thread count, which ``OMP_NUM_THREADS=1`` changes: its last bits may differ).

Run: ``python bench/bench_threads.py [--preset classic] [--repeat 2] [--busy 2]``.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(preset: str, out: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "initlab.cli", "run", preset, "--out", str(out), "--no-progress", "--fresh"],
                   env=env, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="classic")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--busy", type=int, default=2, help="CPU-bound background processes")
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    base["PYTHONPATH"] = str(ROOT) + os.pathsep + base.get("PYTHONPATH", "")
    envs = {"default": base, "OMP_NUM_THREADS=1": {**base, "OMP_NUM_THREADS": "1"}}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    times: dict[str, list[float]] = {k: [] for k in envs}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeat):
                for k, env in envs.items():
                    out = Path(tmp) / f"{k.replace('=', '_')}"
                    load = os.getloadavg()[0]
                    t = run_once(args.preset, out, env)
                    times[k].append(t)
                    print(f"run {r + 1} {k:18s} {t:7.1f} s   (load average before: {load:.1f})", flush=True)
            same = filecmp.cmp(Path(tmp) / "default" / "metrics.csv", Path(tmp) / "OMP_NUM_THREADS_1" / "metrics.csv",
                               shallow=False)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    a, b = statistics.median(times["default"]), statistics.median(times["OMP_NUM_THREADS=1"])
    print(f"\n{args.busy} busy processes, {os.cpu_count()} CPUs: default {a:.1f} s, OMP_NUM_THREADS=1 {b:.1f} s, "
          f"ratio {a / b:.2f}x (goal <= 1.2x); metrics.csv byte-identical: {same}")


if __name__ == "__main__":
    main()
