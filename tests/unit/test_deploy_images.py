"""deploy/docker checked without an engine: hadolint, the stages each image is made of, pinned bases."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.deploy_support import (
    DOCKER,
    DOCKERFILES,
    HEALTHCHECK_SCRIPT,
    HTTP_PORTS,
    ROOT,
    SERVICES,
    check_settings_env,
    dockerfile_env,
    dockerfile_stages,
    dockerfile_structure,
    root_image,
    target_chain,
    tool,
)


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    proc = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKER / dockerfile)],
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
        [tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042"):
        assert rule in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    ("dockerfile", "service"), [(f, s) for f, services in sorted(DOCKERFILES.items()) for s in services]
)
def test_image_target_is_multi_stage_non_root_and_checks_its_health(dockerfile: str, service: str) -> None:
    path = DOCKER / dockerfile
    stages = dockerfile_stages(path)
    chain = target_chain(path, service)
    kinds = [k for k, _ in chain]
    # Multi-stage: the runtime copies a virtualenv built in a stage of its own.
    copies_from = [v for k, v in chain if k == "COPY" and v.startswith("--from=")]
    assert len(copies_from) == 1, copies_from
    build_stage = copies_from[0].split()[0].removeprefix("--from=")
    assert build_stage in stages and build_stage != service
    installs = [v for k, v in target_chain(path, build_stage) if k == "RUN" and "pip install" in v]
    assert any("-c constraints.txt" in v for v in installs), installs
    # Non-root: the last USER is a numeric uid other than 0.
    user = [v for k, v in chain if k == "USER"][-1]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), user
    # gRPC health, on the port the service listens on.
    assert kinds.count("HEALTHCHECK") == 1
    check = next(v for k, v in chain if k == "HEALTHCHECK")
    assert HEALTHCHECK_SCRIPT in check and "CMD" in check
    env = dockerfile_env(chain)
    prefix, port = SERVICES[service][1], SERVICES[service][2]
    assert env["FERRY_HEALTHCHECK_PORT"] == env[f"{prefix}PORT"] == str(port)
    assert env[f"{prefix}HOST"] == "0.0.0.0"
    entry = json.loads(next(v for k, v in chain if k == "ENTRYPOINT"))
    assert entry == ["ferry", "serve", service]
    expose = " ".join(v for k, v in chain if k == "EXPOSE").split()
    assert str(port) in expose and str(SERVICES[service][3]) in expose
    if service in HTTP_PORTS:  # the KServe v2 REST port beside the gRPC one
        assert env[f"{prefix}HTTP_PORT"] == str(HTTP_PORTS[service]) and str(HTTP_PORTS[service]) in expose
    else:
        assert f"{prefix}HTTP_PORT" not in env, service


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
            env = dockerfile_env(target_chain(DOCKER / dockerfile, service))
            settings = check_settings_env(service, env, monkeypatch)
            assert settings.metrics_port == SERVICES[service][3]
            assert settings.port == SERVICES[service][2]
            assert getattr(settings, "http_port", 0) == HTTP_PORTS.get(service, 0)


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_base_images_are_pinned(dockerfile: str) -> None:
    path = DOCKER / dockerfile
    stages = dockerfile_stages(path)
    assert len(stages) >= 3, "multi-stage"
    bases = {s["base"] for s in stages.values() if s["base"] not in stages}
    assert bases, "no external base image"
    for base in bases:
        _, _, tag = base.partition("@")[0].rpartition(":")
        assert "/" not in tag and tag != base, f"{base}: no tag"
        assert tag != "latest" and re.match(r"\d+\.\d+\.\d+", tag), f"{base}: pin a full version tag"
    for service in DOCKERFILES[dockerfile]:
        assert root_image(path, service) in bases


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

    for instr in dockerfile_structure(DOCKER / dockerfile):
        kind, value = instr["instruction"], instr["value"]
        if kind != "COPY" or value.startswith("--from="):
            continue
        *sources, _dest = value.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert sent(source), f"COPY {source}: excluded by {dockerfile}.dockerignore"


# Image target -> the hash lock its dependencies come from.
LOCKED = {
    ("Dockerfile", "worker"): "requirements-worker.lock",
    ("Dockerfile", "gateway"): "requirements-gateway.lock",
    ("Dockerfile.cuda", "worker"): "requirements-worker-cuda.lock",
}
ORT_PACKAGES = ("onnxruntime", "onnxruntime-gpu")


def _lock_pins(lock: Path) -> dict[str, str]:
    """package -> version, asserting on the way that every entry is an exact pin with hashes."""
    pins: dict[str, str] = {}
    text = lock.read_text()
    for entry in re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2]):
        first = entry.splitlines()[0]
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s\\]+) \\", first)
        assert match, f"{lock.name}: not an exact pin: {first!r}"
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), f"{lock.name}: {first} has no hash"
        pins[match.group(1).lower()] = match.group(2)
    return pins


@pytest.mark.parametrize(("dockerfile", "service"), sorted(LOCKED))
def test_image_installs_its_dependencies_from_a_hash_lock(dockerfile: str, service: str) -> None:
    """pip --require-hashes from the lock, then Ferry alone (--no-deps): nothing unhashed gets in."""
    path = DOCKER / dockerfile
    build_stage = next(
        v.split()[0].removeprefix("--from=")
        for k, v in target_chain(path, service)
        if k == "COPY" and v.startswith("--from=")
    )
    lock = LOCKED[(dockerfile, service)]
    chain = target_chain(path, build_stage)
    assert ("COPY", f"deploy/docker/{lock} ./") in chain
    installs = [v for k, v in chain if k == "RUN" and "pip install" in v]
    assert installs[0] == f"pip install --no-cache-dir --require-hashes -r {lock}", installs
    for later in installs[1:]:
        assert "--no-deps" in later and "--no-build-isolation" in later, later
    pins = _lock_pins(DOCKER / lock)
    assert {"setuptools", "wheel"} <= set(pins), "the build backend is locked too"
    assert "ferry" not in pins and "torch" not in pins
    expected_ort = {"worker": {"onnxruntime"}, "gateway": set()}[service]
    if dockerfile == "Dockerfile.cuda":
        expected_ort = {"onnxruntime-gpu"}
    assert {p for p in ORT_PACKAGES if p in pins} == expected_ort, f"{lock}: one ONNX Runtime build"


def test_locks_say_how_to_regenerate_them() -> None:
    for lock in sorted(set(LOCKED.values())):
        header = (DOCKER / lock).read_text().splitlines()[:2]
        assert header[1].strip("# ") == "tools/lock-images.sh", lock
    script = (ROOT / "tools" / "lock-images.sh").read_text()
    for lock in set(LOCKED.values()):
        assert lock.removeprefix("requirements-").removesuffix(".lock") in script
    assert "--generate-hashes" in script


def test_onnxruntime_is_one_version_everywhere() -> None:
    """The locks, the image constraints, constraints.txt and the Dockerfiles name one ORT release."""
    versions: dict[str, str] = {}
    for lock in sorted(set(LOCKED.values())):
        for package, version in _lock_pins(DOCKER / lock).items():
            if package in ORT_PACKAGES:
                versions[f"{lock}:{package}"] = version
    for source in (DOCKER / "image-constraints.txt", ROOT / "constraints.txt"):
        for line in source.read_text().splitlines():
            match = re.fullmatch(r"(onnxruntime(?:-gpu)?)==(\S+)", line.split("#")[0].strip())
            if match:
                versions[f"{source.name}:{match.group(1)}"] = match.group(2)
    for dockerfile in DOCKERFILES:
        for found in re.findall(
            r"onnxruntime(?:-gpu)?[=~<>!]=+\s*([\w.${}]+)", (DOCKER / dockerfile).read_text()
        ):
            versions[f"{dockerfile}"] = found
    assert "constraints.txt:onnxruntime" in versions, "constraints.txt pins the venv's ORT too"
    assert len(versions) >= 3, versions
    assert len(set(versions.values())) == 1, versions
    pyproject = (ROOT / "pyproject.toml").read_text()
    floor = re.findall(r'"onnxruntime>=([\d.]+)"', pyproject)
    version = next(iter(versions.values()))
    assert floor and all(_version(f) <= _version(version) for f in floor), (floor, version)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_base_images_are_fully_qualified(dockerfile: str) -> None:
    """registry/name:tag, so a short name can never resolve to someone else's image."""
    stages = dockerfile_stages(DOCKER / dockerfile)
    for base in {s["base"] for s in stages.values() if s["base"] not in stages}:
        registry = base.split("/", 1)[0]
        assert "." in registry or registry == "localhost", f"{base}: name the registry"
        digest = base.partition("@")[2]
        assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), base
