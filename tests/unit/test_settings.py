from __future__ import annotations

from pathlib import Path

import pytest

from ferry.core.errors import InvalidArgument
from ferry.core.settings import settings_from_argv
from services.inference.settings import WorkerSettings


def test_precedence_flags_env_yaml_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "worker.yaml"
    config.write_text("port: 7001\nstore: /srv/store\nmax_batch_size: 32\ninstances: 3\n")
    monkeypatch.setenv("FERRY_WORKER_STORE", "/env/store")
    monkeypatch.setenv("FERRY_WORKER_INSTANCES", "2")
    s = settings_from_argv(
        WorkerSettings, ["--config", str(config), "--instances", "4", "--models", "a,b"], "t"
    )
    assert s.instances == 4  # flag beats env and file
    assert s.store == "/env/store"  # env beats file
    assert s.port == 7001 and s.max_batch_size == 32  # file beats defaults
    assert s.models == ["a", "b"]
    assert s.poll_interval_s == 2.0  # default


def test_bool_flags() -> None:
    assert settings_from_argv(WorkerSettings, ["--no-warmup"], "t").warmup is False


def test_bad_settings_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("- a list\n")
    with pytest.raises(InvalidArgument, match="must hold a mapping"):
        WorkerSettings.load(config)


def test_unknown_keys_are_rejected(tmp_path: Path) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text("prot: 1\n")
    with pytest.raises(ValueError, match="prot"):
        WorkerSettings.load(config)


def test_the_gateway_reads_redis_url_through_its_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.settings import GatewaySettings

    for name in ("REDIS_URL", "FERRY_GATEWAY_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    assert settings_from_argv(GatewaySettings, [], "gw").redis_url is None
    monkeypatch.setenv("REDIS_URL", "redis://plain:1/0")
    assert settings_from_argv(GatewaySettings, [], "gw").redis_url == "redis://plain:1/0"
    monkeypatch.setenv("FERRY_GATEWAY_REDIS_URL", "redis://prefixed:2/0")
    assert settings_from_argv(GatewaySettings, [], "gw").redis_url == "redis://prefixed:2/0"
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("redis_url: redis://from-yaml:4/0\n")
    monkeypatch.delenv("FERRY_GATEWAY_REDIS_URL")
    monkeypatch.delenv("REDIS_URL")
    assert (
        settings_from_argv(GatewaySettings, ["--config", str(cfg)], "gw").redis_url == "redis://from-yaml:4/0"
    )
    flags = ["--redis-url", "redis://flag:3/0", "--config", str(cfg)]
    monkeypatch.setenv("REDIS_URL", "redis://plain:1/0")
    assert settings_from_argv(GatewaySettings, flags, "gw").redis_url == "redis://flag:3/0"


def test_ferry_up_prefers_its_own_redis_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from ferry.stack import UpSettings

    monkeypatch.setenv("REDIS_URL", "redis://plain:1/0")
    assert UpSettings().redis_url == "redis://plain:1/0"
    monkeypatch.setenv("FERRY_UP_REDIS_URL", "redis://prefixed:2/0")
    assert UpSettings().redis_url == "redis://prefixed:2/0"
    assert UpSettings(redis_url="redis://flag:3/0").redis_url == "redis://flag:3/0"
