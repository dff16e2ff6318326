"""Log lines carry the request id and the job id, as text or as one JSON object per line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import anyio
import httpx
import pytest
from fastapi import FastAPI

from app.logs import JOB_ID, REQUEST_ID, RequestIdMiddleware, configure, job_context


@pytest.fixture
def stderr() -> Iterator[io.StringIO]:
    """What configure() writes; the root logger is put back afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_json_lines_name_the_request_and_the_job(stderr: io.StringIO) -> None:
    configure(level="info", fmt="json", stream=stderr)
    token = REQUEST_ID.set("req-1")
    try:
        with job_context("j" * 32):
            logging.getLogger("app.worker").warning("job %s: %s", "x", 'quote " and\nnewline')
        logging.getLogger("app.api").info("after the job")
    finally:
        REQUEST_ID.reset(token)
    logging.getLogger("app").info("outside any request")
    first, second, third = (json.loads(line) for line in stderr.getvalue().splitlines())
    assert first["request_id"] == "req-1" and first["job_id"] == "j" * 32
    assert first["level"] == "WARNING" and first["logger"] == "app.worker"
    assert first["message"] == 'job x: quote " and\nnewline'  # one line, escaped
    assert second["job_id"] == "-" and second["request_id"] == "req-1"
    assert third["request_id"] == "-" and "time" in third


def test_text_lines_carry_the_ids_too(stderr: io.StringIO) -> None:
    configure(level="info", fmt="text", stream=stderr)
    with job_context("abc"):
        logging.getLogger("uvicorn.access").info("GET /v1/lowerings/abc 200")
    assert "[req=- job=abc]: GET /v1/lowerings/abc 200" in stderr.getvalue()
    assert stderr.getvalue().count("GET /v1/lowerings/abc") == 1  # not printed twice


def test_a_request_id_is_echoed_and_a_hostile_one_replaced() -> None:
    app = FastAPI()
    app.add_middleware(RequestIdMiddleware)

    @app.get("/v1/lowerings/{job_id}")
    def seen(job_id: str) -> dict[str, str | None]:
        return {"request_id": REQUEST_ID.get(), "job_id": JOB_ID.get()}

    async def exchange() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            given = await client.get("/v1/lowerings/abc123",
                                     headers={"X-Request-Id": "trace-7.a:b"})
            assert given.json() == {"request_id": "trace-7.a:b", "job_id": "abc123"}
            assert given.headers["x-request-id"] == "trace-7.a:b"
            for hostile in ("x" * 65, "a b", "ok\x7f", "<script>", ""):
                response = await client.get("/v1/lowerings/j1",
                                            headers={"X-Request-Id": hostile})
                minted = response.headers["x-request-id"]
                assert minted != hostile and len(minted) == 32 and minted.isalnum()
                assert response.json()["request_id"] == minted

    anyio.run(exchange)
    assert REQUEST_ID.get() is None and JOB_ID.get() is None  # nothing leaks out
