"""Nothing Ferry reads is unpickled: a pickle is code, and the store, uploads and a factory model's
answers all come from someone else. These scan the source, so a new ``torch.load`` fails here."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pytest

from services.exporter.isolated import pack, unpack

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ferry", "services", "gateway", "benchmarks")
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "_proto" not in p.parts]


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_no_module_imports_an_unpickler() -> None:
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n in UNPICKLERS]
    assert found == []


def test_every_load_refuses_pickles() -> None:
    """``np.load`` only with ``allow_pickle=False``; never ``torch.load``; pipes carry bytes."""
    bad = []
    for path in _sources():
        for call in _calls(ast.parse(path.read_text())):
            name = _name(call.func)
            where = f"{path.relative_to(ROOT)}:{call.lineno} {name}"
            if name.endswith("np.load") or name == "numpy.load":
                flag = [k for k in call.keywords if k.arg == "allow_pickle"]
                if not flag or not (isinstance(flag[0].value, ast.Constant) and flag[0].value.value is False):
                    bad.append(where)
            if name in ("torch.load", "torch.jit.load"):
                bad.append(where)
            if name.endswith(".recv") and "conn" in name:  # multiprocessing's recv() unpickles
                bad.append(where)
    assert bad == []


def test_the_factory_process_wire_carries_data_not_pickles() -> None:
    header, array = unpack(pack({"op": "forward", "batch": 4}, np.arange(6, dtype=np.float32).reshape(2, 3)))
    assert header == {"op": "forward", "batch": 4} and array is not None and array.shape == (2, 3)
    evil = np.array([object()], dtype=object)
    with pytest.raises(ValueError):  # an object array would need a pickle: refused on both ends
        pack({}, evil)
    body = io.BytesIO()
    np.save(body, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    message = (2).to_bytes(4, "big") + b"{}" + body.getvalue()
    with pytest.raises(ValueError):
        unpack(message)
