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
