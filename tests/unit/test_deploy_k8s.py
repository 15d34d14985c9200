"""deploy/k8s rendered with kustomize and checked offline.

Every build validates, strictly, against the Kubernetes OpenAPI schemas; then the pieces are checked
against each other and the code: probes, security contexts, the store, GPUs, images, settings names.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.unit.deploy_crds import crd_errors
from tests.unit.deploy_netpol import Pod, can_connect
from tests.unit.deploy_support import (
    DEPLOY,
    DOCKERFILES,
    HEALTHCHECK_SCRIPT,
    HTTP_PORTS,
    K8S_VERSIONS,
    KUSTOMIZE_DIRS,
    NAMESPACE,
    PROBES,
    REDIS_TAG,
    ROOT,
    SERVICES,
    TLS_OVERLAYS,
    by_kind,
    check_settings_env,
    env_values,
    ferry_deployments,
    ferry_image,
    only_container,
    render,
    selects,
)


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(overlay: str, version: str) -> None:
    """Built-in kinds against the Kubernetes schemas; cert-manager's kinds against ours (deploy_crds)."""
    docs = render(overlay)
    failures = []
    for doc in docs:
        crd = crd_errors(doc)
        if crd is not None:
            failures += [f"{doc['kind']}/{doc['metadata']['name']}: {e}" for e in crd]
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {err}")
    assert not failures, "\n".join(failures)


def test_custom_resource_check_rejects_a_broken_certificate() -> None:
    """Our cert-manager schema bites: a misspelt field and a usage cert-manager does not know."""
    cert = copy.deepcopy(by_kind(render("cpu"), "Certificate")["ferry-worker-tls"])
    assert crd_errors(cert) == []
    cert["spec"]["dnsName"] = cert["spec"].pop("dnsNames")
    cert["spec"]["usages"].append("server-auth")
    errors = crd_errors(cert) or []
    assert any("dnsName" in e for e in errors), errors
    assert any("server-auth" in e for e in errors), errors


