"""Settings plumbing shared by every service.

Each service declares one ``ServiceSettings`` subclass with its own env prefix
(``FERRY_WORKER_``, ``FERRY_GATEWAY_``...). Values are resolved once, in the
service's ``main()``, with this precedence: command-line flags > environment
variables > a YAML file > the field defaults. Nothing reads the environment at
import time.
"""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ferry.core.errors import InvalidArgument

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
