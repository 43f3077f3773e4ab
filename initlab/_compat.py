"""Making the pure-Python parts of torchvision importable when its compiled operators are not.

torchvision keeps its C++/CUDA operators (``nms``, ``roi_align``, ``deform_conv2d``...) in one
compiled extension, ``torchvision/_C``, built against one exact torch. When that extension does
not load beside the installed torch (a wheel built for another torch build), torchvision is meant
to degrade gracefully: ``torchvision.extension._has_ops()`` is False and each operator raises
"Couldn't load custom C++ ops" when called. One part does not degrade: ``_meta_registrations.py``
registers fake (meta) kernels for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally,
and torch refuses a fake kernel for an operator that was never defined, so ``import torchvision``
fails with ``RuntimeError: operator torchvision::nms does not exist``. timm imports torchvision
at import time, and transformers' model classes fail when torchvision is present but broken.

:func:`ensure_torchvision` runs before torchvision is first imported. It loads ``_C`` the way
``torchvision/extension.py`` does (the same file lookup, ``torch.ops.load_library``; loading is
idempotent, so torchvision's own load then finds it loaded). If that works, nothing else happens.
Only if it fails are the schemas of the operators that torchvision registers unconditionally
defined (:data:`UNCONDITIONAL_OPS`, with torchvision's own C++ schemas), each with a kernel that
raises :class:`CompiledOpUnavailable` naming the operator, so that the models, ``ops.misc``,
timm and transformers import and build. torchvision's public operator functions still raise
torchvision's own error first (they check ``_has_ops()``).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import threading

import torch

__all__ = ["ensure_torchvision", "CompiledOpUnavailable", "UNCONDITIONAL_OPS", "shim_active"]

#: operators whose fake kernels torchvision registers whether or not ``_C`` loaded: name -> schema
#: (torchvision/csrc/ops/nms.cpp and ops/quantized/cpu/qnms_kernel.cpp)
UNCONDITIONAL_OPS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


class CompiledOpUnavailable(RuntimeError):
    """A compiled torchvision operator was called, but torchvision's ``_C`` extension did not load."""


_lock = threading.Lock()
_state: dict[str, object] = {"ops": None, "library": None, "reason": None}


def shim_active() -> bool:
    """Whether :func:`ensure_torchvision` had to define the operator stubs (``_C`` did not load)."""
    return _state["library"] is not None


def _extension_path() -> str | None:
    """The path of ``torchvision/_C`` (any extension suffix), found without importing torchvision."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for lib_dir in spec.submodule_search_locations:
        finder = importlib.machinery.FileFinder(
            lib_dir, (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
        found = finder.find_spec("_C")
        if found is not None and found.origin:
            return found.origin
    return None


def _op_defined(name: str) -> bool:
    """Whether the operator ``torchvision::name`` exists (defined by ``_C`` or by the stubs)."""
    return hasattr(torch.ops.torchvision, name)


def _raiser(name: str, reason: str):
    def kernel(*args: object, **kwargs: object) -> torch.Tensor:
        raise CompiledOpUnavailable(
            f"torchvision::{name} is a compiled torchvision operator, and torchvision's compiled extension did not "
            f"load beside torch {torch.__version__} ({reason}); initlab defined only its schema so that "
            "torchvision's pure-Python parts (models, ops.misc) import. Install the torchvision built for this torch "
            "to run it.")
    return kernel


def _define_stubs(reason: str) -> torch.library.Library:
    lib = torch.library.Library("torchvision", "FRAGMENT")  # kept alive in _state: dropping it unregisters
    for name, schema in UNCONDITIONAL_OPS.items():
        if not _op_defined(name):
            lib.define(schema)
            lib.impl(name, _raiser(name, reason), "CompositeExplicitAutograd")
    return lib


def _load_or_stub() -> bool:
    if _op_defined("nms"):  # already loaded (torchvision imported, or the ops come from elsewhere)
        return True
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return False  # imported already without its ops, or not installed: nothing to fix here
    path = _extension_path()
    if path is None:
        reason = "torchvision/_C is missing"
    else:
        try:
            torch.ops.load_library(path)  # what torchvision/extension.py does first
        except (OSError, ImportError) as e:
            cause = e.__cause__ or e
            reason = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}"
        else:
            if _op_defined("nms"):
                return True
            reason = f"{os.path.basename(path)} loaded but defines no torchvision::nms"
    _state["reason"] = reason
    _state["library"] = _define_stubs(reason)
    return False


def ensure_torchvision() -> bool:
    """Make ``import torchvision`` work when its compiled extension cannot load; call it before
    torchvision (or timm, or transformers) is first imported.

    Returns True when torchvision's compiled operators are available (then nothing was changed),
    False otherwise (the stubs were defined, or torchvision is not installed). Idempotent and
    thread-safe.
    """
    with _lock:
        if _state["ops"] is None:
            _state["ops"] = _load_or_stub()
        return bool(_state["ops"])
