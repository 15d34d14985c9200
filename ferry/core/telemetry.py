"""Structured logs and Prometheus metrics, configured once per process in ``main()``.

Logs are one JSON object per line, quiet (WARNING) by default; ``--log-level``
or ``FERRY_<SERVICE>_LOG_LEVEL`` raises it. Metrics are served over HTTP at
``/metrics`` on the port the service's settings name (0 = off).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; extra fields given with ``extra=`` ride along."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "WARNING", service: str = "ferry") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("ferry").info("logging configured", extra={"service": service, "started": time.time()})


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serve Prometheus metrics on ``host:port``; returns the bound port (0 means off)."""
    if port <= 0:
        return 0
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)
