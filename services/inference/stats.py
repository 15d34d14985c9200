"""Per model-version statistics with the semantics of the v2 statistics extension.

``inference_count`` counts rows (each sample of a batched request counts), and
``execution_count`` counts runs of the model. Request durations are summed per
request; batch durations per executed batch size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ferry._proto.inference import grpc_service_pb2 as pb


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def fill(self, target: pb.StatisticDuration) -> None:
        target.count = self.count
        target.ns = self.ns


@dataclass
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchDurations] = field(default_factory=dict)

    def record_execution(self, batch_rows: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.execution_count += 1
        b = self.batches.setdefault(batch_rows, BatchDurations())
        b.compute_input.add(input_ns)
        b.compute_infer.add(infer_ns)
        b.compute_output.add(output_ns)

    def record_request(
        self, rows: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int, total_ns: int
    ) -> None:
        self.inference_count += rows
        self.last_inference_ms = int(time.time() * 1000)
        self.success.add(total_ns)
        self.queue.add(queue_ns)
        self.compute_input.add(input_ns)
        self.compute_infer.add(infer_ns)
        self.compute_output.add(output_ns)

    def record_failure(self, total_ns: int) -> None:
        self.fail.add(total_ns)

    def mean_batch_rows(self) -> float:
        runs = sum(b.compute_infer.count for b in self.batches.values())
        rows = sum(size * b.compute_infer.count for size, b in self.batches.items())
        return rows / runs if runs else 0.0

    def to_proto(self, name: str, version: int) -> pb.ModelStatistics:
        out = pb.ModelStatistics(
            name=name,
            version=str(version),
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
        )
        s = out.inference_stats
        self.success.fill(s.success)
        self.fail.fill(s.fail)
        self.queue.fill(s.queue)
        self.compute_input.fill(s.compute_input)
        self.compute_infer.fill(s.compute_infer)
        self.compute_output.fill(s.compute_output)
        for size in sorted(self.batches):
            b = self.batches[size]
            entry = out.batch_stats.add(batch_size=size)
            b.compute_input.fill(entry.compute_input)
            b.compute_infer.fill(entry.compute_infer)
            b.compute_output.fill(entry.compute_output)
        return out
