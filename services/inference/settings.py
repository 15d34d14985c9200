"""The worker's settings: flags > FERRY_WORKER_* environment > YAML file > defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ferry.core.security import SecuritySettings
from ferry.core.settings import (
    RestSettings,
    cpu_limit_field,
    max_message_bytes_field,
    port_field,
    reuse_port_field,
    store_field,
)


class WorkerSettings(SecuritySettings, RestSettings):
    """Everything an inference worker can be told; each field is also ``FERRY_WORKER_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="FERRY_WORKER_", extra="forbid")

    port: int = port_field(8001)
    store: str = store_field()
    models: list[str] = Field(default_factory=list, description="serve only these models (empty: all)")
    providers: list[str] = Field(
        default_factory=list,
        description="ORT execution providers in order (empty: CUDA when available, then CPU)",
    )
    cuda_device_id: int = Field(0, description="GPU this worker uses (one worker per GPU)")
    cuda_mem_limit_bytes: int = Field(0, description="CUDA arena limit, 0 = no limit")
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "HEURISTIC"
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    allow_cpu_fallback: bool = Field(
        False,
        description="serve on CPU when CUDAExecutionProvider was asked for in providers but does not "
        "load (else the worker refuses to start, or the version fails to load)",
    )
    cpu_limit: float = cpu_limit_field()
    intra_op_threads: int = Field(
        0, description="ORT threads inside one operator (0: one per CPU of cpu_limit)"
    )
    inter_op_threads: int = Field(0, description="ORT threads across operators (0: ORT decides)")
    instances: int = Field(
        0, description="sessions per model version; 0 keeps each model's config (default 1)"
    )
    max_batch_size: int = Field(64, description="max_batch_size for models whose config does not say")
    max_message_bytes: int = max_message_bytes_field()
    shm_max_regions: int = Field(
        64, ge=0, description="system shared-memory regions callers may register at once (0 = none)"
    )
    shm_max_region_bytes: int = Field(
        1 << 30, ge=1, description="largest system shared-memory region a caller may register"
    )
    memory_budget_bytes: int = Field(
        0,
        ge=0,
        description="memory the loaded versions may hold, booked as their model files per instance "
        "(0 = no budget); a load past it is RESOURCE_EXHAUSTED, or evicts with evict=lru",
    )
    evict: Literal["none", "lru"] = Field(
        "none",
        description="lru: a load past memory_budget_bytes first unloads the least recently used "
        "models, which load again on their next request",
    )
    cuda_shm: bool = Field(
        False,
        description="offer Triton's CUDA shared memory (clients' device memory by CUDA IPC) when the CUDA "
        "runtime and a device are present; off, registering answers UNIMPLEMENTED",
    )
    stream_max_inflight: int = Field(
        256, ge=1, description="requests of one ModelStreamInfer stream in flight at once"
    )
    poll_interval_s: float = Field(
        2.0, description="how often the store is scanned for new versions; 0 = never"
    )
    warmup: bool = Field(
        True, description="warm each new version up before it serves (model_warmup, else zeros)"
    )
    drain_delay_s: float = Field(
        1.0,
        description="on SIGTERM, keep serving this long with health NOT_SERVING so callers move away first",
    )
    reuse_port: bool = reuse_port_field()
