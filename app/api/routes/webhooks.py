"""/v1/webhooks: register endpoints for lowering events, list, delete, read their log."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.api.deps import AdminDep, SettingsDep, StoreDep
from app.api.openapi import ERROR_RESPONSES
from app.errors import ApiErrorCode, BadRequest, NotFound, Unprocessable
from app.jobs.store import utcnow
from app.schemas import (
    DeliveriesPublic,
    DeliveryPublic,
    WebhookCreate,
    WebhookCreated,
    WebhookPublic,
    WebhooksPublic,
)
from app.webhooks.endpoints import WebhookRecords
from app.webhooks.outbox import Event
from app.webhooks.targets import TargetRefused, resolve

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
WEBHOOK_ID_RE = re.compile(r"[0-9a-f]{32}")
MAX_BODY_BYTES = 16 * 1024


def _records(store: StoreDep) -> WebhookRecords:
    return WebhookRecords(store.engine)


RecordsDep = Annotated[WebhookRecords, Depends(_records)]


def _unknown(webhook_id: str) -> NotFound:
    return NotFound(f"no webhook with id {webhook_id[:80]!r}", code=ApiErrorCode.UNKNOWN_WEBHOOK)


async def _get_or_404(records: WebhookRecords, webhook_id: str,
                      tenant: str) -> dict[str, Any]:
    """The tenant's endpoint; another tenant's is 404 like an unknown id."""
    found = (await to_thread.run_sync(lambda: records.get(webhook_id, tenant=tenant))
             if WEBHOOK_ID_RE.fullmatch(webhook_id) else None)
    if found is None:
        raise _unknown(webhook_id)
    return found


def _parse(raw: bytes) -> WebhookCreate:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested thousands deep
        raise BadRequest('the body must be a JSON object {"url": ..., "events": [...]}') from None
    try:
        create = WebhookCreate.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in err["loc"]) or "the body"
        code = (ApiErrorCode.INVALID_PARAMETER if err["type"] in ("missing", "extra_forbidden")
                else ApiErrorCode.INVALID_WEBHOOK_URL if where == "url" else
                ApiErrorCode.UNKNOWN_EVENT if where.startswith("events") else
                ApiErrorCode.INVALID_PARAMETER)
        raise Unprocessable(f"{where}: {err['msg']} (send {{\"url\": \"https://...\", "
                            "\"events\": [\"lowering.succeeded\", ...]})", code=code) from None
    known = {event.value for event in Event}
    unknown = sorted({event for event in create.events if event not in known})
    if unknown:
        raise Unprocessable(f"unknown event(s) {', '.join(repr(e[:60]) for e in unknown)}; "
                            f"known: {', '.join(sorted(known))}", code=ApiErrorCode.UNKNOWN_EVENT)
    return create


@router.post("", status_code=201, response_model=WebhookCreated, responses=ERROR_RESPONSES)
async def create_webhook(request: Request, settings: SettingsDep,
                         records: RecordsDep, principal: AdminDep) -> JSONResponse:
    """Register an endpoint; the answer holds its signing secret, shown only this once."""
    raw = b""
    async for chunk in request.stream():  # never more than the cap held in memory
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise BadRequest(f"the body is over {MAX_BODY_BYTES} bytes; send only "
                             '{"url": ..., "events": [...]}')
    create = _parse(raw)
    try:
        await to_thread.run_sync(lambda: resolve(
            create.url, allow_private=settings.webhook_allow_private))
    except TargetRefused as exc:
        raise Unprocessable(exc.message, code=exc.code) from None
    events = sorted(set(create.events))
    hook = await to_thread.run_sync(lambda: records.create(
        url=create.url, events=events, now=utcnow(), tenant=principal.tenant))
    return JSONResponse(WebhookCreated(**hook).model_dump(mode="json"), status_code=201)


@router.get("", response_model=WebhooksPublic)
async def list_webhooks(records: RecordsDep, principal: AdminDep) -> WebhooksPublic:
    """The tenant's endpoints, oldest first, without secrets."""
    hooks = await to_thread.run_sync(lambda: records.all(tenant=principal.tenant))
    return WebhooksPublic(items=[WebhookPublic(**hook) for hook in hooks])


@router.get("/{webhook_id}", response_model=WebhookPublic, responses=ERROR_RESPONSES)
async def get_webhook(webhook_id: str, records: RecordsDep,
                      principal: AdminDep) -> WebhookPublic:
    """One endpoint, without its secret (enabled, or why it was disabled)."""
    return WebhookPublic(**await _get_or_404(records, webhook_id, principal.tenant))


@router.delete("/{webhook_id}", status_code=204, responses=ERROR_RESPONSES)
async def delete_webhook(webhook_id: str, records: RecordsDep,
                         principal: AdminDep) -> Response:
    """Remove an endpoint and its delivery log; nothing more is sent to it."""
    await _get_or_404(records, webhook_id, principal.tenant)
    if not await to_thread.run_sync(records.delete, webhook_id):
        raise _unknown(webhook_id)
    return Response(status_code=204)


@router.get("/{webhook_id}/deliveries", response_model=DeliveriesPublic,
            responses=ERROR_RESPONSES)
async def list_deliveries(webhook_id: str, records: RecordsDep,
                          principal: AdminDep) -> DeliveriesPublic:
    """The endpoint's delivery log, newest first (the last 100)."""
    await _get_or_404(records, webhook_id, principal.tenant)
    rows = await to_thread.run_sync(records.deliveries, webhook_id)
    return DeliveriesPublic(items=[DeliveryPublic(**{
        **row, "next_attempt_at": row["next_attempt_at"] if row["status"] == "pending" else None,
    }) for row in rows])
