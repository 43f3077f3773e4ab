"""Running a model on a batch for a measurement (probe, LSUV, audit): input checks, hooks that
are always removed, buffers restored, and a failed forward pass explained in words."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._errors import InitlabError, is_out_of_memory, memory_error
from ._layers import describe_input
from ._undo import Undo

__all__ = ["as_inputs", "first_tensor", "no_mha_fastpath", "Tracker", "forward_error", "hooks", "kept_buffers",
           "locate_failure"]


def _check_finite(t: Tensor, what: str) -> None:
    # fast path: a sum is finite when every value is (NaN and inf propagate); only a
    # non-finite sum (or an overflow) needs the elementwise check
    if bool(torch.isfinite(t.sum())):
        return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise InitlabError(
            f"{what} contains non-finite values ({n_nan} NaN, {n_inf} inf out of {t.numel()}); "
            "clean or impute the data first"
        )


def as_inputs(batch: object, what: str = "batch", *, check_finite: bool = True) -> tuple[Tensor, ...]:
    """Positional model inputs from ``batch``: a tensor, or a tuple of tensors for a model with several inputs.

    Raises :class:`InitlabError` for anything else, for an empty batch, and for NaN/inf values.
    """
    if isinstance(batch, Tensor):
        inputs: tuple[Tensor, ...] = (batch,)
    elif isinstance(batch, tuple) and batch and all(isinstance(t, Tensor) for t in batch):
        inputs = batch
    else:
        hint = ""
        if isinstance(batch, np.ndarray):
            hint = "; convert it with torch.from_numpy(batch).float()"
        elif isinstance(batch, list):
            hint = "; convert it with torch.tensor(batch) or torch.stack(batch), or pass a tuple for several inputs"
        raise InitlabError(
            f"{what} must be a torch.Tensor (or a tuple of tensors for a model with several inputs), "
            f"got {type(batch).__name__}{hint}"
        )
    for t in inputs:
        if t.is_meta:
            raise InitlabError(f"{what} is on the meta device (shape {tuple(t.shape)}): it has no values to run the "
                               "model on; pass a batch of real data")
        if t.numel() == 0:
            raise InitlabError(f"{what} is empty (shape {tuple(t.shape)}); pass at least one sample")
        if check_finite and (t.is_floating_point() or t.is_complex()) and not t.is_meta:
            _check_finite(t, what)
    return inputs


def first_tensor(out: Any) -> Tensor | None:
    """A model output's tensor: the output itself, or the first element of a tuple/list."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


