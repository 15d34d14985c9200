"""deploy/compose*.yaml checked offline: the compose-spec schema, and that the services agree with the code.

No engine here: what a running stack does is tested in tests/integration/test_deploy_runtime.py.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from tests.unit.deploy_support import (
    COMPOSE,
    COMPOSE_GPU,
    COMPOSE_TLS,
    HEALTHCHECK_SCRIPT,
    HTTP_PORTS,
    REDIS_TAG,
    ROOT,
    SERVICES,
    check_settings_env,
    compose_doc,
    compose_env,
    compose_errors,
    dockerfile_stages,
    ferry_image,
    ferry_services,
)


def test_compose_matches_the_compose_spec() -> None:
    assert compose_errors(compose_doc()) == []


def test_compose_schema_check_rejects_a_broken_file() -> None:
    """The schema check bites: a misspelt key and a wrong type are both reported."""
    doc = copy.deepcopy(compose_doc())
    doc["services"]["gateway"]["healthcheck"]["intervall"] = "10s"
    doc["services"]["redis"]["ports"] = 6379
    errors = compose_errors(doc)
    assert any("intervall" in e for e in errors), errors
    assert any("services.redis.ports" in e for e in errors), errors


def test_compose_runs_every_service_with_two_workers() -> None:
    doc = compose_doc()
    ferry = ferry_services(doc)
    assert sorted(s for s, _ in ferry.values()) == ["exporter", "gateway", "trainer", "worker", "worker"]
    assert "redis" in doc["services"]
    redis_cmd = doc["services"]["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert re.fullmatch(r"\d+[kmg]b", redis_cmd[redis_cmd.index("--maxmemory") + 1])


def test_compose_services_check_grpc_health_on_their_own_port() -> None:
    doc = compose_doc()
    for name, (service, svc) in ferry_services(doc).items():
        port = int(compose_env(svc)[f"{SERVICES[service][1]}PORT"])
        assert port == SERVICES[service][2], name
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", HEALTHCHECK_SCRIPT], name
        assert test[test.index("--port") + 1] == str(port), name
    assert doc["services"]["redis"]["healthcheck"]["test"][-1] == "ping"


def test_compose_shares_one_store_volume() -> None:
    doc = compose_doc()
    assert "store" in doc["volumes"]
    for name, (service, svc) in ferry_services(doc).items():
        if service == "gateway":
            assert not svc.get("volumes"), "the gateway is stateless"
            continue
        assert "store:/data/store" in svc["volumes"], name
        assert compose_env(svc)[f"{SERVICES[service][1]}STORE"] == "/data/store", name


def test_compose_gateway_routes_to_both_workers_and_redis() -> None:
    doc = compose_doc()
    gateway = doc["services"]["gateway"]
    env = compose_env(gateway)
    workers = [n for n, (s, _) in ferry_services(doc).items() if s == "worker"]
    assert sorted(env["FERRY_GATEWAY_WORKERS"].split(",")) == sorted(f"{w}:8001" for w in workers)
    password = "${FERRY_REDIS_PASSWORD:?export FERRY_REDIS_PASSWORD first (see the top of this file)}"
    assert env["FERRY_GATEWAY_REDIS_URL"] == f"redis://:{password}@redis:6379/0"
    for dep in [*workers, "redis"]:
        assert gateway["depends_on"][dep]["condition"] == "service_healthy"
    assert gateway["ports"] == ["127.0.0.1:8000:8000", "127.0.0.1:8001:8001"]  # HTTP, gRPC


def test_compose_builds_existing_targets() -> None:
    for name, (service, svc) in ferry_services(compose_doc()).items():
        build = svc["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT, name
        dockerfile = ROOT / build["dockerfile"]
        assert build["target"] == service, name
        assert service in dockerfile_stages(dockerfile), name


def test_compose_gpu_override_gives_each_worker_its_own_gpu() -> None:
    override = yaml.safe_load(COMPOSE_GPU.read_text())
    assert compose_errors(override) == []
    workers = [n for n, (s, _) in ferry_services(compose_doc()).items() if s == "worker"]
    assert sorted(override["services"]) == sorted(workers), "the override only touches the workers"
    devices = []
    for name in workers:
        svc = override["services"][name]
        assert svc["image"] == "${FERRY_REGISTRY:-localhost}/ferry/worker:0.1.0-cuda", name
        assert svc["build"]["target"] == "worker", name
        assert "worker" in dockerfile_stages(ROOT / svc["build"]["dockerfile"]), name
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
    assert compose_errors(override) == []
    made = {CA_CERT} | {f"{s}.{ext}" for s in DEFAULT_SERVICES for ext in ("crt", "key")}
    assert {Path(v["file"]).name for v in override["secrets"].values()} <= made
    base = ferry_services(compose_doc())
    assert sorted(override["services"]) == sorted(base), "every Ferry service gets TLS"
    for name, svc in override["services"].items():
        kind, definition = base[name]
        mounted = {f"/run/secrets/{secret}" for secret in svc["secrets"]}
        paths = {k: v for k, v in svc["environment"].items() if str(v).startswith("/run/secrets/")}
        assert set(paths.values()) <= mounted, name
        assert svc["environment"]["FERRY_HEALTHCHECK_TLS_CA"] in mounted, name
        settings = check_settings_env(kind, {**compose_env(definition), **svc["environment"]}, monkeypatch)
        assert settings.tls_cert and settings.tls_key, name
        if kind == "gateway":
            assert settings.worker_tls and settings.worker_ca == "/run/secrets/ferry_ca"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_compose_environment_names_real_settings(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, (svc_kind, svc) in ferry_services(compose_doc()).items():
        if svc_kind != service:
            continue
        settings = check_settings_env(service, compose_env(svc), monkeypatch)
        assert settings.host == "0.0.0.0", name
        assert settings.port == SERVICES[service][2], name
        assert settings.metrics_port == SERVICES[service][3], name
        assert getattr(settings, "http_port", 0) == HTTP_PORTS.get(service, 0), name


def _redis_args(command: list[str]) -> dict[str, list[str]]:
    """redis-server's --option value... pairs; rename-command may repeat, so values are lists."""
    out: dict[str, list[str]] = {}
    i = 1
    while i < len(command):
        option = command[i].removeprefix("--")
        width = 2 if option == "rename-command" else 1
        out.setdefault(option, []).append(" ".join(command[i + 1 : i + 1 + width]))
        i += 1 + width
    return out


