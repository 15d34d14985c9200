"""The layering the design promises: the core imports no service, workers and gateway no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


def imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


@pytest.mark.parametrize(
    "module", ["ferry.core.codec", "ferry.core.grpcserver", "ferry.core.store", "ferry.client.inference"]
)
def test_core_imports_no_service(module: str) -> None:
    assert not imported_after(module) & {"services", "gateway", "torch", "onnxruntime"}


def test_worker_never_imports_torch() -> None:
    assert "torch" not in imported_after("services.inference.server")


def test_gateway_never_imports_torch() -> None:
    pytest.importorskip("gateway.server")
    assert not imported_after("gateway.server") & {"torch", "onnxruntime", "services"}
