"""Where the units of work run: the :class:`Executor` seam and the in-process executor.

An executor is anything with ``map(fn, items)`` that returns ``fn(item)`` for each item, in
order: ``concurrent.futures`` executors, or an adapter over a Ray cluster (``map`` = submit
``ray.remote(fn)`` per item and ``ray.get`` them in order). :func:`initlab.lab.run.run_experiment`
passes a module-level function (:func:`initlab.lab.training.run_unit`) and picklable
``(GroupSpec, Dataset)`` items, and commits each result as it arrives, so a lazy ``map`` (like
:class:`InProcess`'s) records every finished unit before the next one starts.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

__all__ = ["Executor", "InProcess"]


class Executor(Protocol):
    """Anything with ``map(fn, items)`` yielding ``fn(item)`` for each item, in order."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], /) -> Iterable[Any]: ...  # pragma: no cover


class InProcess:
    """Runs the items one after the other in this process, lazily: ``fn(item)`` is called when the
    caller asks for the next result (nothing needs to pickle)."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], /) -> Iterator[Any]:
        return (fn(item) for item in items)
