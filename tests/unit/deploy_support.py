"""Loaders and helpers the deploy/ tests share: paths, the settings check, compose, kustomize, Dockerfiles.

Everything here reads files or runs an offline tool; nothing talks to an engine or a cluster. The
kustomize renders are cached for the whole session (one ``kubectl kustomize`` per build).
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import subprocess
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from tests.support.deps import find_binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_GPU = DEPLOY / "compose.gpu.yaml"
COMPOSE_TLS = DEPLOY / "compose.tls.yaml"
KUSTOMIZE_DIRS = {
    "base": DEPLOY / "k8s" / "base",
    "cpu": DEPLOY / "k8s" / "overlays" / "cpu",
    "gpu": DEPLOY / "k8s" / "overlays" / "gpu",
}
# Applied by hand, not part of any overlay: rendered and validated like the rest.
JOBS = DEPLOY / "k8s" / "jobs"
TLS_OVERLAYS = {"cpu", "gpu"}
# Oldest Kubernetes the manifests promise to fit (native gRPC probes are GA since 1.27), and the newest
# whose schemas kubernetes-validate ships.
K8S_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
NAMESPACE = "ferry"

# service -> (settings class, env prefix, gRPC port, metrics port)
SERVICES = {
    "gateway": ("gateway.settings:GatewaySettings", "FERRY_GATEWAY_", 8001, 9100),
    "worker": ("services.inference.settings:WorkerSettings", "FERRY_WORKER_", 8001, 9101),
    "trainer": ("services.trainer.settings:TrainerSettings", "FERRY_TRAINER_", 8002, 9102),
    "exporter": ("services.exporter.settings:ExporterSettings", "FERRY_EXPORTER_", 8003, 9103),
}
# service -> its KServe v2 REST port where the images and manifests open one: the gateway's, beside
# its gRPC port (Triton's layout, HTTP 8000 + gRPC 8001); a worker's REST port is off by default.
HTTP_PORTS = {"gateway": 8000}
# Dockerfile -> the service targets it builds.
DOCKERFILES = {
    "Dockerfile": ["gateway", "worker", "trainer", "exporter"],
    "Dockerfile.cuda": ["worker", "trainer"],
}
# The Redis release every manifest runs: the 2026-09-18 security release of the 8.8 line.
REDIS_TAG = "8.8.3-alpine"
PROBES = ("livenessProbe", "readinessProbe", "startupProbe")
HEALTHCHECK_SCRIPT = "/opt/ferry/healthcheck.py"


def ferry_image(image: str) -> tuple[str, str] | None:
    """(service, tag) for a Ferry image reference ``[registry/]ferry/<service>[:tag][@digest]``, else None.

    Compose writes the registry as ``${FERRY_REGISTRY:-default}``: the default stands in for it."""
    image = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", image)
    ref = image.partition("@")[0]
    path, tag = ref, ""
    if ":" in ref.rsplit("/", 1)[-1]:
        path, _, tag = ref.rpartition(":")
    parts = path.split("/")
    if len(parts) >= 2 and parts[-2] == "ferry":
        return parts[-1], tag
    return None


# --------------------------------------------------------------------------- settings


def tool(name: str) -> str:
    """A binary from the dev extra: beside this interpreter first (the venv), then PATH."""
    found = find_binary(name)
    if not found:
        pytest.fail(f"{name} not found: install the dev extra (pip install -c constraints.txt -e '.[dev]')")
    return found


def settings_class(service: str) -> type:
    target = SERVICES[service][0]
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def ferry_env(env: dict[str, str], service: str) -> dict[str, str]:
    prefix = SERVICES[service][1]
    return {k: v for k, v in env.items() if k.startswith(prefix)}


def check_settings_env(service: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every FERRY_<SERVICE>_* name is a settings field (unknown ones are silently ignored by
    pydantic-settings, so a typo would quietly change nothing), and the values parse."""
    cls = settings_class(service)
    prefix = SERVICES[service][1]
    ours = ferry_env(env, service)
    unknown = sorted(k for k in ours if k[len(prefix) :].lower() not in cls.model_fields)
    assert not unknown, f"{service}: {unknown} match no field of {cls.__name__}"
    for key in list(os.environ):
        if key.startswith(prefix):
            monkeypatch.delenv(key)
    for key, value in ours.items():
        monkeypatch.setenv(key, value)
    return cls.load()


# --------------------------------------------------------------------------- compose


@cache
def compose_doc() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


@cache
def compose_schema() -> dict[str, Any]:
    text = (
        resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    return json.loads(text)


def compose_errors(doc: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]


def ferry_services(doc: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """compose service name -> (Ferry service, definition), from the image name .../ferry/<service>."""
    out = {}
    for name, svc in doc["services"].items():
        found = ferry_image(svc.get("image", ""))
        if found:
            out[name] = (found[0], svc)
    return out


# --------------------------------------------------------------------------- kubernetes


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """One ``kubectl kustomize`` per build for the whole session; ``jobs`` is deploy/k8s/jobs."""
    folder = JOBS if overlay == "jobs" else KUSTOMIZE_DIRS[overlay]
    proc = subprocess.run(
        [tool("kubectl"), "kustomize", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def only_container(deploy: dict[str, Any]) -> dict[str, Any]:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deploy["metadata"]["name"]
    return containers[0]


def env_values(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def ferry_deployments(docs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    """Ferry service -> its Deployment, found by the image .../ferry/<service>."""
    out = {}
    for deploy in by_kind(docs, "Deployment").values():
        found = ferry_image(only_container(deploy)["image"])
        if found:
            out[found[0]] = deploy
    return out


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --------------------------------------------------------------------------- Dockerfiles


@cache
def dockerfile_structure(dockerfile: Path) -> tuple[dict[str, Any], ...]:
    parser = DockerfileParser(fileobj=io.BytesIO(dockerfile.read_bytes()))
    return tuple(i for i in parser.structure if i["instruction"] != "COMMENT")


@cache
def dockerfile_stages(dockerfile: Path) -> dict[str, dict[str, Any]]:
    """Stage name -> {"base": FROM's image or parent stage, "instructions": [(INSTR, value), ...]},
    with the global ARG defaults substituted into FROM lines."""
    args: dict[str, str] = {}
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for instr in dockerfile_structure(dockerfile):
        kind, value = instr["instruction"], instr["value"]
        if kind == "FROM":
            image, _, name = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], value).partition(" AS ")
            current = {"base": image.strip(), "instructions": []}
            stages[name.strip()] = current
        elif current is None:
            assert kind == "ARG", f"{dockerfile.name}: only ARG may come before FROM"
            key, _, default = value.partition("=")
            args[key] = default
        else:
            current["instructions"].append((kind, value))
    return stages


def target_chain(dockerfile: Path, target: str) -> list[tuple[str, str]]:
    """All instructions that shape ``target``, its ancestors' first."""
    stages = dockerfile_stages(dockerfile)
    stage = stages[target]
    parent = stage["base"]
    inherited = target_chain(dockerfile, parent) if parent in stages else []
    return [*inherited, *stage["instructions"]]


def root_image(dockerfile: Path, target: str) -> str:
    stages = dockerfile_stages(dockerfile)
    while target in stages:
        target = stages[target]["base"]
    return target


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for kind, value in instructions:
        if kind == "ENV":
            for key, val in re.findall(r"(\w+)=(\S+)", value.replace("\\", " ")):
                env[key] = val
    return env
