"""docs/openapi.yaml lists exactly the REST routes the worker serves, each with its method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ferry.core.auth import RULES, is_open
from ferry.core.rest_routes import endpoints

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
METHODS = {"get", "post", "put", "delete", "patch"}


def _documented() -> set[tuple[str, str]]:
    doc: dict[str, Any] = yaml.safe_load(DOC.read_text())
    assert doc["openapi"].startswith("3.")
    return {(m.upper(), path) for path, item in doc["paths"].items() for m in item if m in METHODS}


def test_the_document_lists_every_route_and_no_other() -> None:
    served = {(e.method, e.path) for e in endpoints(None)}  # type: ignore[arg-type]
    documented = _documented()
    assert served - documented == set(), "served but not documented"
    assert documented - served == set(), "documented but not served"


def test_every_route_obeys_a_known_grpc_rule() -> None:
    for e in endpoints(None):  # type: ignore[arg-type]
        assert is_open(e.rpc) or e.rpc in RULES, f"{e.method} {e.path}: {e.rpc} has no auth rule"
