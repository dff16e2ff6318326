"""The outbox: a job's final status becomes delivery rows in the same transaction.

``enqueue`` runs on the connection of the write that moved the job (JobStore.transition,
or JobStore.create for a cache hit), so the status change and its events commit or roll
back together: no event without its status, no status without its events. The
dispatcher (dispatcher.py) sends the rows later, from any replica. Database only: the
job store imports this module in every process, worker hosts included.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, insert, select

from app.constants import JobStatus
from app.jobs.models import DEFAULT_TENANT, webhook_deliveries, webhooks


class Event(enum.StrEnum):
    """What a webhook may subscribe to; each carries the public job JSON."""

    SUCCEEDED = "lowering.succeeded"
    FAILED = "lowering.failed"
    CANCELLED = "lowering.cancelled"


EVENT_OF = {JobStatus.SUCCEEDED.value: Event.SUCCEEDED, JobStatus.FAILED.value: Event.FAILED,
            JobStatus.CANCELLED.value: Event.CANCELLED}


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    """Due at next_attempt_at (or being sent, under a claim that runs out then)."""
    DELIVERED = "delivered"
    """The receiver answered 2xx."""
    FAILED = "failed"
    """Given up: the schedule ran out, the receiver answered 410, or its endpoint was
    disabled or deleted; last_error says which."""


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def envelope(event: Event, job: Mapping[str, Any], now: dt.datetime) -> dict[str, Any]:
    """The body of a delivery: the Standard Webhooks shape, the public job as data."""
    from app.schemas import LoweringPublic  # the API's shape; pydantic only

    return {"type": event.value, "timestamp": now.isoformat(),
            "data": LoweringPublic.from_job(job).model_dump(mode="json")}


def enqueue(conn: Connection, job: Mapping[str, Any], *, now: dt.datetime) -> int:
    """Write one delivery per enabled endpoint of the job's tenant subscribed to the job's
    final status, and one to the job's callback_url; returns how many rows were written."""
    event = EVENT_OF.get(job["status"])
    if event is None:
        return 0
    targets: list[tuple[str | None, str]] = [
        (row.id, row.url)
        for row in conn.execute(select(webhooks.c.id, webhooks.c.url, webhooks.c.events)
                                .where(webhooks.c.enabled.is_(True))
                                .where(webhooks.c.tenant == job.get("tenant", DEFAULT_TENANT))
                                .order_by(webhooks.c.seq))
        if event.value in (row.events or [])]
    if job.get("callback_url"):
        targets.append((None, str(job["callback_url"])))
    if not targets:
        return 0
    body = envelope(event, job, now)
    conn.execute(insert(webhook_deliveries), [
        {"id": new_message_id(), "webhook_id": webhook_id, "url": url, "event": event.value,
         "job_id": job["id"], "payload": body, "status": DeliveryStatus.PENDING.value,
         "attempts": 0, "next_attempt_at": now, "created_at": now}
        for webhook_id, url in targets])
    return len(targets)
