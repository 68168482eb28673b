"""One Settings object, read from the environment by the API and the workers alike.

Embedded defaults put everything under DATA_DIR: SQLite metadata, a no-server Celery broker
(kombu's sqla+sqlite transport), local blobs and the default base. Setting DATABASE_URL,
REDIS_URL or S3_BUCKET switches the same code to distributed mode.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    data_dir: Path = Path("./var")
    database_url: str | None = None  # default: sqlite under data_dir
    redis_url: str | None = None  # default: sqla+sqlite broker under data_dir
    # S3-compatible blob storage; unset bucket means a local directory under data_dir
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_prefix: str = ""
    s3_region: str = "us-east-1"
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None

    # a local HF causal-LM dir or a .gguf file (converted once into data_dir/models/<id>);
    # default: data_dir/models/default
    base_model: Path | None = None
    base_model_id: str | None = None  # the id BASE_MODEL is served under; default: slug of its name
    # optimizer steps of the first-start build of the default base; None: the preset's (400).
    # Tests and quick trials use a handful, which builds in seconds (corpus + BPE cost the rest).
    default_base_build_steps: int | None = Field(default=None, ge=0)
    admin_api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    torch_threads: int = 1  # per process: the API and the worker share the cores
    # where the workers train and the API serves: auto (the first CUDA device torch sees, else
    # the CPU), cpu, cuda or cuda:N. One worker process per GPU: CUDA_VISIBLE_DEVICES=<i>, -c 1.
    device: str = "auto"
    # the dtype the API serves the base in: auto is bfloat16 on a GPU (float16 where bfloat16 is
    # unsupported) and the stored float32 on the CPU. Training keeps float32 weights either way,
    # with bfloat16 autocast on CUDA.
    serving_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    # serving
    serving_enabled: bool = True  # SERVING_ENABLED=0: an API process that loads no model (tests, admin-only)
    adapter_cache_size: int = 64
    batch_window_ms: int = 10
    # live rows in the continuous decode batch. 8 on 2 CPU cores: bench.fairness 2.1-2.5 and
    # bench.serving 3.6-3.9 on a quiet machine, where 16 gave 3.6-4.3 and 7.3 (docs/BENCHMARKS.md: fair serving)
    max_batch_size: int = 8
    max_prefill_tokens: int = 512  # prompt tokens prefilled between two decode steps (at least one row)
    max_queued_requests: int = 256

    # input limits (every limit is a setting, documented in docs/LIMITS.md)
    max_upload_bytes: int = 64 * 1024 * 1024
    max_jsonl_line_bytes: int = 64 * 1024
    max_prompt_tokens: int = 2048
    max_completion_tokens: int = 1024
    max_n: int = 8
    max_stop_strings: int = 4
    max_num_virtual_tokens: int = 512
    max_n_epochs: int = 100
    max_zip_bytes: int = 64 * 1024 * 1024
    max_zip_entries: int = 8
    max_zip_ratio: float = 100.0

    max_classify_labels: int = 64
    max_stop_string_chars: int = 256

    # per-tenant quota defaults (tenant.quotas overrides them; 0 = unlimited; see app/tenancy/quotas.py)
    quota_storage_bytes: int = 10 * 1024**3
    quota_files: int = 1000
    quota_adapters: int = 500
    quota_requests_per_minute: int = 600
    quota_tokens_per_minute: int = 200_000

    # workers
    job_heartbeat_s: float = 10.0
    job_stale_after_s: float = 60.0
    celery_queue: str = "gpu"
    # quota default (tenant.quotas["running_jobs"] overrides): more jobs wait in queued, not lost
    max_running_jobs_per_tenant: int = 2
    # seconds between the periodic checks (stale heartbeats, jobs waiting for file validation)
    job_monitor_interval_s: float = 2.0
    # a queued job that no worker claimed this long after its message was sent is sent again (the
    # broker may have lost it: restarted empty); the wait doubles at each send, up to 10 times this
    job_resend_after_s: float = Field(default=60.0, gt=0)
    # a file still `uploaded` this long after its upload has lost its validator (the replica that
    # accepted it died): the monitor claims it and validates it. Longer than validating the
    # largest upload takes, so that the accepting replica is not raced
    file_validation_grace_s: float = Field(default=60.0, gt=0)
    # blobs that no row refers to, and half-written uploads, are deleted by the monitor once this
    # old (a crash between storing a blob and committing its row leaves them). Longer than any
    # upload takes, so that a blob being written is never taken for an orphan; 0 turns it off
    orphan_blob_grace_s: float = Field(default=3600.0, ge=0)

    # a full disk (app/store/storage.py, docs/STORAGE.md). Local blob writes (uploads, checkpoints,
    # adapters) are refused with 507 storage_full when they would leave less than this free, so
    # that the database keeps room for deletes and job records; 0 turns the floor off
    storage_min_free_bytes: int = Field(default=128 * 1024**2, ge=0)
    # a file of this size beside the SQLite database, released when a delete finds the disk full
    # anyway (something else filled it) and made again once there is room; 0: none
    storage_reserve_bytes: int = Field(default=8 * 1024**2, ge=0)
    # a job that finds the storage full goes back to queued and is retried after this delay,
    # doubled each time, up to this many times in a row without a new checkpoint; then it fails
    # with storage_full
    job_storage_full_retries: int = Field(default=3, ge=0)
    job_storage_full_retry_delay_s: float = Field(default=60.0, ge=0)

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        # the syntax only: whether this machine has the device is checked where a model is loaded
        v = v.strip().lower()
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"DEVICE={v!r} is not one of auto, cpu, cuda, cuda:N")
        return v

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'prefixd.db').resolve()}"

    @property
    def broker_url(self) -> str:
        return self.redis_url or f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def resolved_base_model(self) -> Path:
        return self.base_model or self.data_dir / "models" / "default"

    @property
    def embedded(self) -> bool:
        return self.database_url is None and self.redis_url is None and self.s3_bucket is None


@lru_cache
def get_settings() -> Settings:
    return Settings()
