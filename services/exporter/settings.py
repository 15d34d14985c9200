"""The exporter's settings: flags > FERRY_EXPORTER_* environment > YAML file > defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ferry.core.security import SecuritySettings
from ferry.core.settings import (
    allowed_factories_field,
    cpu_limit_field,
    max_message_bytes_field,
    port_field,
    store_field,
)


class ExporterSettings(SecuritySettings):
    """Everything the exporter can be told; each field is also ``FERRY_EXPORTER_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="FERRY_EXPORTER_", extra="forbid")

    port: int = port_field(8003)
    store: str = store_field()
    max_concurrent_exports: int = Field(2, ge=1, description="exports running at once; more wait their turn")
    opset: int = Field(17, ge=11, le=20, description="ONNX opset when a request does not choose one")
    max_batch_size: int = Field(
        64, ge=1, description="config.json max_batch_size when a request does not say"
    )
    optimization: Literal["none", "basic", "extended"] = Field(
        "basic",
        description="ORT offline graph optimisation; basic keeps standard ops (runs on any provider)",
    )
    parity_samples: int = Field(256, ge=8, description="held-out samples the parity gate runs")
    max_parity_samples: int = Field(
        20_000, ge=8, description="largest parity_samples an export request may ask for"
    )
    max_batch_size_limit: int = Field(
        4096, ge=1, description="largest max_batch_size an export request may write into config.json"
    )
    allowed_factories: list[str] = allowed_factories_field()
    factory_timeout_s: float = Field(
        300.0, gt=0, description="how long a factory model's own process may take to answer one step"
    )
    parity_batch: int = Field(32, ge=2, description="the larger batch of the gate (the other is 1)")
    atol: float = Field(1e-4, gt=0, description="fp32 gate absolute tolerance")
    rtol: float = Field(1e-4, ge=0, description="fp32 gate relative tolerance")
    min_top1_agreement: float = Field(0.99, gt=0, le=1, description="fp16/int8 gate: top-1 agreement")
    max_metric_drop: float = Field(1.0, ge=0, description="fp16/int8 gate: metric drop bound, in points")
    calibration_samples: int = Field(128, ge=1, description="samples for static int8 calibration")
    latency_runs: int = Field(20, ge=1, description="ORT runs per batch size when measuring latency")
    seed: int = Field(0, description="seed for held-out sampling")
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads (0: one per CPU of cpu_limit if limited, else torch decides)",
    )
    cpu_limit: float = cpu_limit_field()
    max_import_bytes: int = Field(
        512 * 1024 * 1024,
        description="largest upload ImportOnnx accepts (an ONNX file, or a tar of one and its external data)",
    )
    external_data_threshold_bytes: int = Field(
        2_000_000_000,
        ge=0,
        description="a served model over this many bytes (graph and weights) is published as model.onnx "
        "plus model.onnx.data (ONNX external data); the default is just under protobuf's 2 GiB limit",
    )
    max_message_bytes: int = max_message_bytes_field()
