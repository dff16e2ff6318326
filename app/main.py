"""The FastAPI app. Nothing runs at import: ``create_app(settings)`` builds it."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from app import __version__
from app.api.deps import Services
from app.api.docs import mount_docs
from app.api.handlers import register_exception_handlers
from app.api.routes import health, lowerings, metrics, uploads, webhooks
from app.auth import AuthConfigError, KeyStore, auth_mode, check_keys_exist
from app.errors import ObjectStoreUnavailable
from app.executors.base import Executor
from app.executors.local import LocalExecutor
from app.jobs import migrate
from app.jobs.lifecycle import JobLifecycle, Quota
from app.jobs.retention import Janitor, Retention
from app.jobs.store import JobStore
from app.logs import RequestIdMiddleware
from app.logs import configure as configure_logging
from app.settings import Settings
from app.storage.artifacts import LocalArtifactStore
from app.storage.base import ArtifactStore, UploadStore
from app.storage.files import LocalUploadStore
from app.storage.joblogs import open_log_store
from app.storage.reserve import make_reserve
from app.worker import JobContext

log = logging.getLogger("app")


def _open_stores(settings: Settings) -> tuple[UploadStore, ArtifactStore]:
    """Uploads and artifacts in the data dir, or in a bucket (LOWERING_STORAGE=s3, which
    raises ObjectStoreUnavailable unless the bucket answers). Logs: joblogs.open_log_store."""
    if settings.storage == "s3":
        from app.storage.s3 import open_s3_stores  # boto3 is imported only when used

        return open_s3_stores(settings)
    return LocalUploadStore(settings.uploads_dir), LocalArtifactStore(settings.artifacts_dir)


def create_app(settings: Settings | None = None, *,
               make_executor: Callable[[JobContext], Executor] | None = None) -> FastAPI:
    """Build the app; stores, the lifecycle and the executor open in the lifespan.

    :param make_executor: builds the executor from the job context; default the local
        one (sandboxed children on this host), or with LOWERING_EXECUTOR=celery the fleet's
        (worker hosts over RabbitMQ). In-process route tests pass a fake.
    """
    settings = settings or Settings()
    if make_executor is None and settings.executor == "celery":
        from app.executors.celery_executor import CeleryExecutor  # jobs on worker hosts

        make_executor = CeleryExecutor
    make_executor = make_executor or LocalExecutor
    pepper = settings.auth_pepper.get_secret_value() if settings.auth_pepper else None
    # Refused here, before anything opens: a public bind without LOWERING_AUTH set.
    mode = auth_mode(auth=settings.auth, host=settings.host, pepper=pepper)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.ensure_dirs()
        uploads, artifacts = _open_stores(settings)
        uploads.discard_staged()  # receptions a crash cut short
        if not make_reserve(settings.data_dir):
            log.warning("the data dir has little free space: no disk reserve for DELETE")
        # The embedded SQLite database migrates itself; a shared one is migrated by
        # `lowering-service migrate` (or LOWERING_MIGRATE_ON_START) before any replica starts.
        migrate.prepare(settings.db_url, auto_upgrade=settings.db_url.startswith("sqlite")
                        or settings.migrate_on_start)
        store = JobStore(settings.db_url)
        keys = KeyStore(store.engine, pepper) if mode == "required" else None
        if keys is not None:
            check_keys_exist(keys)  # auth required and no key: nobody could use it
        logs = open_log_store(settings)
        lifecycle = JobLifecycle(store, uploads=uploads, logs=logs, artifacts=artifacts,
                                 lease_s=settings.lease_s, quota=Quota(
                                     max_active_jobs=settings.tenant_max_active_jobs,
                                     max_storage_bytes=settings.tenant_max_storage_bytes),
                                 share_cache=settings.share_cache_across_tenants)
        janitor = Janitor(Retention(store, uploads=uploads, logs=logs, artifacts=artifacts,
                                    settings=settings))
        executor = make_executor(JobContext(settings, lifecycle, uploads, logs, artifacts))
        lifecycle.dispatch = executor.submit
        lifecycle.listeners.append(executor)
        executor.start()
        app.state.services = Services(settings=settings, store=store, lifecycle=lifecycle,
                                      uploads=uploads, logs=logs, artifacts=artifacts,
                                      executor=executor, keys=keys, janitor=janitor)
        lifecycle.recover(requeue_running=executor.runs_jobs_here)
        # Every replica sends due webhook deliveries; a job ending here wakes it at once.
        from app.webhooks.dispatcher import Dispatcher

        dispatcher = Dispatcher(store.engine, settings=settings)
        lifecycle.listeners.append(dispatcher)
        dispatcher.start()
        janitor.start()  # every replica sweeps: each removal is guarded, one wins
        try:
            yield
        finally:
            executor.close()
            janitor.stop()
            dispatcher.stop()
            store.close()

    app = FastAPI(
        title="Lowering service",
        version=__version__,
        summary="Upload a torch.export program; get a verified AOTInductor pt2 archive.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load from CDNs: mount_docs serves ours
        redoc_url=None,
    )
    app.add_middleware(RequestIdMiddleware)  # request and job ids on every log line
    # Set when a stop begins: held ?wait= requests answer with the job at once.
    app.state.stopping = threading.Event()
    register_exception_handlers(app)
    app.include_router(health.router)
    app.include_router(lowerings.router)
    app.include_router(uploads.router)
    app.include_router(metrics.router)
    mount_docs(app)  # /docs, /redoc and their assets, from the service (no CDN)
    app.include_router(webhooks.router)
    return app


def run() -> None:
    """Console entry point: serve with uvicorn on LOWERING_HOST:LOWERING_PORT."""
    import uvicorn

    settings = Settings()
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    if settings.storage == "s3":  # refuse to start in one line, not a lifespan traceback
        from app.storage.s3 import open_s3_stores

        try:
            open_s3_stores(settings)
        except ObjectStoreUnavailable as exc:
            log.error("cannot start: %s", exc.message)
            raise SystemExit(1) from None
    try:
        app = create_app(settings)
        if settings.auth == "required":  # refuse in one line, not a lifespan traceback
            migrate.prepare(settings.db_url, auto_upgrade=settings.db_url.startswith("sqlite")
                            or settings.migrate_on_start)
            store = JobStore(settings.db_url)
            try:
                check_keys_exist(KeyStore(store.engine, None))
            finally:
                store.close()
    except (AuthConfigError, migrate.MigrationError) as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(1) from None

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.stopping.set()
            super().handle_exit(sig, frame)

    _Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                           log_level=settings.log_level, timeout_graceful_shutdown=10)).run()


if __name__ == "__main__":
    run()
