"""Errors the lowering client raises on purpose.

LoweringClientError            base class
 ├── LoweringAPIError          the server answered non-2xx; carries status, code, message, body
 └── ChecksumMismatch          downloaded bytes do not hash to the sha256 the server announced
"""

from __future__ import annotations

import json
from typing import Any

import httpx


class LoweringClientError(Exception):
    """Base class of the errors this client raises itself."""


class LoweringAPIError(LoweringClientError):
    """A non-2xx answer: ``status`` (HTTP), ``code`` and ``message`` from ``{"error": ...}``."""

    def __init__(self, status: int, code: str, message: str, body: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body


class ChecksumMismatch(LoweringClientError):
    """The artifact's bytes hash to ``actual`` but the server promised ``expected``."""

    def __init__(self, job_id: str, expected: str, actual: str) -> None:
        super().__init__(f"artifact of {job_id}: sha256 {actual} != expected {expected}")
        self.job_id = job_id
        self.expected = expected
        self.actual = actual


def error_from(response: httpx.Response) -> LoweringAPIError:
    """Build the error for a non-2xx response whose body has been read."""
    status = response.status_code
    code, message = f"http_{status}", response.reason_phrase or "error"
    try:
        body: Any = response.json()
    except ValueError:
        # A proxy's HTML page or a bare 502: keep a readable slice of the text.
        body = response.text
        return LoweringAPIError(status, code, body.strip()[:500] or message, body)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = str(body["error"].get("code") or code)
        message = str(body["error"].get("message") or message)
    elif isinstance(body, dict) and "detail" in body:
        # Starlette's own 404/405 for unknown routes use {"detail": ...}.
        detail = body["detail"]
        message = detail if isinstance(detail, str) else json.dumps(detail)
    return LoweringAPIError(status, code, message, body)


def check(response: httpx.Response) -> httpx.Response:
    """Return ``response`` if it is 2xx, else raise its LoweringAPIError."""
    if not response.is_success:
        response.read()
        raise error_from(response)
    return response
