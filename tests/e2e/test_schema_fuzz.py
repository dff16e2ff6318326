"""schemathesis against the service's own OpenAPI schema: bounded, and never a 5xx."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.conftest import Server

schemathesis = pytest.importorskip("schemathesis")
EXAMPLES_PER_OPERATION = 25


def test_no_server_errors_and_every_error_is_json(server: Server) -> None:
    raw = httpx.get(f"{server.url}/openapi.json").json()
    operations = [result.ok() for result in schemathesis.openapi.from_dict(raw)
                  .get_all_operations()]
    assert len(operations) >= 9, [op.label for op in operations]
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            response = case.call(base_url=server.url, timeout=30)
            where = f"{case.method} {case.formatted_path}"
            assert response.status_code < 500, (where, response.text[:500])
            if response.status_code >= 400 and case.method.upper() != "HEAD":  # HEAD: no body
                body = response.json()
                assert set(body) == {"error"}, (where, body)
                assert {"code", "message"} <= set(body["error"]), (where, body)

        check()
    assert httpx.get(f"{server.url}/healthz").status_code == 200
