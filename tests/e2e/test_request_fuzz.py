"""Hostile requests over real HTTP to a real server: never a 5xx, every error JSON.

The strategies (tests/strategies.py) generate the classes of input that once
crashed the API: options JSON nested past the recursion limit or holding numbers
past Python's int-to-str limit, multipart boundaries of every length and framing
that is truncated, duplicated or headless, and query parameters past SQLite's
integers. No example carries a valid program, so nothing is ever compiled.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Server
from tests.factories import leftover_uploads
from tests.strategies import (
    NOT_A_ZIP,
    RawMultipart,
    form_fields,
    job_ids,
    list_queries,
    multipart_bodies,
    submit_queries,
)

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def _check(response: httpx.Response, where: str, *, client_error: bool = False) -> None:
    """No 5xx; every error is ``{"error": {"code": str, "message": str}}``."""
    assert response.status_code < 500, (where, response.status_code, response.text[:500])
    if client_error:
        assert 400 <= response.status_code < 500, (where, response.status_code,
                                                   response.text[:300])
    if response.status_code >= 400 and response.request.method != "HEAD":  # HEAD has no body
        assert response.headers["content-type"].startswith("application/json"), where
        body = response.json()
        assert set(body) == {"error"}, (where, body)
        assert isinstance(body["error"]["code"], str) and body["error"]["code"], (where, body)
        assert isinstance(body["error"]["message"], str), (where, body)


def _chunked(body: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start:start + size]


@settings(FUZZ, max_examples=300)
@given(fields=form_fields)
def test_form_fields(http: httpx.Client, fields: dict[str, str]) -> None:
    response = http.post("/v1/lowerings", data=fields,
                         files={"program": ("p.pt2", NOT_A_ZIP, "application/octet-stream")})
    _check(response, f"fields {fields!r:.300}", client_error=True)


@FUZZ
@given(raw=multipart_bodies(), chunk=st.one_of(st.none(), st.integers(1, 4096)))
def test_multipart_framing(http: httpx.Client, raw: RawMultipart, chunk: int | None) -> None:
    # Sent whole (Content-Length) or as a chunked transfer in pieces of ``chunk`` bytes.
    content: Any = raw.body if chunk is None else _chunked(raw.body, chunk)
    response = http.post("/v1/lowerings", content=content,
                         headers={b"content-type": raw.content_type})
    _check(response, repr(raw), client_error=True)


@settings(FUZZ, max_examples=300)
@given(params=list_queries)
def test_list_query_parameters(http: httpx.Client, params: dict[str, str]) -> None:
    _check(http.get("/v1/lowerings", params=params), f"GET ?{params!r:.300}")


@FUZZ
@given(params=submit_queries)
def test_submit_query_parameters(http: httpx.Client, params: dict[str, str]) -> None:
    # No body: a query that passes validation still ends in 415, never a queued job.
    response = http.post("/v1/lowerings", params=params)
    _check(response, f"POST ?{params!r:.300}", client_error=True)


@FUZZ
@given(job_id=job_ids, route=st.sampled_from([("GET", ""), ("GET", "/artifact"),
                                              ("HEAD", "/artifact"), ("GET", "/log"),
                                              ("POST", "/cancel"), ("DELETE", "")]))
def test_job_ids(http: httpx.Client, job_id: str, route: tuple[str, str]) -> None:
    method, suffix = route
    path = f"/v1/lowerings/{quote(job_id, safe='')}{suffix}"
    response = http.request(method, path)
    if "/" in job_id and response.is_redirect:  # %2F decodes to a slash: another route
        return
    _check(response, f"{method} {path[:300]}", client_error=True)


def test_nothing_was_queued_or_left_behind(http: httpx.Client, server: Server) -> None:
    assert http.get("/v1/lowerings", params={"status": "queued"}).json()["items"] == []
    assert leftover_uploads(server.data_dir) == []
    assert http.get("/healthz").status_code == 200
