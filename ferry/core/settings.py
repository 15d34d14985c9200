"""Settings plumbing shared by every service.

Each service declares one ``ServiceSettings`` subclass with its own env prefix
(``FERRY_WORKER_``, ``FERRY_GATEWAY_``...). Values are resolved once, in the
service's ``main()``, with this precedence: command-line flags > environment
variables > a YAML file > the field defaults. Nothing reads the environment at
import time.

The four servers' settings extend ``ServerSettings`` (through
``ferry.core.security.SecuritySettings``), which declares the fields every
server has once: one description and one set of bounds each. A service that
needs another default redeclares the field with its helper (``port_field``,
``grace_field``), never with a ``Field`` of its own; fields only some services
have (``store_field``, ``cpu_limit_field``...) come from a helper too, so the
same setting reads the same in every service.
"""

from __future__ import annotations

import argparse
import contextvars
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Self, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import Field
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ferry.core.errors import InvalidArgument

S = TypeVar("S", bound="ServiceSettings")
_yaml_values: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("ferry_yaml")


class _YamlSource(PydanticBaseSettingsSource):
    """Feeds the values of the YAML file named at load time, lowest precedence but defaults."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _yaml_values.get({}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_values.get({}))


class ServiceSettings(BaseSettings):
    """Base of every service's settings; subclasses set ``env_prefix``."""

    model_config = SettingsConfigDict(env_prefix="FERRY_", extra="forbid", validate_default=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _YamlSource(settings_cls)

    @classmethod
    def load(cls, config_file: str | Path | None = None, **flags: Any) -> Self:
        """Resolve the settings; ``flags`` holds only the flags the user actually gave."""
        values: dict[str, Any] = {}
        if config_file:
            path = Path(config_file)
            try:
                loaded = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as err:
                raise InvalidArgument(f"cannot read settings file {path}: {err}") from err
            if not isinstance(loaded, dict):
                raise InvalidArgument(
                    f"settings file {path} must hold a mapping, not {type(loaded).__name__}"
                )
            values = {str(k).replace("-", "_"): v for k, v in loaded.items()}
        token = _yaml_values.set(values)
        try:
            return cls(**{k: v for k, v in flags.items() if v is not None})
        finally:
            _yaml_values.reset(token)


def _flag_type(annotation: Any) -> dict[str, Any]:
    """argparse options for one settings field, from its type annotation."""
    origin = get_origin(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is list:
        return {"type": lambda text: [item for item in text.split(",") if item], "metavar": "A,B"}
    if origin is Literal:
        return {"choices": list(get_args(annotation))}
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return _flag_type(inner[0]) if len(inner) == 1 else {}
    if annotation in (int, float):
        return {"type": annotation}
    return {}


def add_settings_flags(parser: argparse.ArgumentParser, cls: type[ServiceSettings]) -> None:
    """One ``--flag`` per settings field (help from its description), plus ``--config FILE``."""
    parser.add_argument(
        "--config", metavar="FILE", help="YAML file with settings (lowest precedence but defaults)"
    )
    for name, field in cls.model_fields.items():
        default = field.default if field.default is not PydanticUndefined else None
        hint = field.description or ""
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            help=f"{hint} (default: {default!r})".strip(),
            **_flag_type(field.annotation),
        )


def settings_from_args(cls: type[S], args: argparse.Namespace, **overrides: Any) -> S:
    """Settings from parsed flags: only flags the user gave count; the rest falls through."""
    given = {k: getattr(args, k) for k in cls.model_fields if getattr(args, k, None) is not None}
    return cls.load(getattr(args, "config", None), **{**given, **overrides})


def settings_from_argv(cls: type[S], argv: Sequence[str] | None, prog: str, description: str = "") -> S:
    """Parse ``argv`` into ``cls``. Flags left out fall through to env, the YAML file and defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=description or cls.__doc__)
    add_settings_flags(parser, cls)
    return settings_from_args(cls, parser.parse_args(argv))


def http_port_field(default: int = 0) -> Any:
    """``http_port`` with a service's own default; the bounds and description stay the same."""
    return Field(
        default,
        ge=0,
        le=65535,
        description="KServe v2 REST port beside the gRPC port (docs/http.md); 0 = off",
    )


class RestSettings(ServiceSettings):
    """The REST port's settings, shared by the services that answer HTTP."""

    http_port: int = http_port_field()
    http_header_timeout_s: float = Field(
        10.0, gt=0, description="a client must send a whole request head within this, or is disconnected"
    )


def port_field(default: int) -> Any:
    """``port`` with a service's own default; the bounds and description stay the same."""
    return Field(
        default, ge=0, le=65535, description="gRPC port; 0 picks a free one (printed on the ready line)"
    )


def grace_field(default: float) -> Any:
    """``grace_s`` with a service's own default; the bounds and description stay the same."""
    return Field(default, ge=0, description="on SIGTERM, how long in-flight calls get to finish")


class ServerSettings(ServiceSettings):
    """The fields every server (worker, gateway, trainer, exporter) has, declared once."""

    host: str = Field(
        "127.0.0.1", description="address the service's ports bind; 0.0.0.0 for every interface (a container)"
    )
    port: int = port_field(0)
    grace_s: float = grace_field(10.0)
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 = off")
    log_level: str = Field("WARNING", description="log level (DEBUG, INFO, WARNING...)")


# Fields some servers have (not all): one helper each, so a setting reads the same wherever it is.


def store_field() -> Any:
    return Field(
        ".ferry/store",
        description="model store root folder (models/, checkpoints/, jobs/, datasets/), shared by services",
    )


def cpu_limit_field() -> Any:
    return Field(
        0,
        ge=0,
        description="CPUs this service may use (the downward API's limits.cpu); 0 = the cgroup quota, "
        "else every CPU it may run on; sizes the thread pools left at 0",
    )


def allowed_factories_field() -> Any:
    return Field(
        default_factory=list,
        description="module prefixes a factory model may come from (empty: zoo architectures only)",
    )


def max_message_bytes_field() -> Any:
    return Field(
        64 * 1024 * 1024,
        gt=0,
        description="largest message accepted or sent (gRPC, and a REST body where http_port is on)",
    )


def reuse_port_field() -> Any:
    return Field(
        False, description="SO_REUSEPORT, so several processes of this service share one port (one per core)"
    )
