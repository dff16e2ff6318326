"""The API error codes: one registry, one class and so one HTTP status per code."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

import app.errors as errors
from app.api.handlers import register_exception_handlers
from app.errors import (
    ApiErrorCode,
    BadRequest,
    Conflict,
    ServiceError,
    TooManyRequests,
    Unprocessable,
    error_class,
    error_code_table,
)

CLASSES = [value for value in vars(errors).values()
           if inspect.isclass(value) and issubclass(value, ServiceError)]


def test_every_code_belongs_to_exactly_one_class() -> None:
    for code in ApiErrorCode:
        owners = [cls.__name__ for cls in CLASSES if code in cls.__dict__.get("codes", ())]
        assert len(owners) == 1, (code, owners)
        assert error_class(code).__name__ == owners[0]
        assert code.status == error_class(code).status


def test_every_class_owns_its_default_code() -> None:
    for cls in CLASSES:
        assert "codes" in cls.__dict__, f"{cls.__name__} declares no codes of its own"
        assert cls.code in cls.codes and error_class(cls.code) is cls
        assert cls.status == 500 or 400 <= cls.status < 500 or cls.status in (503, 507)


def test_members_are_named_after_their_values_and_say_when() -> None:
    for code in ApiErrorCode:
        assert code.name == code.value.upper()
        assert code.meaning and code.meaning == code.meaning.strip()


def test_a_code_of_another_class_is_refused() -> None:
    with pytest.raises(ValueError, match="Unprocessable"):
        BadRequest("the program is missing", code=ApiErrorCode.MISSING_FIELD)
    with pytest.raises(ValueError):
        Conflict("x", code="no_such_code")  # type: ignore[arg-type]
    error = Unprocessable("form field 'model_name' is required", code="missing_field")  # type: ignore[arg-type]
    assert error.code is ApiErrorCode.MISSING_FIELD and error.status == 422
    assert Unprocessable("x").code is ApiErrorCode.INVALID_PARAMETER


def test_table_has_a_row_per_code() -> None:
    rows = error_code_table().splitlines()[2:]
    assert len(rows) == len(ApiErrorCode)
    assert "| 422 | `missing_field` |" in error_code_table()
    statuses = [int(row.split("|")[1]) for row in rows]
    assert statuses == sorted(statuses)


@pytest.fixture
def api() -> FastAPI:
    app = FastAPI()
    register_exception_handlers(app)

    @app.get("/full")
    async def full() -> None:
        raise TooManyRequests("64 lowerings are already queued", retry_after_s=42)

    @app.get("/missing")
    async def missing() -> None:
        raise Unprocessable("form field 'model_name' is required",
                            code=ApiErrorCode.MISSING_FIELD)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret detail")

    return app


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/full", 429, ApiErrorCode.QUEUE_FULL),
        ("GET", "/missing", 422, ApiErrorCode.MISSING_FIELD),
        ("GET", "/nowhere", 404, ApiErrorCode.NOT_FOUND),
        ("POST", "/full", 405, ApiErrorCode.METHOD_NOT_ALLOWED),
        ("GET", "/boom", 500, ApiErrorCode.INTERNAL_ERROR),
    ],
)
def test_handlers_answer_each_code_with_its_status(
    api: FastAPI, method: str, path: str, status: int, code: ApiErrorCode
) -> None:
    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path)

    response = asyncio.run(call())
    assert (response.status_code, response.json()["error"]["code"]) == (status, code)
    assert code.status == status
    if code is ApiErrorCode.QUEUE_FULL:
        assert response.headers["retry-after"] == "42"
    assert "secret" not in response.text


def test_readme_lists_exactly_the_registry() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("<!-- error-codes:")
    block = readme[readme.index("\n", start) + 1:readme.index("<!-- /error-codes -->")]
    assert block.strip() == error_code_table().strip(), (
        "README's error table is stale: paste app.errors.error_code_table() into it")
