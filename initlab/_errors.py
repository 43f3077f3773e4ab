"""Error helpers shared by every module: messages name the bad value and the valid choices."""
from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable
from typing import Any, NoReturn


class InitlabError(ValueError):
    """Base class of initlab's input errors (a ``ValueError``, so ``except ValueError`` works)."""


def closest(value: str, choices: Iterable[str]) -> str | None:
    """The closest valid choice to ``value`` (case-insensitive), or None when nothing is close."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    hit = difflib.get_close_matches(str(value).lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[hit[0]] if hit else None


def unknown_choice(kind: str, value: object, choices: Iterable[str]) -> InitlabError:
    """``InitlabError("unknown scheme 'xavir'; did you mean 'xavier_normal'? valid: ...")``."""
    choices = sorted(set(choices))
    hint = closest(str(value), choices) if isinstance(value, str) else None
    msg = f"unknown {kind} {value!r}"
    msg += f"; did you mean {hint!r}?" if hint is not None else "."
    msg += f" Valid {kind}s: {', '.join(choices)}"
    return InitlabError(msg)


# --------------------------------------------------------------------------------------------
# running out of memory: one clear error naming what was being allocated and its size

_OOM_WORDS = ("not enough memory", "can't allocate memory", "cannot allocate memory", "out of memory",
              "failed to allocate", "allocation failed")


def is_out_of_memory(exc: BaseException) -> bool:
    """A ``MemoryError``, or a ``RuntimeError`` by which torch says an allocation failed (CPU or device)."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _OOM_WORDS)


def size_text(nbytes: float) -> str:
    """``37.3 GB``, ``512 MB``, ``96 kB``: a byte count for messages (decimal units)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{int(nbytes)} bytes"


def memory_error(what: str, nbytes: float, exc: BaseException | None = None) -> InitlabError:
    """``InitlabError("not enough memory for <what> (37.3 GB) ...")``; ``exc`` is the allocator's error."""
    detail = ""
    if exc is not None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        detail = f" ({type(exc).__name__}: {first[:200]})"
    return InitlabError(f"not enough memory for {what} ({size_text(nbytes)}){detail}; free memory, "
                        "use a smaller model or batch, or run on a device with more memory")


def one_line_usage_errors(parser: Any) -> Any:
    """Make an argparse (sub)parser report a usage error the way every initlab error is reported:
    its usage, then one ``initlab: error: <command>: <message>`` line; exit status 2."""
    def error(message: str) -> NoReturn:
        parser.print_usage(sys.stderr)
        command = parser.prog.split()[-1] if parser.prog else "initlab"
        parser.exit(2, f"initlab: error: {command}: {message}\n")
    parser.error = error
    return parser
