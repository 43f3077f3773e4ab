"""All or nothing: the model operations (``init_model``, ``lsuv_``, ``probe``, ``audit``) either
finish or leave the model exactly as it was, on an error and on ``KeyboardInterrupt``.

Two tools, used by each operation for what it changes:

* :class:`Undo`, an undo log: before an operation writes a tensor it may not finish writing, it
  saves a copy (``save``); a module whose own code runs (``reset_parameters()``) has its
  parameter and buffer *slots* saved too, in case that code replaces a tensor instead of
  writing into it; a generator's state is saved so that a retry draws the same numbers.
  :func:`all_or_nothing` rolls the log back when anything escapes, ``KeyboardInterrupt``
  included, and the rollback itself cannot be interrupted.
* :class:`deferred_interrupt`: a stretch of work that cannot fail once its checks have passed
  (initlab's own variance-scaling sampler writing into preallocated memory) runs with Ctrl-C
  held back until it is over, so that it always finishes; the ``KeyboardInterrupt`` is raised
  then. Copying every weight of a large model would cost as much as sampling it, so this is
  how ``init_model`` stays all-or-nothing without that copy.

Copies are only taken when the memory they need is available (:func:`check_memory`), so a
rollback copy never triggers the operating system's out-of-memory killer: an operation that
cannot afford its copies says so, naming the largest tensor, before it changes anything.
"""
from __future__ import annotations

import os

import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ._errors import InitlabError, is_out_of_memory, memory_error, size_text

__all__ = ["Undo", "all_or_nothing", "deferred_interrupt", "memory_available", "check_memory", "tensor_bytes"]


def tensor_bytes(t: Tensor) -> int:
    """Bytes of a tensor's values (0 on the meta device)."""
    return 0 if t.is_meta else t.numel() * t.element_size()