def test_kubernetes_schema_check_rejects_a_broken_manifest() -> None:
    """The schema check bites: a misspelt field (strict) and a wrong type are both rejected."""
    deploy = copy.deepcopy(by_kind(render("base"), "Deployment")["ferry-gateway"])
    deploy["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSIONS[0], strict=True)
    deploy = copy.deepcopy(by_kind(render("base"), "Deployment")["ferry-gateway"])
    only_container(deploy)["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_every_deployment_has_probes_resources_and_runs_as_non_root(overlay: str) -> None:
    deployments = by_kind(render(overlay), "Deployment")
    assert set(deployments) >= {f"ferry-{s}" for s in SERVICES} | {"ferry-redis"}
    for name, deploy in deployments.items():
        pod = deploy["spec"]["template"]["spec"]
        container = only_container(deploy)
        assert "livenessProbe" in container and "readinessProbe" in container, name
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name} {kind}"
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["automountServiceAccountToken"] is False, name
        # What the namespace's Pod Security "restricted" level enforces.
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= {"emptyDir", "persistentVolumeClaim", "secret", "configMap"}, (
                name
            )
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False, name
        assert ctx["readOnlyRootFilesystem"] is True, name
        assert ctx["capabilities"]["drop"] == ["ALL"], name


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_ferry_probes_ask_grpc_health_on_the_serving_port(overlay: str) -> None:
    """Plaintext pods use the kubelet's native grpc probe; TLS pods (the kubelet's probe cannot do
    TLS) run the images' health check, aimed at the same port with the mounted certificates."""
    tls_services = {"gateway", "worker"} if overlay in TLS_OVERLAYS else set()
    for service, deploy in ferry_deployments(render(overlay)).items():
        container = only_container(deploy)
        env = env_values(container)
        port = SERVICES[service][2]
        assert int(env[f"{SERVICES[service][1]}PORT"]) == port, service
        assert {"name": "grpc", "containerPort": port} in container["ports"], service
        if service in HTTP_PORTS:  # the REST port beside it; the probes stay on gRPC
            assert int(env[f"{SERVICES[service][1]}HTTP_PORT"]) == HTTP_PORTS[service], service
            assert {"name": "http", "containerPort": HTTP_PORTS[service]} in container["ports"], service
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
    deployments = ferry_deployments(render(overlay))
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
        container = only_container(deploy)
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        assert set(secrets.values()) == expected.get(service, set()), service
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        for key, value in env_values(container).items():
            if value.startswith("/etc/ferry/"):
                folder = str(Path(value).parent)
                assert mounts.get(folder) in secrets, f"{service}: {key}={value} is not on a mounted secret"
    if overlay in TLS_OVERLAYS:
        gateway = env_values(only_container(deployments["gateway"]))
        worker = env_values(only_container(deployments["worker"]))
        assert gateway["FERRY_GATEWAY_WORKER_TLS"] == "true"
        assert {"FERRY_GATEWAY_TLS_CERT", "FERRY_GATEWAY_TLS_KEY", "FERRY_GATEWAY_WORKER_CERT"} <= set(
            gateway
        )
        assert {"FERRY_WORKER_TLS_CERT", "FERRY_WORKER_TLS_KEY", "FERRY_WORKER_TLS_CLIENT_CA"} <= set(worker)


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_hpa_and_pdb_target_the_gateway(overlay: str) -> None:
    docs = render(overlay)
    gateway = by_kind(docs, "Deployment")["ferry-gateway"]
    assert "replicas" not in gateway["spec"], "the HPA owns the gateway's replica count"
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["ferry-gateway"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "ferry-gateway",
    }
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = by_kind(docs, "PodDisruptionBudget")["ferry-gateway"]
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain must be able to evict one"
    others = [d for n, d in by_kind(docs, "Deployment").items() if n != "ferry-gateway"]
    for other in others:
        assert not selects(
            pdb["spec"]["selector"]["matchLabels"], other["spec"]["template"]["metadata"]["labels"]
        )


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_one_shared_read_write_many_store(overlay: str) -> None:
    docs = render(overlay)
    pvcs = by_kind(docs, "PersistentVolumeClaim")
    assert list(pvcs) == ["ferry-store"]
    assert pvcs["ferry-store"]["spec"]["accessModes"] == ["ReadWriteMany"]
    for service, deploy in ferry_deployments(docs).items():
        pod = deploy["spec"]["template"]["spec"]
        claims = [
            v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        ]
        mounts = {m["name"]: m["mountPath"] for m in only_container(deploy)["volumeMounts"]}
        if service == "gateway":
            assert claims == [], "the gateway is stateless"
            continue
        assert claims == ["ferry-store"], service
        assert (
            mounts["store"]
            == env_values(only_container(deploy))[f"{SERVICES[service][1]}STORE"]
            == "/data/store"
        )


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_everything_lands_in_one_namespace(overlay: str) -> None:
    docs = render(overlay)
    assert by_kind(docs, "Namespace").keys() == {NAMESPACE}
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_only_the_gpu_overlay_asks_for_gpus(overlay: str) -> None:
    deployments = ferry_deployments(render(overlay))
    for service, deploy in deployments.items():
        resources_ = only_container(deploy)["resources"]
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
    for service, deploy in ferry_deployments(render(overlay)).items():
        image = only_container(deploy)["image"]
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
    deploy = ferry_deployments(render(overlay))[service]
    settings = check_settings_env(service, env_values(only_container(deploy)), monkeypatch)
    assert settings.host == "0.0.0.0"
    assert settings.port == SERVICES[service][2]
    assert settings.metrics_port == SERVICES[service][3]
    assert getattr(settings, "http_port", 0) == HTTP_PORTS.get(service, 0)


def test_the_gateway_service_exposes_http_8000_and_grpc_8001() -> None:
    """Triton's layout on the ClusterIP Service: KServe v2 REST on 8000, gRPC on 8001."""
    ports = {p["name"]: p for p in by_kind(render("base"), "Service")["ferry-gateway"]["spec"]["ports"]}
    assert ports["http"]["port"] == HTTP_PORTS["gateway"] == 8000 and ports["http"]["targetPort"] == "http"
    assert ports["grpc"]["port"] == SERVICES["gateway"][2] == 8001 and ports["grpc"]["targetPort"] == "grpc"
    assert ports["grpc"]["appProtocol"] == "grpc"


PRODUCTION = sorted(set(KUSTOMIZE_DIRS) - {"base"})
COMPONENTS = DEPLOY / "k8s" / "components"


def _prestop_sleep(container: dict[str, Any]) -> float:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "-c"], "the images may lack /bin/sleep; their python is there"
    match = re.fullmatch(r"import time; time\.sleep\((\d+(?:\.\d+)?)\)", command[2])
    assert match, command
    return float(match.group(1))


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_pods_drain_before_they_are_killed(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """preStop sleep (endpoints and DNS let go of the pod), then the service's own drain delay and
    grace, all inside terminationGracePeriodSeconds with room to spare: SIGKILL never cuts a drain."""
    for service, deploy in ferry_deployments(render(overlay)).items():
        container = only_container(deploy)
        sleep = _prestop_sleep(container)
        assert sleep >= 3, service
        settings = check_settings_env(service, env_values(container), monkeypatch)
        drain = getattr(settings, "drain_delay_s", 0.0) + settings.grace_s
        period = deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert period >= sleep + drain + 5, f"{service}: {period} s < {sleep} + {drain} + 5"


def _startup_window(container: dict[str, Any]) -> int:
    probe = container["startupProbe"]
    return int(probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3))


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_startup_probes_leave_time_for_model_load(overlay: str) -> None:
    deployments = ferry_deployments(render(overlay))
    worker = only_container(deployments["worker"])
    gpu = overlay == "gpu"
    assert _startup_window(worker) >= (600 if gpu else 180), "a worker loads and warms its models first"
    assert _startup_window(worker) > _startup_window(only_container(deployments["gateway"]))
    for service, deploy in deployments.items():
        container = only_container(deploy)
        assert container["readinessProbe"].get("periodSeconds", 10) <= 5, service
        assert container["livenessProbe"].get("failureThreshold", 3) >= 3, service


