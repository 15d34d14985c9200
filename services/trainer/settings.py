"""Trainer settings: flags > ``FERRY_TRAINER_*`` environment > YAML file > these defaults."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ferry.core.security import SecuritySettings
from ferry.core.settings import allowed_factories_field, cpu_limit_field, grace_field, port_field, store_field


class TrainerSettings(SecuritySettings):
    """Everything the trainer service reads, resolved once in ``main()``."""

    model_config = SettingsConfigDict(env_prefix="FERRY_TRAINER_", extra="forbid", validate_default=True)

    port: int = port_field(8002)
    grace_s: float = grace_field(5.0)
    store: str = store_field()
    max_concurrent_jobs: int = Field(2, ge=1, description="jobs running at once; the rest queue")
    threads_per_job: int = Field(0, ge=0, description="torch threads per job; 0 = CPUs / concurrent jobs")
    cpu_limit: float = cpu_limit_field()
    max_nprocs: int = Field(8, ge=1, description="largest nprocs (DDP processes) a job may ask for")
    max_epochs: int = Field(100_000, ge=1, description="largest epochs a job may ask for")
    max_batch_size: int = Field(65536, ge=1, description="largest batch_size a job may ask for")
    max_queued_jobs_per_key: int = Field(
        16,
        ge=1,
        description="queued or running jobs one API key may have at once; more -> RESOURCE_EXHAUSTED",
    )
    allowed_factories: list[str] = allowed_factories_field()
    start_timeout_s: float = Field(
        300.0, gt=0, description="a job that has not started training by then (data, model built) FAILS"
    )
    resume_interrupted: bool = Field(
        True, description="on start, resume jobs a stopped trainer left running (else mark them FAILED)"
    )
    cancel_grace_s: float = Field(3.0, gt=0, description="SIGTERM to SIGKILL delay when cancelling")
    max_upload_bytes: int = Field(256 * 1024 * 1024, gt=0, description="largest dataset upload")
