"""Child processes that must not outlive the service that started them.

A job runner or a factory model's process left behind by a killed server would hold a GPU,
a run slot or a store lock, and race the process a restarted server starts for the same work.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``); exit now
    if ``parent`` is already gone, since the death signal can only be armed for the future."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    if parent and os.getppid() != parent:
        os._exit(1)
