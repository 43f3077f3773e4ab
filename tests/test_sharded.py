"""Sharded parameters initialised exactly: real processes (gloo on 127.0.0.1), world sizes 2 and 4.

Each rank (tests/sharded_worker.py) shards models over 1-D and 2-D meshes (Shard(0), Shard(1),
Replicate, uneven shards, a layer straddling a sampler chunk, nn.MultiheadAttention's fused in_proj), through tensor parallelism and FSDP2,
initialises them under CommDebugMode and compares every parameter's full_tensor() bitwise with the
single-process init of the same seed; the fingerprint must agree too.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORKER = Path(__file__).with_name("sharded_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, tmp_path: Path) -> list[list[dict]]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"rank{r}.json" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(port), str(outs[r])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:  # joined: none is left running, even when one hung
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{logs[r][-3000:]}"
    return [json.loads(o.read_text()) for o in outs]


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_init_is_bitwise_the_single_process_init(world, tmp_path):
    ranks = run_world(world, tmp_path)
    for r, rows in enumerate(ranks):
        errors = [row["error"] for row in rows if "error" in row]
        assert not errors, f"rank {r}: " + "\n".join(errors)
        cases = [row["case"] for row in rows]
        assert any("FSDP2" in c for c in cases) and any("tensor parallel" in c for c in cases)
        assert any("Shard(1)" in c for c in cases) and any("Replicate" in c for c in cases)
        mha = [c for c in cases if "MultiheadAttention" in c]
        assert all(any(p in c for c in mha) for p in ("[Shard(dim=0)]", "[Shard(dim=1)]", "[Replicate()]")), mha
        assert any("orthogonal refused on a MultiheadAttention" in c for c in cases)
        assert sum("user function without fans= refused" in c for c in cases) == 2
        assert sum("user function with fans=" in c for c in cases) == 2
        if world == 4:
            assert any(c.startswith("2d") for c in cases)
        for row in rows:
            assert row["mismatched"] == [], f"rank {r} {row['case']}: {row['mismatched']}"
            assert row["collectives"] == 0, f"rank {r} {row['case']}: {row['collectives']} collectives during init"
            assert row["fingerprint_equal"], f"rank {r} {row['case']}: fingerprints differ"
