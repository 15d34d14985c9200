"""How traffic reaches Ferry's pods in the rendered manifests: Services, worker discovery, NetworkPolicies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.redis_url import parse_redis_url
from tests.unit.deploy_netpol import Pod, can_connect
from tests.unit.deploy_support import (
    KUSTOMIZE_DIRS,
    NAMESPACE,
    SERVICES,
    TLS_OVERLAYS,
    by_kind,
    check_settings_env,
    env_values,
    ferry_deployments,
    only_container,
    render,
    selects,
)


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_gateway_discovers_workers_through_the_headless_service(overlay: str) -> None:
    docs = render(overlay)
    services = by_kind(docs, "Service")
    headless = services["ferry-worker-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"].get("publishNotReadyAddresses", False) is False
    deployments = ferry_deployments(docs)
    worker_labels = deployments["worker"]["spec"]["template"]["metadata"]["labels"]
    assert selects(headless["spec"]["selector"], worker_labels)
    port = next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc")
    ns = headless["metadata"]["namespace"]
    env = env_values(only_container(deployments["gateway"]))
    assert env["FERRY_GATEWAY_WORKERS_DNS"] == f"ferry-worker-headless.{ns}.svc.cluster.local:{port}"
    redis_port = services["ferry-redis"]["spec"]["ports"][0]["port"]
    # The password is interpolated by the kubelet from REDIS_PASSWORD (test_redis_password_...).
    redis = f"://:$(REDIS_PASSWORD)@ferry-redis.{ns}.svc.cluster.local:{redis_port}/0"
    if overlay in TLS_OVERLAYS:
        assert env["FERRY_GATEWAY_REDIS_URL"].startswith(f"rediss{redis}?ssl_ca_certs=/etc/ferry/")
    else:
        assert env["FERRY_GATEWAY_REDIS_URL"] == f"redis{redis}"


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_services_select_one_deployment_and_name_its_ports(overlay: str) -> None:
    docs = render(overlay)
    deployments = by_kind(docs, "Deployment")
    for name, svc in by_kind(docs, "Service").items():
        matches = [
            d
            for d in deployments.values()
            if selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(matches) == 1, f"Service {name} selects {len(matches)} Deployments"
        port_names = {p["name"] for p in only_container(matches[0])["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"Service {name} -> {port['targetPort']}"


LOCKED_OVERLAYS = sorted(set(KUSTOMIZE_DIRS) - {"base"})
FERRY_NS = {"kubernetes.io/metadata.name": NAMESPACE}


def _pod(component: str) -> Pod:
    return Pod(NAMESPACE, {"app.kubernetes.io/name": "ferry", "app.kubernetes.io/component": component})


GATEWAY, WORKER, REDIS, TRAINER, EXPORTER = map(_pod, ["gateway", "worker", "redis", "trainer", "exporter"])
CLIENT = Pod("shop", {"app": "checkout"})
OPERATOR = Pod("ops", {"app": "ferry-cli"}, {"ferry.io/operator": "true"})
PROMETHEUS = Pod("monitoring", {"app": "prometheus"}, {"ferry.io/monitoring": "true"})
DNS = Pod("kube-system", {"k8s-app": "kube-dns"})
INTERNET = Pod("elsewhere", {"app": "anything"})
DEBUG = Pod(NAMESPACE, {"app": "debug"})  # a pod no Ferry policy names


def _policies(overlay: str) -> list[dict[str, Any]]:
    return list(by_kind(render(overlay), "NetworkPolicy").values())


# (source, destination, port) -> may it connect? Every path Ferry needs, and the ones it must not have.
PATHS = [
    (CLIENT, GATEWAY, 8000, True),  # the gateway's KServe v2 REST port
    (CLIENT, GATEWAY, 8001, True),  # and its gRPC port
    (OPERATOR, GATEWAY, 8001, True),
    (GATEWAY, WORKER, 8001, True),
    (GATEWAY, REDIS, 6379, True),
    (OPERATOR, TRAINER, 8002, True),
    (OPERATOR, EXPORTER, 8003, True),
    (PROMETHEUS, WORKER, 9101, True),
    (PROMETHEUS, GATEWAY, 9100, True),
    (CLIENT, WORKER, 8001, False),
    (CLIENT, REDIS, 6379, False),
    (CLIENT, TRAINER, 8002, False),
    (CLIENT, EXPORTER, 8003, False),
    (CLIENT, GATEWAY, 9100, False),
    (WORKER, REDIS, 6379, False),
    (TRAINER, REDIS, 6379, False),
    (GATEWAY, TRAINER, 8002, False),
    (GATEWAY, EXPORTER, 8003, False),
    (WORKER, WORKER, 8001, False),
    (EXPORTER, WORKER, 8001, False),
    (OPERATOR, WORKER, 8001, False),
    (OPERATOR, REDIS, 6379, False),
    (TRAINER, INTERNET, 443, False),
    (EXPORTER, INTERNET, 443, False),
    (WORKER, INTERNET, 443, False),
    (GATEWAY, INTERNET, 443, False),
    (REDIS, INTERNET, 443, False),
    (CLIENT, DEBUG, 8080, False),
    (GATEWAY, DEBUG, 8080, False),
]


@pytest.mark.parametrize("overlay", LOCKED_OVERLAYS)
def test_network_policies_open_only_the_paths_ferry_uses(overlay: str) -> None:
    policies = _policies(overlay)
    wrong = [
        f"{src.labels} -> {dst.labels}:{port} should be {'open' if want else 'closed'}"
        for src, dst, port, want in PATHS
        if can_connect(policies, src, dst, port) != want
    ]
    assert not wrong, "\n".join(wrong)
    for pod in (GATEWAY, WORKER, REDIS, TRAINER, EXPORTER):
        assert can_connect(policies, pod, DNS, 53, "UDP"), f"{pod.labels}: no DNS"
        assert can_connect(policies, pod, DNS, 53, "TCP"), f"{pod.labels}: no DNS over TCP"
    deny = by_kind(render(overlay), "NetworkPolicy")["ferry-default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_network_policy_check_bites() -> None:
    """The default deny is what closes a pod nobody wrote a policy for: drop it and a client gets in."""
    policies = [p for p in _policies("cpu") if p["metadata"]["name"] != "ferry-default-deny"]
    assert can_connect(policies, CLIENT, DEBUG, 8080)
    assert not can_connect(_policies("cpu"), CLIENT, DEBUG, 8080)
    others = [p for p in policies if p["metadata"]["name"] != "ferry-allow-dns"]
    assert can_connect(others, TRAINER, INTERNET, 443), "egress is closed by the DNS-only policy"


def test_the_base_stays_open() -> None:
    """Policies need a CNI that enforces them: they come with the overlays, not the plain base."""
    assert by_kind(render("base"), "NetworkPolicy") == {}


def _value_from(container: dict[str, Any], name: str) -> dict[str, Any]:
    entry = next(e for e in container["env"] if e["name"] == name)
    return entry["valueFrom"]["secretKeyRef"]


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_redis_password_reaches_the_gateway_from_the_secret_redis_reads(overlay: str) -> None:
    docs = render(overlay)
    deployments = by_kind(docs, "Deployment")
    redis = only_container(deployments["ferry-redis"])
    gateway = only_container(deployments["ferry-gateway"])
    secret = {"name": "ferry-redis", "key": "password"}
    assert _value_from(redis, "REDIS_PASSWORD") == secret
    assert _value_from(redis, "REDISCLI_AUTH") == secret, "the readiness probe logs in too"
    assert _value_from(gateway, "REDIS_PASSWORD") == secret
    assert redis["args"][redis["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    # The kubelet expands $(VAR) only for variables defined earlier in the list.
    names = [e["name"] for e in gateway["env"]]
    assert len(names) == len(set(names)), names
    assert names.index("REDIS_PASSWORD") < names.index("FERRY_GATEWAY_REDIS_URL")
    url = env_values(gateway)["FERRY_GATEWAY_REDIS_URL"].replace("$(REDIS_PASSWORD)", "s3cret")
    target = parse_redis_url(url)
    assert target.kind == "single"
    assert url.split("@")[0].endswith(":s3cret"), "the password goes in the URL's userinfo"
    if overlay in TLS_OVERLAYS:
        ca = url.partition("ssl_ca_certs=")[2]
        mounts = {m["mountPath"] for m in gateway["volumeMounts"]}
        assert str(Path(ca).parent) in mounts, f"{ca} is not on a mounted secret"


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_long_lived_connections_are_recycled(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """L4 balancers pin an HTTP/2 connection to one pod: a maximum connection age re-spreads them."""
    deployments = ferry_deployments(render(overlay))
    for service in ("gateway", "worker"):
        env = env_values(only_container(deployments[service]))
        age = float(env[f"{SERVICES[service][1]}MAX_CONNECTION_AGE_S"])
        assert 60 <= age <= 3600, service
        settings = check_settings_env(service, env, monkeypatch)
        assert settings.max_connection_age_s == age, service
