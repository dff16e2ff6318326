"""The dispatcher: a thread in every API replica that sends due deliveries.

Each round claims due rows with a guarded UPDATE (the attempt count it read, and
``next_attempt_at`` pushed forward by a lease), so two replicas never send the same
delivery at once and one that dies mid-send leaves it due again when the lease runs out.
A delivery is signed per Standard Webhooks (``standardwebhooks``), sent to the address
its URL was checked to resolve to (targets.py), with short timeouts, no redirects and a
small read of the answer. 2xx: delivered. 410: the endpoint is disabled. Anything else
(network error, 3xx, 4xx, 5xx, a refused target): retried on RETRY_SCHEDULE_S, and once
that runs out the endpoint is disabled, the reason kept on it.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from sqlalchemy import Engine, select, update
from standardwebhooks import Webhook

from app import __version__
from app.jobs.models import webhook_deliveries, webhooks
from app.settings import Settings
from app.webhooks.endpoints import WebhookRecords
from app.webhooks.outbox import DeliveryStatus
from app.webhooks.targets import TargetRefused, resolve

log = logging.getLogger("app.webhooks")
RETRY_SCHEDULE_S = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
"""The waits after a failed attempt (Standard Webhooks' schedule; the first attempt is
immediate): 8 attempts over about 27 hours. Scaled by LOWERING_WEBHOOK_RETRY_SCALE."""
MAX_ATTEMPTS = len(RETRY_SCHEDULE_S) + 1
MAX_RESPONSE_BYTES = 4096
USER_AGENT = f"lowering-service/{__version__} (webhooks)"


def record(outcome: str) -> None:
    """Count a delivery outcome (delivered, failed, disabled, refused) in app.metrics,
    where that module offers it."""
    try:
        metrics = importlib.import_module("app.metrics")
    except ImportError:
        return
    counter = getattr(metrics, "record_webhook_delivery", None)
    if counter is not None:
        counter(outcome)


class Dispatcher:
    """Sends the outbox's due deliveries from a daemon thread.

    :param engine: the job database's engine.
    :param settings: the webhook_* settings (timeouts, schedule scale, private targets).
    """

    def __init__(self, engine: Engine, *, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.records = WebhookRecords(engine)
        self.lease_s = 4 * settings.webhook_timeout_s + 10
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(settings.webhook_concurrency,
                                        thread_name_prefix="webhook")

    # -- the thread -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="webhook-dispatcher",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.settings.webhook_timeout_s + 5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def job_finished(self, job: Any) -> None:
        """A lifecycle listener: a job of this process ended, so its events are due now."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self.run_once()
            except Exception:  # the database is away: try again next round
                log.exception("webhook dispatch round failed")
                sent = 0
            if not sent:
                self._wake.wait(self.settings.webhook_poll_s)
                self._wake.clear()

    # -- one round --------------------------------------------------------------------

    def run_once(self) -> int:
        """Claim the due deliveries and send them; returns how many were sent."""
        claimed = self._claim(limit=2 * self.settings.webhook_concurrency)
        for future in [self._pool.submit(self._send, row) for row in claimed]:
            future.result()
        return len(claimed)

    def _claim(self, *, limit: int) -> list[dict[str, Any]]:
        now = dt.datetime.now(dt.UTC)
        table = webhook_deliveries
        due = (select(table).where(table.c.status == DeliveryStatus.PENDING.value)
               .where(table.c.next_attempt_at <= now).order_by(table.c.next_attempt_at)
               .limit(limit))
        claimed = []
        with self.engine.begin() as conn:
            rows = [dict(row._mapping) for row in conn.execute(due)]
        for row in rows:
            with self.engine.begin() as conn:
                won = conn.execute(
                    update(table).where(table.c.id == row["id"])
                    .where(table.c.status == DeliveryStatus.PENDING.value)
                    .where(table.c.attempts == row["attempts"])
                    .values(attempts=row["attempts"] + 1, last_attempt_at=now,
                            next_attempt_at=now + dt.timedelta(seconds=self.lease_s))
                ).rowcount == 1
            if won:
                claimed.append({**row, "attempts": row["attempts"] + 1})
        return claimed

    def _secret(self, row: dict[str, Any]) -> str | None:
        if row["webhook_id"] is None:
            return self.settings.webhook_callback_secret
        with self.engine.connect() as conn:
            hook = conn.execute(select(webhooks.c.secret, webhooks.c.enabled)
                                .where(webhooks.c.id == row["webhook_id"])).first()
        return hook.secret if hook is not None and hook.enabled else None

    def _send(self, row: dict[str, Any]) -> None:
        try:
            self._attempt(row)
        except Exception as exc:  # never leave a claimed row to its lease, attempt after attempt
            log.exception("webhook delivery %s failed unexpectedly", row["id"])
            self._failed(row, code=None, error=f"internal error: {type(exc).__name__}")

    def _attempt(self, row: dict[str, Any]) -> None:
        secret = self._secret(row)
        if secret is None:
            self._finish(row, status=DeliveryStatus.FAILED, code=None,
                         error="the endpoint was disabled or deleted, or no callback secret "
                         "is set")
            return
        try:
            target = resolve(row["url"], allow_private=self.settings.webhook_allow_private)
        except TargetRefused as exc:
            record("refused")
            self._failed(row, code=None, error=f"refused: {exc.message}")
            return
        body = json.dumps(row["payload"], separators=(",", ":"))
        sent_at = dt.datetime.now(dt.UTC)
        headers = {
            "content-type": "application/json", "user-agent": USER_AGENT,
            "webhook-id": row["id"], "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": Webhook(secret).sign(row["id"], sent_at, body),
            **target.headers,
        }
        try:
            code = self._post(target.pinned_url, body, headers, target.extensions)
        except httpx.HTTPError as exc:
            self._failed(row, code=None, error=f"{type(exc).__name__}: {exc}"[:300])
            return
        if 200 <= code < 300:
            record("delivered")
            self._finish(row, status=DeliveryStatus.DELIVERED, code=code, error=None)
        elif code == 410:
            self._finish(row, status=DeliveryStatus.FAILED, code=code,
                         error="the receiver answered 410 Gone")
            self._disable(row, "the receiver answered 410 Gone")
        else:
            why = "redirects are not followed" if 300 <= code < 400 else "not a 2xx answer"
            self._failed(row, code=code, error=f"HTTP {code}: {why}")

    def _post(self, url: str, body: str, headers: dict[str, str],
              extensions: dict[str, str]) -> int:
        timeout_s = self.settings.webhook_timeout_s
        # A fresh client: no pooled connection is ever reused for another host name, and
        # no proxy from the environment resolves the name again.
        with httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=False,
                          trust_env=False) as client, client.stream(
                "POST", url, content=body.encode(), headers=headers,
                extensions=extensions) as response:
            deadline = time.monotonic() + timeout_s
            read = 0
            for chunk in response.iter_raw():  # a little of the answer, never all of it
                read += len(chunk)
                if read >= MAX_RESPONSE_BYTES or time.monotonic() > deadline:
                    break
            return response.status_code

    # -- outcomes ---------------------------------------------------------------------

    def _failed(self, row: dict[str, Any], *, code: int | None, error: str) -> None:
        if row["attempts"] >= MAX_ATTEMPTS:
            self._finish(row, status=DeliveryStatus.FAILED, code=code, error=error)
            self._disable(row, f"delivery {row['id']} failed {row['attempts']} times; "
                          f"last: {error}")
            return
        record("failed")
        wait_s = RETRY_SCHEDULE_S[row["attempts"] - 1] * self.settings.webhook_retry_scale
        self._finish(row, status=DeliveryStatus.PENDING, code=code, error=error,
                     next_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=wait_s))

    def _disable(self, row: dict[str, Any], reason: str) -> None:
        record("disabled")
        if row["webhook_id"] is not None:
            log.warning("webhook %s disabled: %s", row["webhook_id"], reason)
            self.records.disable(row["webhook_id"], reason=reason, now=dt.datetime.now(dt.UTC))

    def _finish(self, row: dict[str, Any], *, status: DeliveryStatus, code: int | None,
                error: str | None, next_at: dt.datetime | None = None) -> None:
        """Record an attempt's outcome, only if this claim still holds the row."""
        table = webhook_deliveries
        values: dict[str, Any] = {"status": status.value, "last_status_code": code,
                                  "last_error": error[:512] if error else None}
        if status is DeliveryStatus.DELIVERED:
            values["delivered_at"] = dt.datetime.now(dt.UTC)
        if next_at is not None:
            values["next_attempt_at"] = next_at
        with self.engine.begin() as conn:
            conn.execute(update(table).where(table.c.id == row["id"])
                         .where(table.c.attempts == row["attempts"])
                         .where(table.c.status == DeliveryStatus.PENDING.value).values(**values))