class no_mha_fastpath:
    """Context manager: disable PyTorch's fused attention fast path, which skips submodule calls
    (and so forward hooks) in eval mode without grad."""

    def __enter__(self) -> "no_mha_fastpath":
        mha = getattr(torch.backends, "mha", None)
        self.prev = mha.get_fastpath_enabled() if mha is not None else None
        if mha is not None:
            mha.set_fastpath_enabled(False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.prev is not None:
            torch.backends.mha.set_fastpath_enabled(self.prev)


@contextmanager
def hooks():
    """A list to append hook handles to; every handle is removed on exit, also on errors."""
    handles: list[Any] = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


@contextmanager
def kept_buffers(model: nn.Module, keep: bool = True, modules: dict[str, nn.Module] | None = None):
    """Restore the model's buffers (BatchNorm running statistics and ``num_batches_tracked``...) on
    exit, also on errors and Ctrl-C: their values, and which tensor fills each slot; nothing when
    ``keep`` is False. ``modules``: ``dict(model.named_modules())`` where the caller has it."""
    named = modules.items() if modules is not None else model.named_modules()
    owners = [(name, m) for name, m in named if m._buffers] if keep else []
    if owners:
        undo = Undo("restoring the model's buffers")
        undo.save_all([(f"buffer {name!r}", b) for name, b in model.named_buffers()])
        for name, m in owners:
            undo.save_module(m, name or "<model>", parameters=False)
    try:
        yield
    finally:
        if owners:
            undo.rollback()


class Tracker:
    """Forward pre/post hooks that remember which weight layer is running, to explain a failed forward."""

    def __init__(self) -> None:
        self.current: tuple[str, nn.Module, list[tuple[int, ...]]] | None = None

    def enter(self, name: str, mod: nn.Module, args: tuple[Any, ...]) -> None:
        """Note that layer ``name`` starts on ``args``."""
        self.current = (name, mod, [tuple(a.shape) for a in args if isinstance(a, Tensor)])

    def pre(self, name: str) -> Callable[..., None]:
        """A forward pre-hook calling :meth:`enter` for layer ``name``."""
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            self.enter(name, mod, args)
        return hook

    def post(self, mod: nn.Module, args: Any, out: Any) -> None:
        """A forward hook: the layer finished."""
        self.current = None


_DTYPE_WORDS = ("dtype", "scalar type", "type (", "expected m1 and m2", "same type", "not implemented for")


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _dtype_error(exc: BaseException, inputs: Sequence[Tensor], mod: nn.Module | None, where: str) -> InitlabError | None:
    """A clear error when the batch's dtype does not suit the model's parameters, else None."""
    msg = str(exc).lower()
    if not any(w in msg for w in _DTYPE_WORDS):
        return None
    params = [p for p in (mod.parameters() if mod is not None else ()) if p.is_floating_point()]
    want = params[0].dtype if params else None
    got = [t.dtype for t in inputs]
    if want is None or all(d == want for d in got):
        return None
    shown = ", ".join(_dtype_name(d) for d in got)
    if all(d.is_floating_point for d in got):
        return InitlabError(f"the batch's dtype ({shown}) does not match the model's parameters ({_dtype_name(want)})"
                            f"{where}; convert the batch with batch.to({want}), or the model with model.to({got[0]})")
    return InitlabError(f"the batch is a {shown} tensor but the model computes in {_dtype_name(want)}{where}; "
                        f"convert it with batch.to({want}) (integer batches are for models that start with an "
                        "Embedding)")


def forward_error(exc: BaseException, inputs: Sequence[Tensor], tracker: Tracker | None,
                  layers: Sequence[tuple[str, nn.Module]]) -> InitlabError:
    """An :class:`InitlabError` explaining why ``model(*inputs)`` raised ``exc``: out of memory, a
    batch of the wrong dtype, a batch of the wrong shape for the layer that failed, or else the
    model's own error in one line."""
    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
    torch_msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if is_out_of_memory(exc):
        nbytes = sum(t.numel() * t.element_size() for t in inputs)
        return memory_error(f"the forward pass on a batch of shape {shapes} (the batch alone)", nbytes, exc)
    current = tracker.current if tracker is not None else None
    mod = current[1] if current is not None else (layers[0][1] if layers else None)
    where = f" at layer {current[0]!r} ({type(current[1]).__name__})" if current is not None else ""
    wrong_dtype = _dtype_error(exc, inputs, mod, where)
    if wrong_dtype is not None:
        return wrong_dtype
    if not isinstance(exc, (RuntimeError, ValueError, IndexError, TypeError)):
        torch_msg = f"{type(exc).__name__}: {torch_msg}"
    if tracker is not None and tracker.current is not None:
        name, mod, got = tracker.current
        expected = describe_input(mod)
        if expected is not None:
            got_s = ", ".join(str(s) for s in got) or "?"
            return InitlabError(
                f"the batch of shape {shapes} does not fit the model: layer {name!r} ({type(mod).__name__}) "
                f"expects {expected}, got input of shape {got_s} (torch: {torch_msg})"
            )
    hint = ""
    if layers:
        name, mod = layers[0]
        expected = describe_input(mod)
        if expected is not None:
            hint = f"; its first weight layer {name!r} ({type(mod).__name__}) expects {expected}"
    return InitlabError(f"the model's forward pass failed on a batch of shape {shapes}{hint} (torch: {torch_msg})")


def locate_failure(model: nn.Module, inputs: Sequence[Tensor], layers: Iterable[tuple[str, nn.Module]]) -> Tracker:
    """Re-run a forward pass that failed, with hooks that note the weight layer running when it
    fails (the normal path carries no such hooks). Buffers are restored afterwards."""
    tracker = Tracker()
    with kept_buffers(model), hooks() as handles:
        for name, module in layers:
            handles.append(module.register_forward_pre_hook(tracker.pre(name)))
            handles.append(module.register_forward_hook(tracker.post))
        with torch.no_grad(), no_mha_fastpath():
            try:
                model(*inputs)
            except Exception:  # noqa: BLE001 - the failure we are locating
                pass
    return tracker
