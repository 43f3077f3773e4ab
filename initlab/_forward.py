"""Running a model on a batch for a measurement (probe, LSUV, audit): input checks, hooks that
are always removed, buffers restored, and a failed forward pass explained in words."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._errors import InitlabError
from ._layers import describe_input

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
def kept_buffers(model: nn.Module, keep: bool = True):
    """Restore the model's buffers (BatchNorm running statistics...) on exit; nothing when ``keep`` is False."""
    saved = {k: v.clone() for k, v in model.named_buffers()} if keep else {}
    try:
        yield
    finally:
        if saved:
            with torch.no_grad():
                for k, v in model.named_buffers():
                    if k in saved and v.shape == saved[k].shape:
                        v.copy_(saved[k])


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


def forward_error(exc: BaseException, inputs: Sequence[Tensor], tracker: Tracker | None,
                  layers: Sequence[tuple[str, nn.Module]]) -> InitlabError:
    """An :class:`InitlabError` explaining why ``model(*inputs)`` raised ``exc``."""
    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
    torch_msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
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