def test_compose_redis_needs_a_password_and_is_not_published() -> None:
    doc = compose_doc()
    redis = doc["services"]["redis"]
    args = _redis_args(redis["command"])
    secret = "${FERRY_REDIS_PASSWORD:?export FERRY_REDIS_PASSWORD first (see the top of this file)}"
    assert args["requirepass"] == [secret]
    assert redis["environment"]["REDISCLI_AUTH"] == secret, "the health check must log in"
    assert secret in compose_env(doc["services"]["gateway"])["FERRY_GATEWAY_REDIS_URL"]
    assert args["protected-mode"] == ["yes"]
    assert "ports" not in redis, "only the compose network reaches Redis"
    disabled = {value.split()[0] for value in args["rename-command"] if value.endswith(" ")}
    assert {"FLUSHALL", "FLUSHDB", "CONFIG", "DEBUG", "KEYS", "MODULE", "EVAL"} <= disabled
    assert "EVALSHA" not in disabled and "SCRIPT" not in disabled, "the gateway's rate limiter uses them"
    assert redis["cap_drop"] == ["ALL"] and redis["read_only"] is True
    assert redis["user"] == "999:1000", "no capabilities: start as the image's redis user"


def test_compose_redis_image_is_a_patched_release() -> None:
    image = compose_doc()["services"]["redis"]["image"]
    assert image.startswith("docker.io/library/redis:"), "fully qualified"
    assert image == f"docker.io/library/redis:{REDIS_TAG}", "the same release as deploy/k8s"


def _bytes(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kmg])b?", size.lower()).groups()  # type: ignore[union-attr]
    return int(number) * 1024 ** {"k": 1, "m": 2, "g": 3}[unit]


def test_compose_sets_a_memory_limit_on_every_service() -> None:
    doc = compose_doc()
    for name, svc in doc["services"].items():
        assert "mem_limit" in svc, f"{name}: no memory limit"
    redis = doc["services"]["redis"]
    maxmemory = _redis_args(redis["command"])["maxmemory"][0]
    assert _bytes(redis["mem_limit"]) > _bytes(maxmemory), "maxmemory must fit under the limit"
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())
    for name, svc in gpu["services"].items():
        assert _bytes(svc["mem_limit"]) >= _bytes(doc["services"][name]["mem_limit"]), name


def test_compose_publishes_what_the_cli_needs_on_loopback_only() -> None:
    """The CLI reaches the gateway, the trainer and the exporter (gRPC), HTTP clients the gateway's
    REST port; nothing listens beyond 127.0.0.1, and each port keeps its number on the host."""
    published: dict[str, set[int]] = {}
    for name, (service, svc) in ferry_services(compose_doc()).items():
        for mapping in svc.get("ports", []):
            host, host_port, container_port = mapping.split(":")
            assert host == "127.0.0.1", f"{name}: {mapping}"
            assert host_port == container_port, f"{name}: {mapping}"
            published.setdefault(service, set()).add(int(container_port))
    grpc = {s: {SERVICES[s][2]} for s in ("gateway", "trainer", "exporter")}
    assert published == {
        s: ports | ({HTTP_PORTS[s]} if s in HTTP_PORTS else set()) for s, ports in grpc.items()
    }


def test_compose_images_come_from_one_registry_variable() -> None:
    for doc in (compose_doc(), yaml.safe_load(COMPOSE_GPU.read_text())):
        for name, svc in doc["services"].items():
            if name == "redis":
                continue
            assert svc["image"].startswith("${FERRY_REGISTRY:-localhost}/ferry/"), name
            assert ferry_image(svc["image"]) is not None, name
