"""The worker's repository parameters: Triton's ``config`` override and Ferry's ``version`` pin.

Pure: they read a v2 parameter map and raise INVALID_ARGUMENT naming what is wrong, so the
gRPC and HTTP front doors refuse a bad load the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ferry.core.errors import InvalidArgument
from ferry.core.params import json_object

MAX_CONFIG_BYTES = 1 << 20


def config_param(model: str, params: Mapping[str, Any]) -> dict[str, Any] | None:
    """Triton's ``config`` load parameter: a JSON model config that replaces config.json."""
    if "config" not in params:
        return None
    p = params["config"]
    text = p.string_param if p.WhichOneof("parameter_choice") == "string_param" else None
    if text is None:
        raise InvalidArgument(f"failed to load {model!r}: the 'config' parameter must be a JSON string")
    if len(text) > MAX_CONFIG_BYTES:
        raise InvalidArgument(
            f"failed to load {model!r}: the 'config' parameter is over {MAX_CONFIG_BYTES} bytes"
        )
    return json_object(text, f"failed to load {model!r}: the 'config' parameter")


def version_param(params: Mapping[str, Any]) -> int | None:
    """Ferry's ``version`` repository parameter: load or unload one version only."""
    if "version" not in params:
        return None
    p = params["version"]
    kind = p.WhichOneof("parameter_choice")
    value = p.int64_param if kind == "int64_param" else p.string_param if kind == "string_param" else None
    try:
        number = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidArgument(
            f"repository parameter 'version' must be a positive integer, got {value!r}"
        ) from None
    if number < 1:
        raise InvalidArgument(f"repository parameter 'version' must be a positive integer, got {number}")
    return number
