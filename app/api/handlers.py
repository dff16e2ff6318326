"""Every error leaves as ``{"error": {"code", "message"}}``; never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app import metrics
from app.errors import (
    ApiErrorCode,
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
)
from app.jobs.failures import out_of_space

log = logging.getLogger("app.api")
# The statuses Starlette's router and request parsing raise, as our classes.
_STARLETTE: dict[int, type[ServiceError]] = {
    cls.status: cls for cls in (BadRequest, NotFound, MethodNotAllowed, PayloadTooLarge)}


def error_response(code: ApiErrorCode, message: str) -> JSONResponse:
    """The error body, with the one status ``code`` is registered with."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=code.status)


def _disk_full() -> JSONResponse:
    log.error("the data dir or the job database is out of space")
    return error_response(ApiErrorCode.STORAGE_FULL, "the service is out of disk space; delete "
                          "finished lowerings (DELETE /v1/lowerings/{id}) or free space, "
                          "then retry")


def register_exception_handlers(app: FastAPI) -> None:
    """Map our exception tree, FastAPI's validation and Starlette's HTTP errors."""

    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        metrics.record_refusal(exc.code)  # the upload gate's codes are counted
        if exc.status >= 500:
            log.error("service error: %s", exc.message)
        response = error_response(exc.code, exc.message)
        retry_after_s = getattr(exc, "retry_after_s", None)
        if retry_after_s is not None:
            response.headers["Retry-After"] = str(retry_after_s)
        if isinstance(exc, Unauthorized):  # RFC 6750: how to authenticate
            response.headers["WWW-Authenticate"] = 'Bearer realm="lowering"'
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path"))
            parts.append(f"{where}: {err.get('msg')}")
        return error_response(ApiErrorCode.INVALID_PARAMETER,
                              "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Any other status (none is raised in this app) is answered as 400 or 500, so
        # every code keeps its one status.
        fallback = BadRequest if exc.status_code < 500 else ServiceError
        response = error_response(_STARLETTE.get(exc.status_code, fallback).code,
                                  str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(ClientDisconnect)
    async def _disconnect(_: Request, exc: ClientDisconnect) -> JSONResponse:
        # Nobody is listening; the upload was already discarded.
        return error_response(ApiErrorCode.CLIENT_DISCONNECTED,
                              "the client went away mid-request")

    @app.exception_handler(OSError)
    async def _os(_: Request, exc: OSError) -> JSONResponse:
        if out_of_space(exc):
            return _disk_full()
        return await _unexpected(_, exc)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(ApiErrorCode.INTERNAL_ERROR,
                              "internal error; the server log has details")
