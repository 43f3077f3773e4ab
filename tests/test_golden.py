"""Golden values: digests of the sampler's output for fixed seeds, schemes, dtypes and shapes.

A change of any value is a visible, versioned event: update the digests here only together with
a note in the README (values changed in 0.2: counter-based Philox streams keyed by name). The
digests must not depend on the thread count or on the CPU instruction set torch dispatches to
(checked in a subprocess with ATEN_CPU_CAPABILITY=default, torch's portable kernels).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import initlab

ROOT = Path(__file__).resolve().parents[1]
CASES = [("normal", torch.float32, (257, 513)), ("truncated_normal", torch.float32, (300, 501)),
         ("uniform", torch.float32, (7, 13)), ("normal", torch.float64, (129, 1031)),
         ("truncated_normal", torch.float64, (64, 3, 3, 3)), ("uniform", torch.float64, (1000,)),
         ("truncated_normal", torch.bfloat16, (512, 300)), ("normal", torch.float16, (33, 65))]
GOLDEN = ["e1ca4c4e4f494822", "7009bfdaf474f64a", "c222b2753c5395a0", "c93b4c458e0cbd48",
          "ed0c0506f1d0a632", "74a8509ae52a9d48", "ef215b0419031009", "107d526491d5a9cd"]
MODEL_GOLDEN = {"he_normal": "45a5d9eae8a3d9ba6a4c0eb9a101a161", "xavier_uniform": "a733c8138c2bbeb386e55fc72c418f72",
                "auto": "c44801e69e461880389bc72eb6e97e99"}


def digest(dist: str, dtype: torch.dtype, shape: tuple[int, ...], seed: int = 2024) -> str:
    t = torch.empty(shape, dtype=dtype)
    initlab.variance_scaling_(t, 2.0, "fan_in", dist, generator=torch.Generator().manual_seed(seed), fans=(100, 100))
    return hashlib.blake2b(t.contiguous().view(torch.uint8).numpy().tobytes(), digest_size=8).hexdigest()


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(300, 501), nn.ReLU(), nn.Linear(501, 64), nn.Tanh(), nn.Linear(64, 10))


def model_digests() -> dict[str, str]:
    out = {}
    for scheme in MODEL_GOLDEN:
        m = model()
        initlab.init_model(m, scheme, generator=torch.Generator().manual_seed(7))
        out[scheme] = initlab.fingerprint(m)
    return out


def all_digests() -> dict:
    return {"tensors": [digest(*c) for c in CASES], "models": model_digests()}


@pytest.mark.parametrize("threads", [1, 2])
def test_tensor_digests_are_pinned(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = [digest(*c) for c in CASES]
    finally:
        torch.set_num_threads(before)
    assert got == GOLDEN


def test_model_digests_are_pinned():
    assert model_digests() == MODEL_GOLDEN


def test_digests_detect_a_change():
    # negative control: another seed, or one bit flipped in one weight, changes the digest
    assert digest(*CASES[0], seed=2025) != GOLDEN[0]
    m = model()
    initlab.init_model(m, "he_normal", generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        w = m[0].weight.view(-1)
        w[12345] = torch.nextafter(w[12345], torch.tensor(1.0))
    assert initlab.fingerprint(m) != MODEL_GOLDEN["he_normal"]


def test_same_digests_on_torch_portable_kernels():
    code = ("import json, sys; sys.path.insert(0, 'tests'); import test_golden as t; "
            "print(json.dumps(t.all_digests()))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"tensors": GOLDEN, "models": MODEL_GOLDEN}
