"""Webhook endpoints and their delivery log, as the API reads and writes them."""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import uuid
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from app.jobs.models import webhook_deliveries, webhooks
from app.webhooks.outbox import DeliveryStatus

SECRET_BYTES = 24
MAX_DELIVERIES_SHOWN = 100


def new_secret() -> str:
    """``whsec_`` and 24 random bytes in base64: what Standard Webhooks libraries take."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


class WebhookRecords:
    """The ``webhooks`` and ``webhook_deliveries`` tables.

    :param engine: the job database's engine (the tables live beside the jobs).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, *, url: str, events: list[str], now: dt.datetime,
               tenant: str) -> dict[str, Any]:
        """An endpoint told of ``tenant``'s jobs only."""
        row: dict[str, Any] = {"id": uuid.uuid4().hex, "url": url, "events": events,
                               "secret": new_secret(), "enabled": True, "created_at": now,
                               "tenant": tenant}
        with self.engine.begin() as conn:
            conn.execute(insert(webhooks).values(**row))
        found = self.get(row["id"])
        assert found is not None
        return found

    def get(self, webhook_id: str, *, tenant: str | None = None) -> dict[str, Any] | None:
        """The endpoint; with ``tenant`` (every request), only if it is that tenant's."""
        query = select(webhooks).where(webhooks.c.id == webhook_id)
        if tenant is not None:
            query = query.where(webhooks.c.tenant == tenant)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return _utc(dict(row._mapping)) if row is not None else None

    def all(self, *, tenant: str) -> list[dict[str, Any]]:
        """The tenant's endpoints, oldest first."""
        query = select(webhooks).where(webhooks.c.tenant == tenant).order_by(webhooks.c.seq)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [_utc(dict(row._mapping)) for row in rows]

    def delete(self, webhook_id: str) -> bool:
        """Remove an endpoint and its log (its pending deliveries are never sent)."""
        with self.engine.begin() as conn:
            conn.execute(delete(webhook_deliveries)
                         .where(webhook_deliveries.c.webhook_id == webhook_id))
            return conn.execute(delete(webhooks).where(webhooks.c.id == webhook_id)).rowcount == 1

    def deliveries(self, webhook_id: str, *,
                   limit: int = MAX_DELIVERIES_SHOWN) -> list[dict[str, Any]]:
        query = (select(webhook_deliveries).where(webhook_deliveries.c.webhook_id == webhook_id)
                 .order_by(webhook_deliveries.c.seq.desc()).limit(limit))
        with self.engine.connect() as conn:
            return [_utc(dict(row._mapping)) for row in conn.execute(query)]

    def disable(self, webhook_id: str, *, reason: str, now: dt.datetime) -> bool:
        """Stop an endpoint: no new events, and its pending deliveries fail with ``reason``."""
        with self.engine.begin() as conn:
            moved = conn.execute(
                update(webhooks).where(webhooks.c.id == webhook_id)
                .where(webhooks.c.enabled.is_(True))
                .values(enabled=False, disabled_reason=reason[:512], disabled_at=now)
            ).rowcount == 1
            conn.execute(
                update(webhook_deliveries).where(webhook_deliveries.c.webhook_id == webhook_id)
                .where(webhook_deliveries.c.status == DeliveryStatus.PENDING.value)
                .values(status=DeliveryStatus.FAILED.value,
                        last_error=f"endpoint disabled: {reason}"[:512]))
        return moved


def _utc(row: dict[str, Any]) -> dict[str, Any]:
    for key, value in row.items():
        # SQLite hands back naive datetimes; everything stored is UTC.
        if isinstance(value, dt.datetime) and value.tzinfo is None:
            row[key] = value.replace(tzinfo=dt.UTC)
    return row
