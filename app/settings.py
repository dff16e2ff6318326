"""The service's settings: one class, every field overridable by a LOWERING_* variable."""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.validation.limits import ArchiveLimits, GateResources


def _default_workers() -> int:
    # Each lowering is mostly one g++ process; one worker per core keeps the host busy
    # without thrashing. Never fewer than one.
    return max(1, min(os.cpu_count() or 1, 8))


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 * 1024**3


class Settings(BaseSettings):
    """Service settings. Environment: ``LOWERING_<FIELD>`` (e.g. ``LOWERING_WORKERS=4``)."""

    # `none` unsets an optional setting (LOWERING_ARTIFACT_TTL_S=none: archives never expire).
    model_config = SettingsConfigDict(env_prefix="LOWERING_", extra="ignore",
                                      env_parse_none_str="none")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Path("data")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite file jobs.db in data_dir"
    )
    workers: int = Field(default_factory=_default_workers, ge=1, le=64)
    job_timeout_s: float = Field(1800.0, gt=0)
    max_upload_bytes: int = Field(2 * 1024**3, gt=0)
    max_queued: int = Field(64, ge=1, description="queued lowerings beyond which submit is 429")
    cache: bool = Field(True, description="serve identical submissions from the result cache")
    migrate_on_start: bool = Field(
        False, description="upgrade a non-SQLite job database at start (one process at a "
        "time, under a lock); off: the service refuses to start until `lowering-service "
        "migrate` has run. SQLite databases are always upgraded at start")
    prime_workers: bool = Field(
        True, description="a trusted tiny lowering at start fills the shared inductor cache "
        "(precompiled headers, ISA probes) that jobs read")
    sandbox: Literal["required", "off"] = Field(
        "required", description="required: every job runs in bubblewrap and no job runs "
        "without it; off: jobs run unsandboxed (trusted uploads only; logged loudly)")
    load_timeout_s: float = Field(120.0, gt=0, description="limit on a job's load phase")
    upload_stall_timeout_s: float = Field(
        60.0, gt=0, description="an upload that sends nothing for this long is dropped (408)")
    max_wait_s: float = Field(3600.0, ge=0, description="cap on ?wait=")
    upload_ttl_s: float = Field(
        86_400.0, gt=0, description="a resumable upload (POST /v1/uploads) not completed "
        "within this is removed (its parts, its S3 multipart upload); a ready one is kept this "
        "long after its last use")
    upload_part_bytes: int = Field(
        64 * 1024**2, ge=1024, description="part size of a resumable upload (at least 5 MiB "
        "on S3, and large enough for 10,000 parts)")
    max_open_uploads: int = Field(
        16, ge=1, description="resumable uploads receiving parts at once (all replicas); "
        "beyond it a new one is refused (429)")
    preload_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="modules every worker imports at start (pytree types of uploads)",
    )
    inductor_cache_dir: Path | None = Field(
        None, description="TORCHINDUCTOR_CACHE_DIR shared by workers; default data_dir/inductor"
    )
    job_max_memory_bytes: int | None = Field(
        None, gt=0, description="address-space cap (RLIMIT_AS) of each sandboxed process; "
        "default 3/4 of RAM shared among the workers")
    job_max_processes: int = Field(
        512, ge=16, description="processes all sandboxes may run together (RLIMIT_NPROC)")
    job_max_cpu_s: float | None = Field(
        None, gt=0, description="CPU seconds a job's worker may use; default 4 x job_timeout_s")
    job_max_file_bytes: int = Field(32 * 1024**3, gt=0,
                                    description="largest file a job may write (RLIMIT_FSIZE)")
    max_artifact_bytes: int = Field(16 * 1024**3, gt=0, description="largest archive written")
    verify_rtol: float = Field(1e-4, ge=0)
    verify_atol: float = Field(1e-4, ge=0)
    log_level: str = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="service log lines: text, or json (one object per line); both "
        "carry the request id and job id")
    executor: Literal["local", "celery"] = Field(
        "local", description="local: jobs run on this host's worker slots; celery: jobs go "
        "to worker hosts (`lowering-service worker`) through LOWERING_BROKER_URL")
    broker_url: str = Field(
        "amqp://guest:guest@127.0.0.1:5672//", description="the RabbitMQ (AMQP) URL of the "
        "fleet (LOWERING_EXECUTOR=celery and every worker host); never reaches a sandbox")
    lease_s: float = Field(
        60.0, ge=5, description="how long a worker's claim on a running job holds without "
        "renewal (renewed every 2 s); a job whose host went silent is taken back after it")
    worker_max_jobs_per_process: int = Field(
        20, ge=1, description="a worker host's Celery process is replaced after this many "
        "jobs (worker_max_tasks_per_child)")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="a worker host (`lowering-service worker`) serves "
        "Prometheus /metrics on LOWERING_HOST:this port; unset: it serves none. The API "
        "serves /metrics on its own port")
    archive_max_members: int = Field(100_000, ge=1, description="zip entries in an upload")
    archive_max_total_bytes: int | None = Field(
        None, gt=0, description="uncompressed size of all members; default 2 x max_upload_bytes")
    archive_max_member_bytes: int | None = Field(
        None, gt=0, description="uncompressed size of one member; default the total cap")
    archive_max_ratio: int = Field(100, ge=1, description="uncompressed/compressed, per member")
    archive_max_inputs_bytes: int = Field(256 * 1024**2, gt=0,
                                          description="size of the example-inputs member")
    archive_max_tensor_bytes: int | None = Field(
        None, gt=0, description="bytes one declared tensor may take; default the member cap")
    graph_max_json_bytes: int = Field(256 * 1024**2, gt=0, description="one JSON member")
    graph_max_depth: int = Field(200, ge=8, description="JSON nesting depth")
    archive_max_config_bytes: int = Field(
        8 * 1024**2, gt=0, description="a weights/constants config JSON (~300 bytes a tensor)")
    archive_max_json_values: int = Field(
        4_000_000, gt=0, description="values in one JSON member, bounded before parsing")
    archive_max_extra_files: int = Field(32, ge=0, description="extra/ files kept in an upload")
    archive_max_extra_bytes: int = Field(1024**2, gt=0, description="one extra/ file")
    archive_max_example_tensor_bytes: int = Field(
        256 * 1024**2, gt=0,
        description="numel x element size of one example-input tensor (strides ignored)")
    archive_max_example_bytes: int = Field(
        1024**3, gt=0, description="numel x element size of all example-input tensors")
    gate_concurrency: int = Field(2, ge=1, description="upload checks running at once")
    gate_max_memory_bytes: int = Field(
        1024**3, ge=64 * 1024**2, description="address space of one upload-check process")
    gate_max_cpu_s: float = Field(60.0, gt=0, description="CPU seconds of one upload check")
    gate_timeout_s: float = Field(120.0, gt=0, description="wall-clock cap on one upload check")
    storage: Literal["local", "s3"] = Field(
        "local", description="where uploads and artifacts live: local (the data dir) or s3 "
        "(an S3-compatible bucket; logs stay local). Credentials come from the standard AWS "
        "chain (AWS_* variables, ~/.aws, instance roles), never from these settings")
    s3_endpoint_url: str | None = Field(
        None, description="an S3-compatible endpoint (SeaweedFS, moto); default AWS S3")
    s3_bucket: str = Field("lowering", min_length=3, max_length=63)
    s3_prefix: str = Field("", max_length=256, description="key prefix inside the bucket")
    s3_region: str = "us-east-1"
    s3_presign_s: int = Field(300, ge=1, le=7 * 86_400,
                              description="lifetime of a presigned artifact URL")
    s3_downloads: Literal["redirect", "stream"] = Field(
        "redirect", description="redirect: 307 to a presigned URL; stream: the API relays "
        "the object (clients that cannot reach the endpoint)")

    auth: Literal["required", "off"] | None = Field(
        None, description="required: every /v1 request needs `Authorization: Bearer <key>` "
        "(keys: `lowering-service keys create`), and the service refuses to start without "
        "an active key; off: no keys, every request acts as tenant 'default' with every "
        "scope. Unset: off on a loopback LOWERING_HOST; on any other bind the service "
        "refuses to start until this is set (off is then logged loudly)")
    auth_pepper: SecretStr | None = Field(
        None, min_length=16, description="the server-side secret keys are hashed with "
        "(HMAC-SHA256); required with LOWERING_AUTH=required and by `lowering-service keys "
        "create`. Changing it invalidates every key. Never passed to jobs")
    share_cache_across_tenants: bool = Field(
        False, description="a submit may be served from another tenant's identical result "
        "(the archive bytes only: never that job's id, timings or profile); off: each "
        "tenant's cache, coalescing and compiled-code reuse see only its own jobs")
    tenant_max_active_jobs: int | None = Field(
        None, ge=1, description="queued and running lowerings one tenant may have; beyond "
        "it a submit is 429 tenant_quota. Unset: no quota. A tenant's own: `lowering-service "
        "tenants set`")
    tenant_max_storage_bytes: int | None = Field(
        None, ge=1, description="bytes one tenant may store: its lowerings' inputs and "
        "archives (an archive shared by jobs counts for each) and its resumable uploads; a "
        "submit or upload that would pass it is 429 tenant_quota. Unset: no quota. A "
        "tenant's own: `lowering-service tenants set`")

    webhook_allow_private: bool = Field(
        False, description="webhooks and callback_urls may target private, loopback and "
        "link-local addresses (a receiver on this host or network); off: refused at "
        "registration, at submit and at every delivery")
    webhook_callback_secret: str | None = Field(
        None, pattern=r"^whsec_[A-Za-z0-9+/=]{16,200}$", description="the whsec_ secret that "
        "signs deliveries to a submit's callback_url (share it with the receivers); unset: "
        "a submit with a callback_url is refused")
    webhook_timeout_s: float = Field(
        5.0, gt=0, le=60, description="connect and read timeout of one webhook delivery")
    webhook_retry_scale: float = Field(
        1.0, gt=0, le=1, description="multiplies the retry schedule (5 s, 5 min, 30 min, 2 h, "
        "5 h, 10 h, 10 h); tests shorten it")
    webhook_poll_s: float = Field(
        1.0, gt=0, le=60, description="how often each replica looks for due deliveries")
    webhook_concurrency: int = Field(
        4, ge=1, le=64, description="deliveries one replica sends at once")

    # Retention (app.jobs.retention): every API replica sweeps; a job's row always stays.
    artifact_ttl_s: float | None = Field(
        30 * 86_400.0, gt=0, description="an archive nobody downloaded or was served from "
        "the cache for this long is removed; its lowerings then answer 410 "
        "artifact_expired. none: archives never expire")
    storage_budget_bytes: int | None = Field(
        None, ge=1, description="stored archives, inputs and resumable uploads past this "
        "evict archives, least recently used first, down to 90% of it (never one a queued "
        "or running job may reuse, or one used in the last LOWERING_EVICT_GRACE_S). Unset: "
        "no budget")
    evict_grace_s: float = Field(
        300.0, ge=0, description="an archive used (made, downloaded, served) this recently "
        "is never evicted for the storage budget: its client is likely still fetching it")
    input_ttl_s: float = Field(
        86_400.0, ge=0, description="a finished lowering's input (the gated upload) is kept "
        "this long after it ends, then removed; 0: at the next sweep")
    log_ttl_s: float | None = Field(
        30 * 86_400.0, gt=0, description="a finished lowering's worker log is removed this "
        "long after it ends (then GET .../log is 410 log_expired). none: kept")
    webhook_delivery_ttl_s: float = Field(
        30 * 86_400.0, gt=0, description="delivered and failed webhook deliveries are "
        "dropped from the delivery log this long after they were made")
    retention_interval_s: float = Field(
        60.0, gt=0, le=3600, description="how often each replica sweeps expired and "
        "over-budget storage")

    @field_validator("preload_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        # Accept "a,b c" from the environment as well as a JSON list.
        if isinstance(value, str):
            if value.strip().startswith("["):
                return json.loads(value)
            return [item for item in value.replace(",", " ").split() if item]
        return value

    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def cpu_limit_s(self) -> float:
        return self.job_max_cpu_s or 4 * self.job_timeout_s

    @property
    def memory_limit_bytes(self) -> int:
        """Per sandboxed process; the default keeps all workers together under 3/4 of RAM."""
        return self.job_max_memory_bytes or _physical_memory_bytes() * 3 // 4 // self.workers

    @cached_property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'jobs.db'}"

    @cached_property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @cached_property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @cached_property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @cached_property
    def scratch_dir(self) -> Path:
        return self.data_dir / "scratch"

    @cached_property
    def inductor_dir(self) -> Path:
        return (self.inductor_cache_dir or self.data_dir / "inductor").expanduser().resolve()

    def archive_limits(self) -> ArchiveLimits:
        """The upload gate's caps, with the derived defaults filled in."""
        total = self.archive_max_total_bytes or 2 * self.max_upload_bytes
        member = self.archive_max_member_bytes or total
        return ArchiveLimits(
            max_members=self.archive_max_members, max_member_bytes=member,
            max_total_bytes=total, max_ratio=self.archive_max_ratio,
            max_json_bytes=self.graph_max_json_bytes, max_json_depth=self.graph_max_depth,
            max_inputs_bytes=self.archive_max_inputs_bytes,
            max_tensor_bytes=self.archive_max_tensor_bytes or member,
            max_config_bytes=self.archive_max_config_bytes,
            max_json_values=self.archive_max_json_values,
            max_extra_files=self.archive_max_extra_files,
            max_extra_bytes=self.archive_max_extra_bytes,
            max_example_tensor_bytes=self.archive_max_example_tensor_bytes,
            max_example_bytes=self.archive_max_example_bytes,
        )

    def gate_resources(self) -> GateResources:
        """What one upload check's child process may use, and how many run at once."""
        return GateResources(concurrency=self.gate_concurrency,
                             max_memory_bytes=self.gate_max_memory_bytes,
                             max_cpu_s=self.gate_max_cpu_s, timeout_s=self.gate_timeout_s)

    def ensure_dirs(self) -> None:
        for path in (self.uploads_dir, self.artifacts_dir, self.logs_dir, self.scratch_dir,
                     self.inductor_dir):
            path.mkdir(parents=True, exist_ok=True)
