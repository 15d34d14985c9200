"""The skip policy itself: outside CI a missing dev dependency skips, under CI it fails."""

from __future__ import annotations

import pytest

from tests.support.deps import find_binary, in_ci, require_binary, require_module

ABSENT_MODULE = "ferry_test_no_such_package_xyz"
ABSENT_BINARY = "ferry-test-no-such-binary-xyz"


@pytest.mark.parametrize(
    ("value", "expected"), [("", False), ("0", False), ("false", False), ("true", True), ("1", True)]
)
def test_ci_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_a_missing_module_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=ABSENT_MODULE):
        require_module(ABSENT_MODULE)


def test_a_missing_module_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"CI requires it: .*{ABSENT_MODULE}"):
        require_module(ABSENT_MODULE)


def test_a_missing_binary_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert find_binary(ABSENT_BINARY) is None
    with pytest.raises(pytest.fail.Exception, match=ABSENT_BINARY):
        require_binary(ABSENT_BINARY)


def test_present_dependencies_are_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert require_module("json").dumps([1]) == "[1]"
    assert require_binary("sh").endswith("sh")


def test_ferrys_own_modules_are_refused() -> None:
    with pytest.raises(ValueError, match="import it plainly"):
        require_module("gateway.server")
