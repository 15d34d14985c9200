"""The four servers' settings share one ``ServerSettings`` base, so a setting they all have (and
one some of them have) reads the same in each: one description, one set of bounds."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ferry.core.security import SecuritySettings
from ferry.core.settings import ServerSettings
from gateway.settings import GatewaySettings
from services.exporter.settings import ExporterSettings
from services.inference.settings import WorkerSettings
from services.trainer.settings import TrainerSettings

SERVERS: dict[str, type[ServerSettings]] = {
    "TRAINER": TrainerSettings,
    "EXPORTER": ExporterSettings,
    "WORKER": WorkerSettings,
    "GATEWAY": GatewaySettings,
}
SHARED = ("host", "port", "grace_s", "metrics_port", "log_level")
# Fields only some servers have: where present, the same description and bounds.
SOME = ("store", "cpu_limit", "allowed_factories", "max_message_bytes", "reuse_port", "http_port")


def test_every_server_extends_server_settings() -> None:
    assert set(SHARED) <= set(ServerSettings.model_fields)
    for cls in SERVERS.values():
        assert issubclass(cls, SecuritySettings) and issubclass(cls, ServerSettings)
        assert set(SHARED) <= set(cls.model_fields)


@pytest.mark.parametrize("name", SHARED)
def test_shared_fields_have_one_description_and_one_set_of_bounds(name: str) -> None:
    base = ServerSettings.model_fields[name]
    assert base.description
    for cls in SERVERS.values():
        field = cls.model_fields[name]
        assert field.description == base.description, (cls.__name__, name)
        assert field.metadata == base.metadata, (cls.__name__, name)
        assert field.annotation == base.annotation, (cls.__name__, name)


@pytest.mark.parametrize("name", SOME)
def test_fields_some_servers_share_read_the_same(name: str) -> None:
    fields = {cls.__name__: cls.model_fields[name] for cls in SERVERS.values() if name in cls.model_fields}
    assert len(fields) >= 2, name
    assert len({f.description for f in fields.values()}) == 1, fields
    assert len({repr(f.metadata) for f in fields.values()}) == 1, fields
    assert len({f.annotation for f in fields.values()}) == 1, fields


def test_defaults_stay_each_servers_own() -> None:
    defaults = {key: cls.model_fields["port"].default for key, cls in SERVERS.items()}
    assert defaults == {"TRAINER": 8002, "EXPORTER": 8003, "WORKER": 8001, "GATEWAY": 8001}
    grace = {key: cls.model_fields["grace_s"].default for key, cls in SERVERS.items()}
    assert grace == {"TRAINER": 5.0, "EXPORTER": 10.0, "WORKER": 10.0, "GATEWAY": 10.0}
    for cls in SERVERS.values():
        assert cls.model_fields["host"].default == "127.0.0.1"
        assert cls.model_fields["metrics_port"].default == 0
        assert cls.model_fields["log_level"].default == "WARNING"
    assert GatewaySettings.model_fields["http_port"].default == 8000
    assert WorkerSettings.model_fields["http_port"].default == 0


@pytest.mark.parametrize("service", SERVERS)
def test_shared_fields_keep_their_variables_and_bounds(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cls = SERVERS[service]
    monkeypatch.setenv(f"FERRY_{service}_PORT", "7010")
    monkeypatch.setenv(f"FERRY_{service}_GRACE_S", "2.5")
    monkeypatch.setenv(f"FERRY_{service}_METRICS_PORT", "9100")
    s = cls.load()
    assert (s.port, s.grace_s, s.metrics_port) == (7010, 2.5, 9100)
    monkeypatch.delenv(f"FERRY_{service}_PORT")
    for bad in ({"port": 65536}, {"port": -1}, {"metrics_port": 70000}, {"grace_s": -1}):
        with pytest.raises(ValidationError):
            cls.load(None, **bad)
