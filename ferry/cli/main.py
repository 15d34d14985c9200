"""``ferry``: run services and talk to them.

Each command family lives in its own module exposing ``register(subparsers)``;
``COMMAND_MODULES`` lists them. Commands that live outside ``ferry/`` (``ferry bench``,
in ``benchmarks/``) are found through the ``ferry.commands`` entry-point group
(pyproject.toml), so ``ferry`` never imports them by name. Modules import heavy
libraries inside their handlers, so ``ferry --help`` stays fast. A handler returns the exit code;
``FerryError`` from a server becomes its message on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from ferry.core.errors import FerryError

COMMAND_MODULES = [
    "ferry.cli.serve",
    "ferry.cli.export",
    "ferry.cli.up",
    "ferry.cli.infer",
    "ferry.cli.train",
]

ENTRY_POINT_GROUP = "ferry.commands"

EXIT_ERROR = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferry", description="Train, export and serve models over KServe v2 gRPC."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for register in plugin_commands():
        register(sub)
    return parser


def plugin_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """The ``register`` functions of the ``ferry.commands`` entry points, by entry name."""
    found = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    return [ep.load() for ep in found]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except FerryError as err:
        print(f"error: {err.code.name}: {err.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
