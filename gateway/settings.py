"""The gateway's settings: flags > ``FERRY_GATEWAY_*`` environment > YAML file > defaults."""

from __future__ import annotations

from typing import Annotated

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from ferry.core.security import SecuritySettings
from ferry.core.settings import (
    RestSettings,
    http_port_field,
    max_message_bytes_field,
    port_field,
    reuse_port_field,
)


class GatewaySettings(SecuritySettings, RestSettings):
    """Everything the gateway reads, resolved once in ``main()``."""

    model_config = SettingsConfigDict(
        env_prefix="FERRY_GATEWAY_", extra="forbid", validate_default=True, populate_by_name=True
    )

    port: int = port_field(8001)
    http_port: int = http_port_field(8000)
    workers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="static worker addresses host:port"
    )
    workers_dns: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="NAME:PORT resolved periodically (a headless Service)"
    )
    dns_interval_s: float = Field(5.0, description="how often DNS names are re-resolved")
    index_interval_s: float = Field(0.5, description="how often each worker's repository index is polled")
    # Result cache.
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("FERRY_GATEWAY_REDIS_URL", "REDIS_URL"),
        description=(
            "redis://, rediss://, redis+sentinel://host:port,host:port/master/db or "
            "redis+cluster://host:port,host:port URL (REDIS_URL works too); unset = in-process LRU"
        ),
    )
    cache_enabled: bool = Field(True, description="master switch for the result cache")
    cache_ttl_s: int = Field(300, description="time to live of a cached result")
    cache_max_value_bytes: int = Field(1 << 20, description="results larger than this are not cached")
    cache_timeout_ms: int = Field(50, description="per-call Redis timeout; slower counts as a miss")
    cache_lru_entries: int = Field(10_000, description="size of the in-process LRU (no Redis)")
    cache_near_bytes: int = Field(
        64 << 20,
        ge=0,
        description="bytes of the in-process near cache in front of Redis (hits make no Redis call); 0 = off",
    )
    cache_near_ttl_s: float = Field(
        60.0, gt=0, description="longest life of a near-cache entry (never longer than its Redis TTL)"
    )
    breaker_failures: int = Field(3, description="consecutive cache errors that open the breaker")
    breaker_reset_s: float = Field(2.0, description="how long an open breaker waits before a trial call")
    # Routing and batching.
    max_in_flight: int = Field(
        2048, description="requests in the gateway at once; more -> RESOURCE_EXHAUSTED"
    )
    retry_attempts: int = Field(4, description="upstream attempts per request (first try included)")
    eject_failures: int = Field(3, description="consecutive failures that eject a worker")
    eject_base_s: float = Field(1.0, description="first ejection period; doubles per repeat")
    eject_max_s: float = Field(30.0, description="longest ejection period")
    # Grey failures: per-try budgets, hedging, the retry budget, keepalive to workers.
    try_timeout_ms: int = Field(
        0, ge=0, description="per-try budget of an upstream attempt; 0 = derived from the model's latency"
    )
    try_timeout_floor_ms: int = Field(250, ge=1, description="the derived per-try budget is never below this")
    try_timeout_p99_factor: float = Field(
        4.0, gt=0, description="derived per-try budget = the model's recent upstream p99 x this"
    )
    hedge_delay_ms: int = Field(
        0, ge=0, description="send a hedged second attempt after this long without an answer; 0 = off"
    )
    retry_budget_ratio: float = Field(
        0.2, ge=0, description="retries and hedges allowed per request (a share of the real load)"
    )
    retry_budget_min_per_s: float = Field(
        10.0, ge=0, description="retries and hedges allowed per second whatever the load"
    )
    keepalive_time_ms: int = Field(
        2000, ge=100, description="ping a worker connection this often while calls are open"
    )
    keepalive_timeout_ms: int = Field(
        1000, ge=100, description="a worker that does not answer a ping this fast is cut off"
    )
    coalesce: bool = Field(True, description="merge concurrent requests for one model version upstream")
    coalesce_max_batch: int = Field(64, description="most rows in one merged upstream call")
    default_timeout_s: float = Field(
        60.0, description="deadline for calls that come without one (a hung worker must not hang callers)"
    )
    max_message_bytes: int = max_message_bytes_field()
    upstream_per_worker: int = Field(1, description="concurrent upstream batches per worker and model")
    # Sequences (sequence_id): each one sticks to the worker that holds its state.
    sequence_idle_s: float = Field(
        300.0,
        gt=0,
        description="a sequence's pin to its worker is forgotten after this long without a request",
    )
    max_sequences: int = Field(
        65536,
        ge=1,
        description="sequences pinned to a worker at once; beyond, the least recently used is forgotten",
    )
    # Security.
    worker_tls: bool = Field(False, description="talk TLS to workers")
    worker_ca: str | None = Field(None, description="CA bundle that worker certificates chain to")
    worker_cert: str | None = Field(None, description="client certificate presented to workers (mTLS)")
    worker_key: str | None = Field(None, description="private key of worker_cert")
    worker_server_name: str | None = Field(
        None, description="name to check worker certificates against (workers are dialled by IP)"
    )
    worker_api_key: SecretStr | None = Field(
        None, description="key the gateway sends to workers that require one (roles infer, read, models)"
    )
    rate_limit_shared: bool = Field(
        True, description="share API-key rate limits across gateway replicas through redis_url"
    )
    # Operations.
    metrics_host: str = Field("127.0.0.1", description="address the metrics port binds")
    reuse_port: bool = reuse_port_field()
    startup_wait_s: float = Field(10.0, description="at start, wait this long for a healthy worker")

    @field_validator("workers", "workers_dns", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        """Accept ``a,b`` from flags and env as well as YAML lists."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
