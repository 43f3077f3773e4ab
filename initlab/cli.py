"""The ``initlab`` command line. Each subcommand lives beside the code it drives.

A module that owns subcommands exposes ``register_cli(subparsers)``; it adds its parsers and
sets ``func`` (``args -> int`` exit code). Those modules keep heavy imports inside functions.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from ._errors import InitlabError

_CLI_MODULES = ("initlab._gains", "initlab._schemes", "initlab._audit", "initlab._survey", "initlab.lab.cli")
# optional dependencies -> the extra that installs them
_EXTRAS = {"pandas": "lab", "matplotlib": "lab", "tensorboard": "lab", "tomli_w": "lab", "tomli": "lab",
           "tqdm": "lab", "sklearn": "digits", "ray": "ray"}


def build_parser() -> argparse.ArgumentParser:
    """The ``initlab`` parser, with the subcommands of every module in ``_CLI_MODULES``.

    Each of those modules is part of initlab itself: one that fails to import, or that has no
    ``register_cli``, is a broken installation and raises, never a command that silently vanishes.
    A missing optional third-party package is not an error here: command modules import those
    inside their commands, and :func:`main` names the extra to install.
    """
    parser = argparse.ArgumentParser(
        prog="initlab",
        description="Weight initialization done right, and shown why.",
    )
    parser.add_argument("--version", action="version", version=f"initlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _CLI_MODULES:
        register = getattr(importlib.import_module(name), "register_cli", None)
        if register is None:
            raise RuntimeError(f"initlab is broken: command module {name} has no register_cli()")
        register(sub)
    return parser


def _missing_extra(e: ModuleNotFoundError, what: str) -> int:
    """Exit code 2 with the extra that installs a missing optional package; other missing modules raise."""
    top = (e.name or "").split(".")[0]
    if top not in _EXTRAS:
        raise e
    print(f"initlab: error: {what} needs the optional package {top!r}: pip install 'initlab[{_EXTRAS[top]}]'",
          file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ModuleNotFoundError as e:
        return _missing_extra(e, "the command line")
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except InitlabError as e:
        print(f"initlab: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        return _missing_extra(e, "this command")
    except OSError as e:
        where = f": {str(e.filename)!r}" if e.filename is not None else ""
        print(f"initlab: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except MemoryError:
        print("initlab: error: out of memory; use a smaller model or batch, or a machine with more memory",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("initlab: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
