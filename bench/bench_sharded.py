"""Benchmark: initialising a model sharded over CPU ranks, against the alternatives (issue #13).

A stack of ``d x d`` Linear layers (about ``--params`` parameters, default 1e9, fp32) is
initialised with ``init_model(model, "he_normal", distribution="truncated_normal")``:

* **sharded**: ``--world`` gloo ranks on 127.0.0.1; every weight a DTensor ``Shard(0)`` built on
  the meta device and materialised empty (as FSDP2's ``fully_shard`` + ``to_empty`` does); each
  rank fills only its shard;
* **single**: one process initialises the whole unsharded model;
* **full-then-slice**: each rank samples every full weight (one at a time) and keeps its slice,
  what Megatron and DeepSpeed do.

Per rank: wall time and CPU time of the init call, and the peak memory the process added
(the resident-memory high-water mark after the init minus the resident memory before the model was
allocated). The ranks run at the same
time, so on a machine with fewer cores than ranks the wall time includes waiting for a core;
CPU time is the work. The sharded ranks' weights are checked bitwise against the single-process
weights (by ``initlab.fingerprint``).

    python bench/bench_sharded.py [--params 1e9] [--d 4096] [--world 4]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import initlab

ROOT = Path(__file__).resolve().parents[1]
SCHEME, KW, SEED = "he_normal", {"distribution": "truncated_normal"}, 0


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """The current resident memory, after resetting the peak (Linux: /proc/self/clear_refs 5), so
    that :func:`peak_mb` reports the high-water mark from here on; elsewhere ru_maxrss."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    now = _status_mb("VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build(d: int, layers: int, device: str) -> nn.Module:
    with torch.device(device):
        return nn.Sequential(*[nn.Linear(d, d, bias=False) for _ in range(layers)])


def timed(f) -> dict:
    w0, c0 = time.perf_counter(), time.process_time()
    f()
    return {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}


def single(d: int, layers: int) -> dict:
    base = rss_mb()
    model = build(d, layers, "meta").to_empty(device="cpu")
    out = timed(lambda: initlab.init_model(model, SCHEME, generator=torch.Generator().manual_seed(SEED), **KW))
    out["peak_mb"] = peak_mb() - base
    out["fingerprint"] = initlab.fingerprint(model)
    return out


def sharded(rank: int, world: int, port: int, d: int, layers: int) -> dict:
    import torch.distributed as dist  # noqa: PLC0415 - only the rank processes need it
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    base = rss_mb()
    model = build(d, layers, "meta")
    rows = -(-d // world)
    local_rows = max(0, min(d, (rank + 1) * rows) - rank * rows)
    for m in model:
        local = torch.empty(local_rows, d)
        m.weight = nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                                   shape=torch.Size((d, d)), stride=(d, 1)))
    out = timed(lambda: initlab.init_model(model, SCHEME, generator=torch.Generator().manual_seed(SEED), **KW))
    out["peak_mb"] = peak_mb() - base
    out["fingerprint"] = initlab.fingerprint(model)
    dist.destroy_process_group()
    return out


def full_then_slice(rank: int, world: int, d: int, layers: int) -> dict:
    base = rss_mb()
    rows = -(-d // world)
    lo, hi = min(d, rank * rows), min(d, (rank + 1) * rows)
    shards = []
    g = torch.Generator().manual_seed(SEED)

    def run() -> None:
        for _ in range(layers):
            full = torch.empty(d, d)
            initlab.he_normal_(full, distribution="truncated_normal", generator=g)
            shards.append(full[lo:hi].clone())
            del full

    out = timed(run)
    out["peak_mb"] = peak_mb() - base
    return out


def launch(mode: str, world: int, d: int, layers: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"{r}.json" for r in range(world)]
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", mode, str(r), str(world), str(port), str(d),
                                   str(layers), str(outs[r])], env=env) for r in range(world)]
        for p in procs:
            p.wait()
        if any(p.returncode for p in procs):
            raise SystemExit(f"{mode}: a rank failed")
        return [json.loads(o.read_text()) for o in outs]


def worker(argv: list[str]) -> int:
    mode, rank, world, port, d, layers, path = argv[0], *map(int, argv[1:6]), argv[6]
    torch.set_num_threads(1)
    out = sharded(rank, world, port, d, layers) if mode == "sharded" else full_then_slice(rank, world, d, layers)
    Path(path).write_text(json.dumps(out))
    return 0


def report(name: str, rows: list[dict]) -> None:
    for r, row in enumerate(rows):
        print(f"  {name:<16} rank {r}: wall {row['wall_s']:8.2f} s  cpu {row['cpu_s']:8.2f} s  "
              f"peak +{row['peak_mb']:9.0f} MB")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=1e9, help="about this many parameters (default 1e9)")
    ap.add_argument("--d", type=int, default=4096, help="layer width (default 4096)")
    ap.add_argument("--world", type=int, default=4, help="ranks (default 4)")
    args = ap.parse_args()
    d, world = args.d, args.world
    layers = max(1, round(args.params / (d * d)))
    print(f"torch {torch.__version__}; {layers} Linear({d}, {d}) layers = {layers * d * d / 1e9:.3f}e9 fp32 parameters "
          f"({layers * d * d * 4 / 2**30:.2f} GiB); {world} ranks on {os.cpu_count()} cores; scheme {SCHEME} {KW}")
    torch.set_num_threads(1)
    one = single(d, layers)
    report("single process", [one])
    sh = launch("sharded", world, d, layers)
    report("sharded", sh)
    fs = launch("slice", world, d, layers)
    report("full-then-slice", fs)
    mean = {k: sum(r[k] for r in sh) / world for k in ("wall_s", "cpu_s", "peak_mb")}
    mfs = {k: sum(r[k] for r in fs) / world for k in ("wall_s", "cpu_s", "peak_mb")}
    print("\nper rank, mean (one thread per process)")
    print(f"  sharded CPU time / single-process CPU time : {mean['cpu_s'] / one['cpu_s']:.3f}  (ideal 1/{world} = {1 / world:.3f})")
    print(f"  full-then-slice CPU time / sharded CPU time: {mfs['cpu_s'] / mean['cpu_s']:.2f}x")
    print(f"  sharded peak memory / single-process peak  : {mean['peak_mb'] / max(one['peak_mb'], 1e-9):.3f}")
    print(f"  bit-identical to the single-process init (fingerprints): "
          f"{all(r['fingerprint'] == one['fingerprint'] for r in sh)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
