"""The FastAPI app. Nothing runs at import: ``create_app(settings)`` builds it."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from app import __version__
from app.api.handlers import register_exception_handlers
from app.api.routes import health, lowerings
from app.constants import ErrorCode, JobStatus
from app.executors.local import LocalExecutor
from app.jobs.store import JobStore
from app.settings import Settings
from app.storage.artifacts import ArtifactStore
from app.storage.reserve import make_reserve

log = logging.getLogger("app")
MAX_ATTEMPTS = 2


def recover_jobs(store: JobStore, executor: LocalExecutor) -> None:
    """After a restart: re-run jobs that were running once, then queue what is queued."""
    for job_id in store.ids_with_status(statuses=[JobStatus.RUNNING]):
        job = store.get(job_id)
        if job is not None and job["attempts"] < MAX_ATTEMPTS:
            store.transition(job_id, from_=[JobStatus.RUNNING], to=JobStatus.QUEUED,
                             started_at=None, worker_pid=None, phase=None)
        else:
            store.transition(job_id, from_=[JobStatus.RUNNING], to=JobStatus.FAILED, error={
                "code": ErrorCode.INTERRUPTED.value,
                "message": "the service stopped twice while this job ran; resubmit it",
                "detail": {},
            })
    for job_id in store.ids_with_status(statuses=[JobStatus.QUEUED]):
        job = store.get(job_id)
        if job is None:
            continue
        if job["parent_id"] is None:
            executor.submit(job_id)
        else:  # attached to another job: settles with it (now, if that one is done)
            executor.settle(job["parent_id"])


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; stores and the worker pool open in the lifespan."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.ensure_dirs()
        # No job runs yet: scratch dirs and partial uploads are left over from a crash.
        for leftover in settings.scratch_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        for partial in settings.uploads_dir.glob(".upload-*"):
            partial.unlink(missing_ok=True)
        if not make_reserve(settings.data_dir):
            log.warning("the data dir has little free space: no disk reserve for DELETE")
        store = JobStore(settings.db_url)
        artifacts = ArtifactStore(settings.artifacts_dir)
        executor = LocalExecutor(settings, store, artifacts)
        executor.start()
        app.state.settings = settings
        app.state.store = store
        app.state.artifacts = artifacts
        app.state.executor = executor
        app.state.admit_lock = asyncio.Lock()
        recover_jobs(store, executor)
        try:
            yield
        finally:
            executor.close()
            store.close()

    app = FastAPI(
        title="Lowering service",
        version=__version__,
        summary="Upload a torch.export program; get a verified AOTInductor pt2 archive.",
        lifespan=lifespan,
    )
    # Set when a stop begins: held ?wait= requests answer with the job at once.
    app.state.stopping = threading.Event()
    register_exception_handlers(app)
    app.include_router(health.router)
    app.include_router(lowerings.router)
    return app


def run() -> None:
    """Console entry point: serve with uvicorn on LOWERING_HOST:LOWERING_PORT."""
    import uvicorn

    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.stopping.set()
            super().handle_exit(sig, frame)

    _Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                           log_level=settings.log_level, timeout_graceful_shutdown=10)).run()


if __name__ == "__main__":
    run()
