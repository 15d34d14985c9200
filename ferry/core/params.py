"""Reading v2 ``InferParameter`` maps: one place for what a parameter's type may be.

v2 parameters are a oneof (bool, int64, uint64, string, double); clients differ in which
they send for the same thing (tritonclient sends ``priority`` as int64, a JSON body may carry
``"5"``). Every reader here names the parameter in its error, so a bad one is
INVALID_ARGUMENT with a message, never a crash. ``config_int`` and ``json_object`` do the same
for the integer entries of ``config.json`` and for JSON objects carried in a string.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ferry.core.errors import InvalidArgument


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def int_param(params: Mapping[str, Any], key: str, where: str = "", digits: bool = True) -> int | None:
    """An integer parameter, or None when absent. With ``digits`` a string of digits counts too."""
    if key not in params:
        return None
    p = params[key]
    kind = p.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param"):
        return int(getattr(p, kind))
    if digits and kind == "string_param" and p.string_param.isdigit():
        return int(p.string_param)
    raise InvalidArgument(f"{_prefix(where)}parameter {key!r} must be an integer")


def bool_param(params: Mapping[str, Any], key: str, where: str = "") -> bool:
    """A flag; absent is False. A JSON body's ``"true"``/``"false"`` counts as the flag it names."""
    if key not in params:
        return False
    p = params[key]
    kind = p.WhichOneof("parameter_choice")
    if kind == "bool_param":
        return bool(p.bool_param)
    if kind == "string_param" and p.string_param.lower() in ("true", "false"):
        return bool(p.string_param.lower() == "true")
    raise InvalidArgument(f"{_prefix(where)}parameter {key!r} must be a bool")


def string_param(params: Mapping[str, Any], key: str, where: str = "") -> str | None:
    """A string parameter, or None when absent."""
    if key not in params:
        return None
    p = params[key]
    if p.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgument(f"{_prefix(where)}parameter {key!r} must be a string")
    return str(p.string_param)


def config_int(
    raw: Mapping[str, Any], key: str, where: str, low: int, high: int, default: int, digits: bool = False
) -> int:
    """An integer entry of a config object, in ``[low, high]``; ``default`` when absent. A bool is
    not an integer here. With ``digits`` a string of digits counts too: protobuf's JSON form writes
    int64 fields as strings, and a ModelConfig comes back to ``config.json`` form that way."""
    value = raw.get(key, default)
    if digits and isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidArgument(f"{where}: {key} must be an integer in [{low}, {high}], got {value!r}")
    return value


def json_object(text: str, what: str) -> dict[str, Any]:
    """A JSON object sent as a string (a parameter, a ``*_json`` field); ``what`` names it in the
    error when the string is not JSON or holds something else."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise InvalidArgument(f"{what} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, not {type(value).__name__}")
    return value
