"""Small network helpers shared by the stack supervisor, the trainer's runner, benchmarks and tests."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago: the OS picks it, the socket is closed.

    Another process may take it before the caller binds it; callers that can bind ``--port 0``
    themselves and read the port back should do that instead.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
