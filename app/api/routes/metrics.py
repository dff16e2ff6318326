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

from app.api.deps import AdminDep, StoreDep
from app.metrics import CONTENT_TYPE, exposition

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def metrics(store: StoreDep, principal: AdminDep) -> Response:
    """This process's counters and histograms, and the job database's queue and running
    gauges (the same on every replica: aggregate those with max)."""
    body = await to_thread.run_sync(exposition, store)
    return Response(body, media_type=CONTENT_TYPE)
