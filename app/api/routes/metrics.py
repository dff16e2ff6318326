"""GET /metrics: Prometheus text (app.metrics says what is counted where).

With LOWERING_AUTH=required it needs a key with the admin scope (Prometheus:
``authorization: {credentials: <key>}``): it tells the whole fleet's queue. No torch;
the job database's state is one grouped, indexed query over the active jobs, so a
scrape stays fast however many jobs have finished.
"""

from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter
from fastapi.responses import Response

from app.api.deps import AdminDep, ServicesDep, StoreDep
from app.metrics import CONTENT_TYPE, StorageCollector, exposition

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def metrics(store: StoreDep, services: ServicesDep, principal: AdminDep) -> Response:
    """This process's counters and histograms, and the job database's queue, running and
    storage gauges (the same on every replica: aggregate those with max)."""
    janitor = services.janitor
    extra = [StorageCollector(janitor.measured)] if janitor is not None else []
    body = await to_thread.run_sync(exposition, store, *extra)
    return Response(body, media_type=CONTENT_TYPE)
