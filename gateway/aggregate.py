"""Merging what several workers answered into one answer (pure, unit-tested).

The gateway is one server to its clients: RepositoryIndex lists each model
version once with its best state across workers, and ModelStatistics sums the
workers' counters per model version (plus the gateway's own cache counters).
"""

from __future__ import annotations

from collections.abc import Iterable

from ferry._proto.inference import grpc_service_pb2 as pb

STATE_RANK = {"READY": 4, "LOADING": 3, "UNLOADING": 2, "UNAVAILABLE": 1}
_DURATIONS = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)


def merge_index(responses: Iterable[pb.RepositoryIndexResponse]) -> pb.RepositoryIndexResponse:
    best: dict[tuple[str, str], pb.RepositoryIndexResponse.ModelIndex] = {}
    for resp in responses:
        for entry in resp.models:
            key = (entry.name, entry.version)
            have = best.get(key)
            if have is None or STATE_RANK.get(entry.state.upper(), 0) > STATE_RANK.get(have.state.upper(), 0):
                best[key] = entry
    out = pb.RepositoryIndexResponse()
    for key in sorted(best, key=lambda k: (k[0], int(k[1]) if k[1].isdigit() else -1, k[1])):
        out.models.append(best[key])
    return out


def _add_duration(dst: pb.StatisticDuration, src: pb.StatisticDuration) -> None:
    dst.count += src.count
    dst.ns += src.ns


def merge_statistics(responses: Iterable[pb.ModelStatisticsResponse]) -> pb.ModelStatisticsResponse:
    merged: dict[tuple[str, str], pb.ModelStatistics] = {}
    for resp in responses:
        for stat in resp.model_stats:
            key = (stat.name, stat.version)
            have = merged.get(key)
            if have is None:
                have = merged[key] = pb.ModelStatistics(name=stat.name, version=stat.version)
            have.last_inference = max(have.last_inference, stat.last_inference)
            have.inference_count += stat.inference_count
            have.execution_count += stat.execution_count
            for name in _DURATIONS:
                _add_duration(getattr(have.inference_stats, name), getattr(stat.inference_stats, name))
            by_size = {b.batch_size: b for b in have.batch_stats}
            for b in stat.batch_stats:
                dst = by_size.get(b.batch_size)
                if dst is None:
                    dst = have.batch_stats.add(batch_size=b.batch_size)
                    by_size[b.batch_size] = dst
                for name in ("compute_input", "compute_infer", "compute_output"):
                    _add_duration(getattr(dst, name), getattr(b, name))
            have.memory_usage.extend(stat.memory_usage)
    out = pb.ModelStatisticsResponse()
    for key in sorted(merged):
        out.model_stats.append(merged[key])
    return out
