"""The ready line a service prints and the one parser tools and tests read it with."""

from __future__ import annotations

from ferry.core.grpcserver import parse_ready_line, ready_line


def test_parse_reads_back_what_ready_line_writes() -> None:
    line = ready_line("worker", 50123, metrics_port=9100, store="/tmp/s")
    assert line == "FERRY_READY service=worker port=50123 metrics_port=9100 store=/tmp/s"
    assert parse_ready_line(line) == ("worker", 50123)
    assert parse_ready_line(f"noise before {ready_line('gateway', 8001)}") == ("gateway", 8001)


def test_other_lines_are_not_ready_lines() -> None:
    assert parse_ready_line('{"msg": "loading models"}') is None
    assert parse_ready_line("FERRY_READY service=worker") is None
