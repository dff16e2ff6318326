"""The job table. Portable SQL (SQLite now, PostgreSQL later): no dialect-only types."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    text,
)

DEFAULT_TENANT = "default"
"""The tenant of every job, upload and webhook made before keys (0007), and of every
request while LOWERING_AUTH=off."""


def _tenant_column() -> Column[str]:
    # Every query a request reaches filters on it (app.auth); rows from before 0007 and
    # requests without keys belong to DEFAULT_TENANT.
    return Column("tenant", String(64), nullable=False,
                  server_default=text(f"'{DEFAULT_TENANT}'"))

# Names for constraints added from now on, the same on every database, so a migration can
# drop them by name (SQLite's batch mode needs that). Today's indexes are named explicitly,
# so nothing existing changes. No "uq"/"pk" rules: they would rename the unnamed unique
# constraint on id and the primary key that release 0.1 databases already have; name
# new unique constraints explicitly.
metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
})

lowerings = Table(
    "lowerings",
    metadata,
    # seq orders the list and backs the paging cursor; id is the public handle.
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(32), nullable=False, unique=True),
    Column("status", String(16), nullable=False),
    Column("phase", String(16)),
    Column("model_name", String(128), nullable=False),
    Column("backend_id", String(128), nullable=False),
    Column("device", String(16), nullable=False),
    Column("options", JSON, nullable=False),
    Column("verify", Boolean, nullable=False),
    Column("rtol", Float, nullable=False),
    Column("atol", Float, nullable=False),
    Column("input_sha256", String(64), nullable=False),
    Column("input_size_bytes", BigInteger, nullable=False),
    Column("artifact_sha256", String(64)),
    Column("artifact_size_bytes", BigInteger),
    Column("verification", JSON),
    Column("error", JSON),
    Column("timings", JSON, nullable=False),
    Column("toolchain", JSON),
    Column("worker_pid", Integer),
    Column("attempts", Integer, nullable=False, default=0),
    Column("resources", JSON),
    # eager_ms, compiled_ms, speedup, runs: the verified runner timed against eager.
    Column("profile", JSON),
    # Cache: the key of everything that shapes the artifact; a coalesced job points at
    # the job doing the work (parent_id) and finishes with it.
    Column("cache_key", String(64)),
    Column("cache_hit", Boolean, nullable=False, default=False),
    Column("parent_id", String(32)),
    # Compiled-code reuse: the key of the code this job compiles (cache_key.code_key; NULL
    # when its code depends on weight values), and the job whose compiled files it took.
    Column("code_key", String(64)),
    Column("code_reused_from", String(32)),
    # Who runs it (a worker host's node name) and until when its claim holds: a running
    # job whose lease expired is taken over or re-queued (JobLifecycle.claim, reap).
    Column("worker", String(255)),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    # The submit's callback_url: told of the job's final status like a webhook (0006).
    Column("callback_url", String(2048)),
    _tenant_column(),
    # Retention (0008, app.jobs.retention): when the archive was last downloaded or
    # served (NULL: when the job finished), and when the archive (with why: ttl or
    # budget), the input and the log were removed. The job's row stays.
    Column("last_used_at", DateTime(timezone=True)),
    Column("artifact_expired_at", DateTime(timezone=True)),
    Column("artifact_expired_reason", String(16)),
    Column("input_removed_at", DateTime(timezone=True)),
    Column("log_removed_at", DateTime(timezone=True)),
    Index("ix_lowerings_status_seq", "status", "seq"),
    Index("ix_lowerings_model_seq", "model_name", "seq"),
    Index("ix_lowerings_cache_key", "cache_key", "status"),
    Index("ix_lowerings_parent", "parent_id"),
    Index("ix_lowerings_code_key", "code_key", "status"),
    Index("ix_lowerings_status_lease", "status", "lease_expires_at"),
    # A tenant's list (newest first) and its quota counts (active jobs, stored bytes).
    Index("ix_lowerings_tenant_seq", "tenant", "seq"),
    Index("ix_lowerings_tenant_status", "tenant", "status"),
    Index("ix_lowerings_artifact", "artifact_sha256", "artifact_expired_at"),
    Index("ix_lowerings_input_sweep", "input_removed_at", "finished_at"),
    Index("ix_lowerings_log_sweep", "log_removed_at", "finished_at"),
    # The list's order and cursor (0008): (created_at, id), both already public, so a page
    # boundary tells a tenant nothing about other tenants' jobs (seq's gaps would).
    Index("ix_lowerings_tenant_created", "tenant", "created_at", "id"),
)

# Resumable uploads (POST /v1/uploads): a program sent in parts, assembled and gated once,
# then named by its id or its sha256 in any number of submits. The state lives here (and
# the parts in the data dir or an S3 multipart upload), so any API replica can serve it.
uploads = Table(
    "uploads",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(32), nullable=False),
    # receiving -> assembling -> ready | failed (app.storage.resumable.UploadStatus)
    Column("status", String(16), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("part_size_bytes", BigInteger, nullable=False),
    Column("parts", Integer, nullable=False),
    # What the client declared; once ready, the sha256 of the bytes received (and gated).
    Column("sha256", String(64)),
    # The gate's report: code_key needs structure_sha256 at every submit that names it.
    Column("structure_sha256", String(64)),
    # The S3 multipart upload's id (NULL on local storage).
    Column("multipart_id", String(1024)),
    Column("error", JSON),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("completed_at", DateTime(timezone=True)),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    # When its complete began (0008): an assembly older than the gate's time and more
    # is its replica's death; retention puts it back to receiving (complete again).
    Column("assembling_since", DateTime(timezone=True)),
    _tenant_column(),
    Index("ux_uploads_id", "id", unique=True),
    Index("ix_uploads_sha256", "sha256", "status"),
    Index("ix_uploads_status_expires", "status", "expires_at"),
    Index("ix_uploads_tenant_sha256", "tenant", "sha256"),
)

# Webhook endpoints (POST /v1/webhooks): told of every final status of the events they
# subscribe to. The secret signs deliveries (Standard Webhooks); an endpoint that answers
# 410 or keeps failing past the retry schedule is disabled, with the reason kept.
webhooks = Table(
    "webhooks",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(32), nullable=False),
    Column("url", String(2048), nullable=False),
    Column("events", JSON, nullable=False),
    Column("secret", String(128), nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("disabled_reason", String(512)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("disabled_at", DateTime(timezone=True)),
    _tenant_column(),
    Index("ux_webhooks_id", "id", unique=True),
    Index("ix_webhooks_tenant_seq", "tenant", "seq"),
)

# The outbox and the delivery log in one: a row is written in the transaction that moves a
# job to its final status (app.webhooks.outbox), one per subscribed endpoint and one for
# the job's callback_url (webhook_id NULL), and is then updated by every delivery attempt.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    # The webhook-id header: the same on every retry, so receivers can drop duplicates.
    Column("id", String(40), nullable=False),
    Column("webhook_id", String(32)),
    Column("url", String(2048), nullable=False),
    Column("event", String(32), nullable=False),
    Column("job_id", String(32), nullable=False),
    Column("payload", JSON, nullable=False),
    # pending -> delivered | failed (the schedule ran out, a 410, or the endpoint went)
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    # When it is due; while an attempt is in flight, when that attempt's claim runs out.
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_status_code", Integer),
    Column("last_error", String(512)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_attempt_at", DateTime(timezone=True)),
    Column("delivered_at", DateTime(timezone=True)),
    Index("ux_webhook_deliveries_id", "id", unique=True),
    Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    Index("ix_webhook_deliveries_webhook", "webhook_id", "seq"),
)

# API keys (0007): ``<prefix>_<id>_<secret>``; only the public id and an HMAC-SHA256 of the
# secret under the server's pepper are kept (app.auth). Made, listed and revoked with
# `lowering-service keys`, never over HTTP.
api_keys = Table(
    "api_keys",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(32), nullable=False),
    Column("tenant", String(64), nullable=False),
    # Sorted names among read, submit, admin.
    Column("scopes", JSON, nullable=False),
    Column("key_hmac", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
    # Written at most once a minute per key, so a busy key does not write on every request.
    Column("last_used_at", DateTime(timezone=True)),
    Index("ux_api_keys_id", "id", unique=True),
    Index("ix_api_keys_tenant", "tenant"),
)

# Per-tenant quota overrides (0007), set with `lowering-service tenants set`; a NULL
# limit, or no row, means the global default (LOWERING_TENANT_MAX_*).
tenants = Table(
    "tenants",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False),
    Column("max_active_jobs", Integer),
    Column("max_storage_bytes", BigInteger),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ux_tenants_name", "name", unique=True),
)
