"""OpenAPI additions, generated from the models and the error registry.

FORM_SCHEMA is the submit route's multipart body (parsed by hand, so FastAPI cannot see
it): LoweringCreate's fields (``targets`` among them) plus the ``program`` file or the
``upload`` that names a ready resumable upload (one of the two). SUBMIT_RESPONSES is what that
route answers; ERROR_RESPONSES the error statuses of every other route.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from app.errors import (
    ApiErrorCode,
    BadRequest,
    Conflict,
    Forbidden,
    MethodNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    ServiceUnavailable,
    StorageFull,
    TooManyRequests,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
)
from app.schemas import ErrorBody, LoweringCreate, LoweringPublic

PROGRAM = {"type": "string", "format": "binary",
           "description": ".pt2 file written by torch.export.save (or send upload)"}
UPLOAD = {"type": "string", "pattern": "^([0-9a-f]{32}|sha256:[0-9a-fA-F]{64})$",
          "description": "instead of program: a ready resumable upload (POST /v1/uploads), "
                         "by its id or sha256:<hex>"}
RETRY_AFTER = {"Retry-After": {"description": "seconds after which a retry may find room",
                               "schema": {"type": "integer"}}}


def _form_field(schema: dict[str, Any]) -> dict[str, Any]:
    """A form has no null: an optional field (``X | None``, default None) is an X that
    may be left out."""
    branches = [branch for branch in schema.get("anyOf", ()) if branch.get("type") != "null"]
    if len(branches) == 1:
        schema = {key: value for key, value in schema.items() if key != "anyOf"} | branches[0]
    if schema.get("default", 0) is None:
        del schema["default"]
    return schema


def _form_schema() -> dict[str, Any]:
    model = LoweringCreate.model_json_schema()
    fields = {name: _form_field(field) for name, field in model["properties"].items()}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "required": list(model.get("required", ())),  # and program or upload
        "properties": {"program": PROGRAM, "upload": UPLOAD, **fields},
        "additionalProperties": False,
    }}}}}


def _errors(statuses: Iterable[int]) -> dict[int | str, dict[str, Any]]:
    """ErrorBody responses, each listing the codes its status carries."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in sorted(set(statuses)):
        codes = ", ".join(code.value for code in ApiErrorCode if code.status == status)
        responses[status] = {"model": ErrorBody, "description": f"error.code: {codes}"}
        if status == TooManyRequests.status:
            responses[status]["headers"] = RETRY_AFTER
    return responses


FORM_SCHEMA = _form_schema()

# Every error status but 405, which the router answers before any route runs.
ERROR_RESPONSES = _errors(code.status for code in ApiErrorCode
                          if code.status != MethodNotAllowed.status)

SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "with ?wait: the job succeeded in time; the lowered pt2 archive "
        "(ETag is its sha256, X-Lowering-Id the job). A job that failed or was cancelled "
        "is 422 job_failed / 409 job_cancelled with the job as error.lowering",
        "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
    },
    202: {
        "model": LoweringPublic,
        "description": "queued; with ?wait, still queued or running when the wait ran out. "
        "Location names the job. With targets: {\"lowerings\": [job, ...]}, one job per "
        "target in their order, and no Location (?wait is refused with targets)",
        "headers": {"Location": {"description": "/v1/lowerings/{id}",
                                 "schema": {"type": "string"}}},
    },
    **_errors(cls.status for cls in (
        BadRequest, Unauthorized, Forbidden, RequestTimeout, Conflict, PayloadTooLarge,
        UnsupportedMediaType, Unprocessable, TooManyRequests, ServiceError, ServiceUnavailable,
        StorageFull)),
}
