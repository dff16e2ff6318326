"""Every error leaves as ``{"error": {"code", "message"}}``; never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.errors import ServiceError
from app.jobs.store import is_busy
from app.storage.reserve import out_of_space

log = logging.getLogger("app.api")


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _disk_full() -> JSONResponse:
    log.error("the data dir or the job database is out of space")
    return error_response(507, "storage_full", "the service is out of disk space; delete "
                          "finished lowerings (DELETE /v1/lowerings/{id}) or free space, "
                          "then retry")


def register_exception_handlers(app: FastAPI) -> None:
    """Map our exception tree, FastAPI's validation and Starlette's HTTP errors."""

    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500:
            log.error("service error: %s", exc.message)
        response = error_response(exc.status, exc.code, exc.message)
        if "retry_after_s" in exc.extra:
            response.headers["Retry-After"] = str(exc.extra["retry_after_s"])
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path"))
            parts.append(f"{where}: {err.get('msg')}")
        return error_response(422, "invalid_parameter", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        response = error_response(exc.status_code, codes.get(exc.status_code, "http_error"),
                                  str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(ClientDisconnect)
    async def _disconnect(_: Request, exc: ClientDisconnect) -> JSONResponse:
        # Nobody is listening; the upload was already discarded.
        return error_response(400, "client_disconnected", "the client went away mid-request")

    @app.exception_handler(OSError)
    async def _os(_: Request, exc: OSError) -> JSONResponse:
        if out_of_space(exc):
            return _disk_full()
        return await _unexpected(_, exc)

    @app.exception_handler(OperationalError)
    async def _database(_: Request, exc: OperationalError) -> JSONResponse:
        if out_of_space(exc):
            return _disk_full()
        if not is_busy(exc):
            return await _unexpected(_, exc)
        # Writers were retried for a minute and the database is still locked.
        response = error_response(503, "database_busy", "the job database is busy; retry soon")
        response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal error; the server log has details")