def test_store_class_is_set_in_one_place() -> None:
    value = yaml.safe_load((COMPONENTS / "storage" / "store-class.yaml").read_text())["data"][
        "storageClassName"
    ]
    assert "storageClassName" not in by_kind(render("base"), "PersistentVolumeClaim")["ferry-store"]["spec"]
    for overlay in PRODUCTION:
        docs = render(overlay)
        assert by_kind(docs, "PersistentVolumeClaim")["ferry-store"]["spec"]["storageClassName"] == value
        assert "ferry-store-class" not in by_kind(docs, "ConfigMap"), "local-config: never applied"


ADAPTER_VALUES = COMPONENTS / "autoscaling" / "prometheus-adapter-values.yaml"
WORKER_METRICS = {"ferry_worker_queue_depth", "ferry_worker_in_flight", "ferry_worker_queue_time_seconds"}


def _pods_metrics(hpa: dict[str, Any]) -> set[str]:
    return {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}


@pytest.mark.parametrize("overlay", PRODUCTION)
def test_workers_and_gateway_scale_on_load(overlay: str) -> None:
    docs = render(overlay)
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    worker = hpas["ferry-worker"]
    assert worker["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "ferry-worker",
    }
    assert _pods_metrics(worker) == WORKER_METRICS
    assert "replicas" not in by_kind(docs, "Deployment")["ferry-worker"]["spec"], "the HPA owns the count"
    assert 2 <= worker["spec"]["minReplicas"] < worker["spec"]["maxReplicas"]
    assert worker["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300, (
        "a load costs minutes"
    )
    gateway = hpas["ferry-gateway"]
    assert _pods_metrics(gateway) == {"ferry_gateway_in_flight"}
    assert any(m["type"] == "Resource" for m in gateway["spec"]["metrics"]), "CPU still counts"
    if overlay == "gpu":
        assert worker["spec"]["maxReplicas"] < 10, "no more workers than GPUs"
    # Every metric an HPA reads has a prometheus-adapter rule that serves it under that name.
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    served = {r["name"]["as"] for r in rules}
    for hpa in hpas.values():
        assert _pods_metrics(hpa) <= served, hpa["metadata"]["name"]
    for rule in rules:
        assert rule["seriesQuery"].startswith(rule["name"]["as"] + "{")
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_the_services_export_the_metrics_their_autoscalers_read() -> None:
    from gateway import metrics

    assert metrics.IN_FLIGHT.describe()[0].name == "ferry_gateway_in_flight"
    worker_metrics = (ROOT / "services" / "inference" / "metrics.py").read_text()
    for name in WORKER_METRICS:
        assert f'"{name}"' in worker_metrics, f"the worker exports no {name}"


