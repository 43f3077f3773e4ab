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

_CLI_MODULES = ("initlab._gains", "initlab._schemes", "initlab._audit", "initlab.lab.cli")
# optional dependencies -> the extra that installs them
_EXTRAS = {"pandas": "lab", "matplotlib": "lab", "tensorboard": "lab", "tomli_w": "lab", "tomli": "lab",
           "tqdm": "lab", "sklearn": "digits", "ray": "ray"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="initlab",
        description="Weight initialization done right, and shown why.",
    )
    parser.add_argument("--version", action="version", version=f"initlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _CLI_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # an optional part that is not installed
            if e.name and e.name.startswith("initlab"):
                continue
            raise
        register = getattr(module, "register_cli", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
        top = (e.name or "").split(".")[0]
        if top not in _EXTRAS:
            raise
        print(f"initlab: error: this command needs the optional package {top!r}: "
              f"pip install 'initlab[{_EXTRAS[top]}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("initlab: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
