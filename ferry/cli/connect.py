"""Where a CLI command sends its calls, and with which credentials: the same for every command.

``ferry status/train/jobs/upload/export/models/infer`` each take ``--address``
(and the older ``--trainer`` / ``--exporter`` spellings), ``--api-key`` and
``--ca-file``. Unset, they fall through, in order, to ``FERRY_<SERVICE>_ADDRESS``
/ ``FERRY_API_KEY`` / ``FERRY_CA_FILE``, then to the running ``ferry up`` stack's
state file (its addresses; with ``--secure``, its CA and key files), then to the
standard port on 127.0.0.1. So a command works against a stack started on free
ports, or with TLS and keys, with no flags at all.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.core.errors import InvalidArgument

STATE_FILE = ".ferry/stack.json"
# gRPC ports (what the CLI speaks); the gateway's HTTP port is 8000, Triton's layout (docs/deployment.md).
DEFAULT_PORTS = {"gateway": 8001, "trainer": 8002, "exporter": 8003}


@dataclass(frozen=True)
class Target:
    """An address and the keyword arguments every Ferry client takes to reach it."""

    address: str
    options: dict[str, Any] = field(default_factory=dict, repr=False)


def add_connection_flags(parser: argparse.ArgumentParser, service: str, *aliases: str) -> None:
    port = DEFAULT_PORTS[service]
    parser.add_argument(
        "--address",
        *aliases,
        dest="address",
        default=None,
        help=f"{service} address (default: FERRY_{service.upper()}_ADDRESS, else the running "
        f"`ferry up`, else 127.0.0.1:{port})",
    )
    parser.add_argument(
        "--api-key", default=None, help="API key (default: FERRY_API_KEY, else the `ferry up --secure` key)"
    )
    parser.add_argument(
        "--ca-file",
        default=None,
        help="CA certificate to trust for TLS (default: FERRY_CA_FILE, else ferry up's)",
    )
    parser.add_argument("--state-file", default=STATE_FILE, help=argparse.SUPPRESS)


def read_state(path: str | Path) -> dict[str, Any]:
    """The running stack's state file, or {} when no stack runs here."""
    file = Path(path)
    if not file.is_file():
        return {}
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise InvalidArgument(f"the stack state file {file} is unreadable: {err}") from err
    return state if isinstance(state, dict) else {}


def _read_secret(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as err:
        raise InvalidArgument(f"cannot read the key file {path}: {err}") from err


def resolve(args: argparse.Namespace, service: str, key_kind: str = "admin") -> Target:
    """The target for ``service``; ``key_kind`` picks which of ferry up's keys to fall back to."""
    state = read_state(getattr(args, "state_file", STATE_FILE))
    address = (
        getattr(args, "address", None)
        or os.environ.get(f"FERRY_{service.upper()}_ADDRESS")
        or state.get("services", {}).get(service)
        or f"127.0.0.1:{DEFAULT_PORTS[service]}"
    )
    secure = state.get("secure") or {}
    options: dict[str, Any] = {}
    key = getattr(args, "api_key", None) or os.environ.get("FERRY_API_KEY")
    if not key and secure.get(f"{key_kind}_key_file"):
        key = _read_secret(secure[f"{key_kind}_key_file"])
    if key:
        options["api_key"] = key
    ca = getattr(args, "ca_file", None) or os.environ.get("FERRY_CA_FILE") or secure.get("ca")
    if ca:
        try:
            options["root_certificates"] = Path(ca).read_bytes()
        except OSError as err:
            raise InvalidArgument(f"cannot read the CA file {ca}: {err}") from err
        options["tls"] = True
    return Target(address, options)


def json_arg(text: str) -> dict[str, Any]:
    """An argparse type: a flag whose value is a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value
