"""``ferry serve <service> [flags]``: run one service in the foreground.

The flags after the service name belong to that service (``ferry serve worker --help``);
``ferry serve --help`` lists the services.
"""

from __future__ import annotations

import argparse
import importlib

SERVICES = {
    "worker": "services.inference.server",
    "gateway": "gateway.server",
    "trainer": "services.trainer.server",
    "exporter": "services.exporter.server",
}


def register(sub: argparse._SubParsersAction) -> None:
    # The default -h/--help is kept: argparse hands everything after the service name, --help
    # included, to ``args`` (REMAINDER), so ``ferry serve worker --help`` is the worker's own help.
    parser = sub.add_parser(
        "serve",
        help="run one service (worker, gateway, trainer, exporter)",
        description="Run one Ferry service in the foreground. Services: "
        + ", ".join(f"{name} ({module})" for name, module in SERVICES.items())
        + ". The flags after the service name are that service's (ferry serve SERVICE --help).",
    )
    parser.add_argument(
        "service", choices=list(SERVICES), metavar="SERVICE", help="one of: " + ", ".join(SERVICES)
    )
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, help="the service's own flags (see --help after it)"
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    module = importlib.import_module(SERVICES[args.service])
    return int(module.main(args.args) or 0)
