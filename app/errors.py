"""Errors, each carrying the HTTP status it maps to.

ServiceError (500)            anything we did not foresee; the body says nothing internal
 ├── ArtifactCorrupt (500)    a stored artifact is gone or no longer matches its sha256
 ├── BadRequest (400)         malformed request: missing field, bad JSON, bad query value
 ├── NotFound (404)           unknown lowering id
 ├── RequestTimeout (408)     the upload stalled (LOWERING_UPLOAD_STALL_TIMEOUT_S)
 ├── Conflict (409)           a status transition that is not allowed
 ├── PayloadTooLarge (413)    upload over LOWERING_MAX_UPLOAD_BYTES
 ├── UnsupportedMediaType (415) not multipart, or an upload that is not a zip
 ├── Unprocessable (422)      well-formed but unacceptable: pattern, device, option
 ├── TooManyRequests (429)    the queue is full (LOWERING_MAX_QUEUED); carries Retry-After
 ├── ServiceUnavailable (503) no job can run here now (e.g. the sandbox is missing)
 └── StorageFull (507)        the data dir is out of space

JobError is not an HTTP error: it is a failed job's (code, message, detail), raised
inside a worker and stored on the job record.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base class; ``status`` and ``code`` are read by the exception handler."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.extra = extra


class ArtifactCorrupt(ServiceError):
    code = "artifact_corrupt"


class BadRequest(ServiceError):
    status = 400
    code = "bad_request"


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class RequestTimeout(ServiceError):
    status = 408
    code = "upload_stalled"


class Conflict(ServiceError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "upload_too_large"


class UnsupportedMediaType(ServiceError):
    status = 415
    code = "unsupported_media_type"


class Unprocessable(ServiceError):
    status = 422
    code = "invalid_parameter"


class TooManyRequests(ServiceError):
    status = 429
    code = "queue_full"


class ServiceUnavailable(ServiceError):
    status = 503
    code = "service_unavailable"


class StorageFull(ServiceError):
    status = 507
    code = "storage_full"


class JobError(Exception):
    """A job's failure as data: ``code`` is one of constants.ErrorCode."""

    def __init__(self, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.detail = detail or {}

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "detail": self.detail}