def memory_available(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` without swapping or the OOM killer (Linux:
    ``MemAvailable``; CUDA: the driver's free memory), or None when unknown."""
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        try:  # other POSIX systems: free physical pages
            return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except RuntimeError:
            return None
    return None


_SMALL = 1 << 24  # copies below 16 MiB are never checked (reading the free memory costs more than it tells)


def check_memory(items: Iterable[tuple[str, Tensor]], purpose: str) -> None:
    """Raise a clear :class:`InitlabError` when copies of ``items`` ((label, tensor) pairs) would not fit in
    the memory available on their devices (90% of it at most), naming the largest one."""
    need: dict[torch.device, list[tuple[int, str, Tensor]]] = {}
    for label, t in items:
        n = tensor_bytes(t)
        if n:
            need.setdefault(t.device, []).append((n, label, t))
    for device, rows in need.items():
        total = sum(n for n, _, _ in rows)
        if total < _SMALL:
            continue
        free = memory_available(device)
        if free is not None and total > 0.9 * free:
            n, label, t = max(rows, key=lambda r: r[0])
            raise InitlabError(
                f"not enough memory on {device} for {purpose}: the copies need {size_text(total)}, "
                f"{size_text(free)} is available; the largest is {label} ({'x'.join(map(str, t.shape))} "
                f"{str(t.dtype).replace('torch.', '')}, {size_text(n)}). Free memory, or initialise the "
                "largest layers separately (include=/exclude=)")


class Undo:
    """An undo log: tensor values, module slots and generator states saved before a change."""

    def __init__(self, purpose: str = "undoing the operation on failure") -> None:
        self.purpose = purpose
        self._tensors: list[tuple[Tensor, Tensor]] = []
        self._seen: set[int] = set()
        self._slots: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self._generators: list[tuple[torch.Generator, Tensor]] = []

    def __bool__(self) -> bool:
        return bool(self._tensors or self._slots or self._generators)

    def save(self, t: Tensor | None, label: str = "a tensor") -> None:
        """Keep a copy of ``t``'s values (once per tensor; nothing for meta tensors)."""
        if not isinstance(t, Tensor) or t.is_meta or id(t) in self._seen:
            return
        self._seen.add(id(t))
        try:
            copy = t.detach().clone()
        except (RuntimeError, MemoryError) as e:
            if is_out_of_memory(e):
                raise memory_error(f"a copy of {label} kept for {self.purpose}", tensor_bytes(t), e) from e
            raise
        self._tensors.append((t, copy))

    def saved(self, t: Tensor) -> Tensor | None:
        """The copy of ``t`` kept by :meth:`save`, or None."""
        return next((copy for orig, copy in self._tensors if orig is t), None) if id(t) in self._seen else None

    def save_all(self, items: Iterable[tuple[str, Tensor]]) -> None:
        """Check that copies of every ``(label, tensor)`` fit in memory, then save them all."""
        items = [(label, t) for label, t in items if isinstance(t, Tensor) and id(t) not in self._seen]
        check_memory(items, self.purpose)
        for label, t in items:
            self.save(t, label)

    def save_module(self, m: nn.Module, label: str = "a module", *, parameters: bool = True) -> None:
        """Save a module's own buffers (and parameters): their values and which tensor fills each slot."""
        tables = (m._parameters, m._buffers) if parameters else (m._buffers,)
        for table in tables:
            self._slots.append((table, dict(table)))
            for name, t in list(table.items()):
                self.save(t, f"{label}.{name}")

    def save_generator(self, g: torch.Generator | None) -> None:
        """Save a generator's state, so that after a rollback a retry draws the same numbers."""
        if isinstance(g, torch.Generator):
            self._generators.append((g, g.get_state()))

    def rollback(self) -> None:
        """Put everything saved back, last change first; Ctrl-C waits until it is done."""
        with deferred_interrupt(), torch.no_grad():
            for slots, saved in reversed(self._slots):
                slots.clear()
                slots.update(saved)
            for t, copy in reversed(self._tensors):
                if t.shape == copy.shape:
                    t.copy_(copy)
            for g, state in reversed(self._generators):
                g.set_state(state)


@contextmanager
def all_or_nothing(undo: Undo) -> Iterator[Undo]:
    """Roll ``undo`` back when anything escapes the block (``KeyboardInterrupt`` included)."""
    try:
        yield undo
    except BaseException:
        undo.rollback()
        raise


class deferred_interrupt:
    """Context manager: hold back SIGINT (Ctrl-C) until the block is over, then raise
    ``KeyboardInterrupt`` (or call the handler that was installed). Only the main thread receives
    signals, so elsewhere, and where SIGINT is ignored or left to the system, it does nothing.

    With ``release=False`` the held-back interrupt waits for :meth:`release` (so that it is raised
    outside an enclosing :func:`all_or_nothing`, once the operation has finished)."""

    def __init__(self, release: bool = True) -> None:
        self._old: Any = None
        self._pending: tuple[int, Any] | None = None
        self._active = False
        self._release_on_exit = release

    def _hold(self, signum: int, frame: Any) -> None:
        self._pending = (signum, frame)

    def __enter__(self) -> "deferred_interrupt":
        if threading.current_thread() is not threading.main_thread():
            return self
        try:
            old = signal.getsignal(signal.SIGINT)
        except (ValueError, OSError):  # pragma: no cover - no signal support
            return self
        if callable(old):
            try:
                signal.signal(signal.SIGINT, self._hold)
            except (ValueError, OSError):  # pragma: no cover
                return self
            self._old, self._active = old, True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self._active:
            return
        signal.signal(signal.SIGINT, self._old)
        self._active = False
        if exc_type is not None:
            self._pending = None  # the block failed anyway: its error goes up
        elif self._release_on_exit:
            self.release()

    def release(self) -> None:
        """Deliver the interrupt held back, if any (the default handler raises ``KeyboardInterrupt``)."""
        if self._pending is not None:
            signum, frame = self._pending
            self._pending = None
            self._old(signum, frame)
