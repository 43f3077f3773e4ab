"""Error helpers shared by every module: messages name the bad value and the valid choices."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


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
