"""Skips only for what lies outside the project, and none at all in CI.

On a developer's machine a missing dev dependency (``tritonclient``, ``torch``, a
``redis-server`` binary) skips the tests that need it, with the reason. With ``CI`` set the
same absence fails the run: CI installs everything, so a skip there would hide a broken
install step. Ferry's own modules are never imported through here: they are imported plainly,
so a broken Ferry import is an error, not a skip.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

_INSTALL_HINT = "run `make setup` (tools/setup.sh) to install the dev dependencies"


def in_ci() -> bool:
    """True when the run must not skip for a missing dependency."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def missing(what: str) -> NoReturn:
    """Skip the calling test or module for a missing dependency, or fail when in CI."""
    message = f"{what} is not installed; {_INSTALL_HINT}"
    if in_ci():
        pytest.fail(f"CI requires it: {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_module(name: str) -> ModuleType:
    """Import a third-party module the tests need (never one of Ferry's own)."""
    top = name.partition(".")[0]
    if top in {"ferry", "services", "gateway", "benchmarks", "tests"}:
        raise ValueError(f"{name} is Ferry's own module: import it plainly")
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"the Python package for {name!r}")


def find_binary(name: str) -> str | None:
    """An executable beside the interpreter (the venv's console scripts) first, then on PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name)


def require_binary(name: str) -> str:
    """The path of an executable the tests need; skips or fails like `require_module`."""
    found = find_binary(name)
    if not found:
        missing(f"the {name!r} executable")
    return found