@pytest.mark.parametrize("service", ["worker", "trainer"])
def test_gpu_pods_run_the_cuda_images_and_refuse_cpu(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU worker serving on CPU looks healthy and is an outage: the gpu overlay asks for CUDA."""
    deploy = ferry_deployments(render("gpu"))[service]
    env = env_values(only_container(deploy))
    if service == "worker":
        settings = check_settings_env("worker", env, monkeypatch)
        assert settings.providers[0] == "CUDAExecutionProvider"
        assert settings.allow_cpu_fallback is False
    assert ferry_image(only_container(deploy)["image"]) == (service, "0.1.0-cuda")


def test_the_base_scales_the_gateway_on_cpu_only() -> None:
    hpas = by_kind(render("base"), "HorizontalPodAutoscaler")
    assert set(hpas) == {"ferry-gateway"}, "load-based scaling needs prometheus-adapter: overlays only"
    assert _pods_metrics(hpas["ferry-gateway"]) == set()


@pytest.mark.parametrize("overlay", PRODUCTION)
def test_cert_manager_issues_every_mounted_secret(overlay: str) -> None:
    docs = render(overlay)
    certificates = by_kind(docs, "Certificate")
    issued = {c["spec"]["secretName"]: c for c in certificates.values()}
    issuers = by_kind(docs, "Issuer")
    for cert in certificates.values():
        assert cert["spec"]["issuerRef"]["name"] in issuers, cert["metadata"]["name"]
    ca = issued.pop("ferry-ca")
    assert ca["spec"]["isCA"] is True and issuers["ferry-ca"]["spec"]["ca"]["secretName"] == "ferry-ca"
    for cert in issued.values():
        assert cert["spec"]["issuerRef"]["name"] == "ferry-ca", cert["metadata"]["name"]
        assert cert["spec"]["privateKey"]["rotationPolicy"] == "Always"
    mounted = set()
    for name, deploy in by_kind(docs, "Deployment").items():
        pod = deploy["spec"]["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        mounted |= set(secrets.values())
        for mount in only_container(deploy)["volumeMounts"]:
            if mount["name"] in secrets:
                assert "subPath" not in mount, f"{name}: a subPath mount never sees a renewed certificate"
        env = env_values(only_container(deploy))
        for key, value in env.items():
            if key.endswith("SERVER_NAME"):
                towards_worker = name == "ferry-worker" or "_WORKER_" in key
                holder = "ferry-worker-tls" if towards_worker else "ferry-gateway-tls"
                assert value in issued[holder]["spec"]["dnsNames"], f"{name}: {key}={value}"
    assert mounted == set(issued), "every mounted Secret is issued, every issued one is mounted"
    worker = issued["ferry-worker-tls"]["spec"]["usages"]
    assert {"server auth", "client auth"} <= set(worker), "the worker's probe presents it as a client"
    assert "client auth" in issued["ferry-gateway-worker-client"]["spec"]["usages"]


def _redis_conf(docs: tuple[dict[str, Any], ...]) -> dict[str, list[str]]:
    (config,) = [c for n, c in by_kind(docs, "ConfigMap").items() if n.startswith("ferry-redis-config")]
    out: dict[str, list[str]] = {}
    for line in config["data"]["redis.conf"].splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.setdefault(key, []).append(value)
    return out


def _megabytes(text: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(mb|gb|Mi|Gi)", text).groups()  # type: ignore[union-attr]
    return float(number) * (1024 if unit in ("gb", "Gi") else 1)


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_redis_is_a_hardened_bounded_cache(overlay: str) -> None:
    docs = render(overlay)
    deploy = by_kind(docs, "Deployment")["ferry-redis"]
    container = only_container(deploy)
    assert container["image"] == f"docker.io/library/redis:{REDIS_TAG}"
    conf = _redis_conf(docs)
    assert conf["maxmemory-policy"] == ["allkeys-lru"] and conf["protected-mode"] == ["yes"]
    assert conf["save"] == ['""'] and conf["appendonly"] == ["no"]
    disabled = {v.split()[0] for v in conf["rename-command"] if v.split()[1:] == ['""']}
    assert {"FLUSHALL", "FLUSHDB", "CONFIG", "DEBUG", "KEYS", "MODULE", "EVAL", "SHUTDOWN"} <= disabled
    assert not {"EVALSHA", "SCRIPT", "GET", "SET", "MGET", "PING"} & disabled, "the gateway needs these"
    limit = _megabytes(container["resources"]["limits"]["memory"])
    assert _megabytes(conf["maxmemory"][0]) * 1.2 <= limit, "room for buffers under the hard limit"
    config_volume = next(v for v in deploy["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    assert config_volume["configMap"]["name"].startswith("ferry-redis-config-"), "hashed: an edit rolls Redis"
    args = container["args"]
    assert args[0] == "/etc/redis/redis.conf"
    if overlay in TLS_OVERLAYS:
        assert args[args.index("--port") + 1] == "0", "TLS only"
        assert args[args.index("--tls-port") + 1] == "6379"
        assert "--tls" in container["readinessProbe"]["exec"]["command"]
    else:
        assert "--tls-port" not in args


IMAGES_COMPONENT = COMPONENTS / "images" / "kustomization.yaml"


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_images_are_fully_qualified_from_one_place(overlay: str) -> None:
    mapped = yaml.safe_load(IMAGES_COMPONENT.read_text())["images"]
    names = {m["newName"] for m in mapped}
    for deploy in by_kind(render(overlay), "Deployment").values():
        image = only_container(deploy)["image"]
        registry = image.split("/", 1)[0]
        assert "." in registry or registry == "localhost", f"{image}: name the registry"
        assert image.partition("@")[0].rpartition(":")[0] in names, (
            f"{image} is not set in {IMAGES_COMPONENT}"
        )
    # Nowhere else: no other manifest names a registry.
    for path in sorted((DEPLOY / "k8s").rglob("*.yaml")):
        if path != IMAGES_COMPONENT:
            text = path.read_text()
            assert "registry.example.com" not in text and "docker.io" not in text, path
    gpu_tags = {m["name"]: m["newTag"] for m in mapped}
    for service in ("worker", "trainer"):
        assert gpu_tags[f"ferry/{service}-cuda"] == gpu_tags[f"ferry/{service}"] + "-cuda", "one version"


def test_seed_job_copies_into_the_store_atomically() -> None:
    """The one-shot seed Job validates, runs like the services (non-root, read-only root), and only
    renames a version into place once it is whole; its NetworkPolicy opens HTTPS egress for it alone."""
    docs = render("jobs")
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)
        assert doc["metadata"]["namespace"] == NAMESPACE
    job = by_kind(docs, "Job")["ferry-seed-models"]
    pod = job["spec"]["template"]["spec"]
    container = only_container(job)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["ferry-store"]
    script = container["args"][0]
    assert script.index('rclone copy "$SOURCE/models/$model/$version" "$staging"') < script.index(
        'mv "$staging" "$final"'
    )
    assert "/.seed-" in script, "the staging folder's name is no version number, so workers skip it"
    registry = container["image"].split("/", 1)[0]
    assert "." in registry, container["image"]
    (policy,) = by_kind(docs, "NetworkPolicy").values()
    seed = Pod(NAMESPACE, job["spec"]["template"]["metadata"]["labels"])
    everyone = [*_policies_of("cpu"), policy]
    assert can_connect(everyone, seed, Pod("elsewhere", {}), 443)
    assert not can_connect(everyone, GATEWAY_POD, Pod("elsewhere", {}), 443), "the others stay closed"


def _policies_of(overlay: str) -> list[dict[str, Any]]:
    return list(by_kind(render(overlay), "NetworkPolicy").values())


GATEWAY_POD = Pod(NAMESPACE, {"app.kubernetes.io/name": "ferry", "app.kubernetes.io/component": "gateway"})
