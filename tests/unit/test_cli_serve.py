"""``ferry serve --help`` lists the services and succeeds; a service's own --help is its own."""

from __future__ import annotations

import pytest

from ferry.cli.main import build_parser, main
from ferry.cli.serve import SERVICES


def test_serve_help_lists_the_services(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for name in ("gateway", "worker", "trainer", "exporter"):
        assert name in out
    assert set(SERVICES) == {"gateway", "worker", "trainer", "exporter"}


def test_flags_after_the_service_are_the_services() -> None:
    args = build_parser().parse_args(["serve", "worker", "--help", "--port", "1"])
    assert (args.service, args.args) == ("worker", ["--help", "--port", "1"])


def test_bench_is_registered_through_its_entry_point() -> None:
    args = build_parser().parse_args(["bench", "--models", "mlp", "--concurrency", "1,8"])
    assert (args.models, args.concurrency) == (["mlp"], [1, 8])
    assert args.handler.__module__ == "benchmarks.cli"
