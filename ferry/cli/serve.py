"""``ferry serve <service> [flags]``: run one service in the foreground.

The flags after the service name belong to that service (``ferry serve worker --help``).
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
    parser = sub.add_parser(
        "serve", help="run one service (worker, gateway, trainer, exporter)", add_help=False
    )
    parser.add_argument("service", choices=sorted(SERVICES), help="which service to run")
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, help="the service's own flags (see --help after it)"
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    module = importlib.import_module(SERVICES[args.service])
    return int(module.main(args.args) or 0)
