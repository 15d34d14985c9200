"""The layering the design promises, checked on the source and at run time.

Statically: every ``.py`` file under ferry/ (but the generated ferry/_proto), services/,
gateway/ and benchmarks/ is parsed, and each ``import``/``from ... import`` anywhere in it
(function-level, lazy imports included; relative ones resolved) is an edge of the module
graph. That graph must have no cycle, and imports run one way (each may import itself)::

    benchmarks      -> ferry             (never services or gateway: it runs them as processes)
    services.<one>  -> ferry             (never another service, the gateway or benchmarks)
    gateway         -> ferry             (never services or benchmarks)
    ferry           -> ferry             (never services, gateway or benchmarks)
    ferry.core      -> ferry._proto      (nothing else of ferry)
    ferry.client    -> ferry.core, ferry._proto
    ferry.cli       <- nothing           (the CLI is the top: no module imports it)

At run time: importing the gateway or a worker never loads torch (checked in a fresh
interpreter, with plain imports: a broken Ferry import fails here, it is never skipped).
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("ferry", "services", "gateway", "benchmarks")
EXCLUDED = ("ferry._proto",)  # generated code: not parsed, but importing it is an ordinary edge


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int

    def where(self, modules: Mapping[str, Path]) -> str:
        path = modules[self.source]
        path = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        return f"{path}:{self.line}: {self.source} imports {self.target}"


def _excluded(name: str) -> bool:
    return any(name == e or name.startswith(e + ".") for e in EXCLUDED)


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = REPO) -> dict[str, Path]:
    """Module name -> file, for every parsed module."""
    found: dict[str, Path] = {}
    for top in ROOTS:
        for path in sorted((root / top).rglob("*.py")):
            name = module_name(path, root)
            if not _excluded(name):
                found[name] = path
    return found


def _resolve(name: str, known: Iterable[str]) -> str:
    """The longest prefix of a dotted name that is a known module (or the name's package)."""
    known = set(known)
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return name


def imports_of(name: str, path: Path, known: Iterable[str]) -> Iterator[Edge]:
    """Every project-internal import of one module, wherever it sits in the file."""
    known = set(known)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                drop = node.level - 1
                if drop > len(package):
                    raise AssertionError(f"{path}:{node.lineno}: relative import above the top package")
                base = package[: len(package) - drop] if drop else package
                stem = ".".join([*base, *([node.module] if node.module else [])])
            else:
                stem = node.module or ""
            for alias in node.names:  # `from pkg import mod` names a module; otherwise pkg itself
                full = f"{stem}.{alias.name}"
                targets.append(full if full in known else stem)
        for target in targets:
            if target.partition(".")[0] in ROOTS:
                yield Edge(name, target if _excluded(target) else _resolve(target, known), node.lineno)


def import_edges(root: Path = REPO) -> tuple[dict[str, Path], list[Edge]]:
    modules = project_modules(root)
    edges = [e for name, path in modules.items() for e in imports_of(name, path, modules)]
    return modules, edges


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    nodes = sorted(set(graph) | {t for ts in graph.values() for t in ts})
    succ = {n: sorted(set(graph.get(n, ()))) for n in nodes}

    def connect(v: str) -> None:  # recursion depth is bounded by the module count
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in succ[v]:
                components.append(sorted(component))

    for v in nodes:
        if v not in index:
            connect(v)
    return [_cycle_in(component, succ) for component in sorted(components)]


def _cycle_in(component: list[str], succ: Mapping[str, list[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    inside = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in succ[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w in inside and w not in parents:
                    parents[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle in component {component}")  # unreachable for an SCC


def _within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _service(name: str) -> str:
    return ".".join(name.split(".")[:2])


def violation(edge: Edge) -> str | None:
    """Why one import breaks the layering, or None."""
    src, dst = edge.source, edge.target
    if _within(dst, "ferry.cli") and not _within(src, "ferry.cli"):
        return "nothing outside ferry.cli imports the CLI"
    if _within(src, "ferry"):
        if _within(dst, "services", "gateway", "benchmarks"):
            return "ferry imports no service, gateway or benchmarks"
        if _within(src, "ferry.core") and not _within(dst, "ferry.core", "ferry._proto"):
            return "ferry.core imports only ferry.core and ferry._proto"
        if _within(src, "ferry.client") and not _within(dst, "ferry.client", "ferry.core", "ferry._proto"):
            return "ferry.client imports only ferry.client, ferry.core and ferry._proto"
    elif _within(src, "services"):
        if _within(dst, "gateway", "benchmarks"):
            return "a service imports neither the gateway nor benchmarks"
        if _within(dst, "services") and dst != "services" and _service(dst) != _service(src):
            return "a service never imports another service"
    elif _within(src, "gateway") and _within(dst, "services", "benchmarks"):
        return "the gateway imports neither services nor benchmarks"
    elif _within(src, "benchmarks") and _within(dst, "services", "gateway"):
        return "benchmarks import ferry only (they run services and the gateway as processes)"
    return None


# --- the checks on this repository ------------------------------------------------------------


def test_the_parser_sees_every_package() -> None:
    modules, edges = import_edges()
    for expected in ("ferry.core.codec", "services.trainer.jobs", "gateway.server", "benchmarks.cli"):
        assert expected in modules
    assert not any(m.startswith("ferry._proto") for m in modules)
    # a lazy (function-level) import is an edge too: the runner imports checkpoints in a function
    assert ("services.trainer.runner", "services.trainer.checkpoints") in {
        (e.source, e.target) for e in edges
    }


def cycle_report(modules: Mapping[str, Path], edges: Iterable[Edge]) -> list[str]:
    """Each import cycle among ``modules``, with the file and line of every import in it."""
    edges = list(edges)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        if e.target in modules:
            graph[e.source].add(e.target)
    lines = []
    for cycle in find_cycles(graph):
        lines.append("cycle: " + " -> ".join(cycle))
        for a, b in itertools.pairwise(cycle):
            hit = next(e for e in edges if e.source == a and e.target == b)
            lines.append("    " + hit.where(modules))
    return lines


def test_no_import_cycles() -> None:
    modules, edges = import_edges()
    report = cycle_report(modules, edges)
    cycles = sum(line.startswith("cycle:") for line in report)
    print(f"{len(modules)} modules, {len(edges)} internal imports, {cycles} cycles")
    assert not report, "\n".join(report)


def test_imports_run_one_way() -> None:
    modules, edges = import_edges()
    broken = [f"{e.where(modules)}  ({why})" for e in edges if (why := violation(e))]
    print(f"{len(edges)} internal imports checked, {len(broken)} against the layering")
    assert not broken, "\n".join(broken)


# --- the checker checks itself ----------------------------------------------------------------


def test_cycle_detector_finds_a_synthetic_cycle() -> None:
    graph = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": [], "e": ["e"], "f": ["a"]}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": ["b"], "b": ["c"], "c": []}) == []
    assert find_cycles({"x": ["y"], "y": ["x"]}) == [["x", "y", "x"]]


def test_parser_resolves_relative_and_lazy_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "gateway" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "gateway" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("def f():\n    from ..b import thing\n    import services.x\n")
    (tmp_path / "gateway" / "b.py").write_text("from .sub import a\nimport os\n")
    modules = {module_name(p, tmp_path): p for p in sorted(tmp_path.rglob("*.py"))}
    edges = {(e.source, e.target) for n, p in modules.items() for e in imports_of(n, p, modules)}
    assert edges == {
        ("gateway.sub", "gateway.sub.a"),
        ("gateway.sub.a", "gateway.b"),
        ("gateway.sub.a", "services.x"),
        ("gateway.b", "gateway.sub.a"),
    }
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    assert find_cycles(graph) == [["gateway.b", "gateway.sub.a", "gateway.b"]]
    assert violation(Edge("gateway.sub.a", "services.x", 3)) is not None


@pytest.mark.parametrize(
    ("source", "target", "ok"),
    [
        ("ferry.cli.main", "benchmarks.cli", False),
        ("ferry.core.store", "ferry.client.inference", False),
        ("ferry.core.codec", "ferry._proto.inference.grpc_service_pb2", True),
        ("services.trainer.jobs", "services.inference.runner", False),
        ("services.trainer.jobs", "services.trainer.records", True),
        ("services.exporter.server", "gateway.ratelimit", False),
        ("gateway.server", "services.inference.server", False),
        ("gateway.server", "benchmarks.loadgen", False),
        ("benchmarks.run", "ferry.client.inference", True),
        ("benchmarks.run", "gateway.server", False),
        ("services.trainer.runner", "ferry.cli.train", False),
        ("ferry.cli.main", "ferry.cli.serve", True),
        ("ferry.demo", "ferry.client.inference", True),
    ],
)
def test_layering_rules(source: str, target: str, ok: bool) -> None:
    assert (violation(Edge(source, target, 1)) is None) is ok


# --- run time: what importing a module loads --------------------------------------------------


def imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=REPO)
    assert out.returncode == 0, f"import {module} failed:\n{out.stderr[-3000:]}"
    return {name.split(".")[0] for name in out.stdout.split()}


@pytest.mark.parametrize(
    "module", ["ferry.core.codec", "ferry.core.grpcserver", "ferry.core.store", "ferry.client.inference"]
)
def test_core_imports_no_service(module: str) -> None:
    assert not imported_after(module) & {"services", "gateway", "benchmarks", "torch", "onnxruntime"}


def test_worker_never_imports_torch() -> None:
    assert not imported_after("services.inference.server") & {"torch", "gateway", "benchmarks"}


def test_gateway_never_imports_torch() -> None:
    assert not imported_after("gateway.server") & {"torch", "onnxruntime", "services", "benchmarks"}
