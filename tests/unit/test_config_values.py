"""The shared readers of config values: bounded integers and JSON objects in strings."""

from __future__ import annotations

from typing import Any

import pytest

from ferry.core.errors import InvalidArgument
from ferry.core.params import config_int, json_object


def test_a_bounded_integer_or_its_default() -> None:
    assert config_int({"n": 5}, "n", "cfg", 1, 10, 3) == 5
    assert config_int({}, "n", "cfg", 1, 10, 3) == 3
    assert config_int({"n": "7"}, "n", "cfg", 1, 10, 3, digits=True) == 7  # protobuf's JSON int64


@pytest.mark.parametrize(
    ("raw", "digits"), [({"n": 11}, False), ({"n": True}, False), ({"n": "7"}, False), ({"n": 2.0}, True)]
)
def test_anything_else_is_refused_by_name(raw: dict[str, Any], digits: bool) -> None:
    with pytest.raises(InvalidArgument, match=r"cfg: n must be an integer in \[1, 10\], got "):
        config_int(raw, "n", "cfg", 1, 10, 3, digits=digits)


def test_json_objects_in_strings() -> None:
    assert json_object('{"a": 1}', "x") == {"a": 1}
    with pytest.raises(InvalidArgument, match="x is not valid JSON"):
        json_object("{nope", "x")
    with pytest.raises(InvalidArgument, match="x must be a JSON object, not list"):
        json_object("[1]", "x")
