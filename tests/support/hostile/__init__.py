"""Factory modules that attack the process importing them; the security tests name them in job specs.

Each leaves a marker file (``FERRY_HOSTILE_MARKER``, when set) before it misbehaves, so a test
can prove whether it was imported at all.
"""

from __future__ import annotations

import os
from pathlib import Path


def mark(name: str) -> None:
    folder = os.environ.get("FERRY_HOSTILE_MARKER")
    if folder:
        Path(folder, name).write_text(str(os.getpid()))
