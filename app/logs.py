"""Service logs: one line per record, text or JSON, each carrying its request id and job id.

The ids travel in context variables: ``RequestIdMiddleware`` sets the request's (the
caller's ``X-Request-Id`` when it is a sane token, else a new one, echoed in the response),
and the job's id is set where a job is handled (a route that names it, the supervisor that
runs it, a worker host's task). ``configure`` installs one handler on the root logger, so
uvicorn's and Celery's own loggers (which propagate) carry the ids too. Nothing here
imports torch.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from typing import IO, Any

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
JOB_ID: ContextVar[str | None] = ContextVar("job_id", default=None)
REQUEST_ID_HEADER = "x-request-id"
_TOKEN = re.compile(r"[0-9A-Za-z._:-]{1,64}")
_JOB_PATH = re.compile(r"^/v1/lowerings/([0-9A-Za-z_-]{1,64})(?:/|$)")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [req=%(request_id)s job=%(job_id)s]: %(message)s"
JSON_FIELDS = ("asctime", "levelname", "name", "message", "request_id", "job_id", "process")


class ContextFilter(logging.Filter):
    """Puts the current request and job ids on every record ("-" when there is none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = getattr(record, "request_id", None) or REQUEST_ID.get() or "-"
        record.job_id = getattr(record, "job_id", None) or JOB_ID.get() or "-"
        return True


def configure(*, level: str, fmt: str, stream: IO[str] | None = None) -> None:
    """One handler on the root logger writing to ``stream`` (stderr), in ``fmt`` (text or
    json); replaces any earlier handlers (basicConfig's, a previous call's)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter(
            " ".join(f"%({name})s" for name in JSON_FIELDS),
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            timestamp=False))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # uvicorn's own handlers would print the record a second time, without the ids.
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Records logged inside carry ``job_id`` (a thread or task handling that job)."""
    token = JOB_ID.set(job_id)
    try:
        yield
    finally:
        JOB_ID.reset(token)


class RequestIdMiddleware:
    """Pure ASGI (streams pass through untouched): a request id per HTTP request, taken
    from ``X-Request-Id`` when it is a plain token of at most 64 characters, else a new
    one, echoed in the response; the job id of a ``/v1/lowerings/{id}...`` path."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value.decode("latin-1") for name, value in scope.get("headers", ())
                      if name == REQUEST_ID_HEADER.encode()), "")
        request_id = given if _TOKEN.fullmatch(given) else uuid.uuid4().hex
        job = _JOB_PATH.match(scope.get("path", ""))
        request_token = REQUEST_ID.set(request_id)
        job_token = JOB_ID.set(job.group(1) if job else None)

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            JOB_ID.reset(job_token)
            REQUEST_ID.reset(request_token)
