"""The torchvision shim: torchvision's pure-Python parts import even when its compiled extension
does not load beside this torch, a compiled operator then fails with a clear error, and where the
extension loads the shim changes nothing. Each check runs in a fresh interpreter: whether
torchvision imported, and which operators exist, is per process."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision not installed")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=ENV,
                          timeout=300)


@pytest.fixture(scope="module")
def shimmed() -> dict:
    """Import torchvision (models, ops.misc) and timm after the shim; report what happened."""
    out = _python("""
        import json, torch
        from initlab._compat import ensure_torchvision, shim_active, CompiledOpUnavailable
        ops = ensure_torchvision()
        assert ensure_torchvision() == ops  # idempotent
        import torchvision.models, torchvision.ops.misc, timm
        model = torchvision.models.resnet18(weights=None)
        box_error = nms_error = None
        try:
            torch.ops.torchvision.nms(torch.zeros(2, 4), torch.zeros(2), 0.5)
        except CompiledOpUnavailable as e:
            nms_error = str(e)
        try:
            torchvision.ops.nms(torch.zeros(2, 4), torch.zeros(2), 0.5)
        except RuntimeError as e:
            box_error = str(e)
        print(json.dumps({"ops": ops, "shim": shim_active(), "nms_error": nms_error, "box_error": box_error,
                          "model": type(model).__name__}))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_shim_makes_torchvision_models_and_timm_importable(shimmed):
    assert shimmed["model"] == "ResNet"
    assert shimmed["shim"] == (not shimmed["ops"])


def test_a_compiled_op_called_through_the_shim_fails_clearly(shimmed):
    if shimmed["ops"]:
        pytest.skip("torchvision's compiled operators load beside this torch: no stubs to call")
    msg = shimmed["nms_error"]
    assert msg is not None and "torchvision::nms" in msg and "compiled" in msg and "pure-Python" in msg
    # torchvision's own wrapper checks first and keeps its own error
    assert shimmed["box_error"] is not None and "C++ ops" in shimmed["box_error"]


def test_without_the_shim_torchvision_does_not_import(shimmed):
    # negative control: the shim is what makes the difference
    if shimmed["ops"]:
        pytest.skip("torchvision's compiled operators load beside this torch: nothing to fix")
    out = _python("import torchvision")
    assert out.returncode != 0
    assert "torchvision::nms does not exist" in out.stderr


def test_the_shim_does_nothing_when_the_operators_exist():
    # as if torchvision/_C had loaded: nms is defined before the shim runs
    out = _python("""
        import torch
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        from initlab._compat import ensure_torchvision, shim_active
        print(ensure_torchvision(), shim_active(), hasattr(torch.ops.torchvision, "qnms"))
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False", "False"]


def test_importing_initlab_or_its_cli_imports_no_model_library():
    out = _python("""
        import sys, initlab, initlab._zoo, initlab._survey, initlab._compat
        from initlab.cli import build_parser
        build_parser()
        print([m for m in ("torchvision", "timm", "transformers") if m in sys.modules])
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
