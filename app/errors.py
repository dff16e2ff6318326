"""Errors, each carrying the HTTP status it maps to and the API error codes it may carry.

ServiceError (500)              anything we did not foresee; the body says nothing internal
 ├── ArtifactCorrupt (500)      a stored artifact is gone or no longer matches its sha256
 ├── BadRequest (400)           a body that cannot be read as a form
 ├── Unauthorized (401)         no API key, or one that is malformed, unknown or revoked
 ├── Forbidden (403)            the API key lacks the scope the route needs
 ├── NotFound (404)             unknown lowering id, upload id or route
 ├── MethodNotAllowed (405)     a route answered for another method (raised by the router)
 ├── RequestTimeout (408)       the upload stalled (LOWERING_UPLOAD_STALL_TIMEOUT_S)
 ├── Conflict (409)             a status transition that is not allowed (a job's, an upload's)
 ├── PayloadTooLarge (413)      upload over LOWERING_MAX_UPLOAD_BYTES, archive over its limits
 ├── UnsupportedMediaType (415) not multipart, or an upload that is not a pt2 zip
 ├── Unprocessable (422)        a readable form with a missing, unknown or bad field; an
 │                              upload the gate refuses
 ├── TooManyRequests (429)      the queue is full (LOWERING_MAX_QUEUED), too many open uploads,
 │                              a tenant over its quota;
 │                              carries Retry-After
 ├── ServiceUnavailable (503)   no job can run here now (sandbox missing, database locked)
 │    └── ObjectStoreUnavailable  the S3 object store failed or cannot be reached
 └── StorageFull (507)          the data dir is out of space

Every ``error.code`` the API answers with is an :class:`ApiErrorCode`, and each code
belongs to exactly one class above, so each code has one HTTP status
(``ApiErrorCode.X.status``).

JobError is not an HTTP error: it is a failed job's (code, message, detail), raised
inside a worker and stored on the job record; its codes are ``constants.ErrorCode``.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar


class ApiErrorCode(enum.StrEnum):
    """Every ``error.code`` of an error response; each member says when it is used."""

    meaning: str

    def __new__(cls, value: str, meaning: str = "") -> ApiErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        return member

    @property
    def status(self) -> int:
        """The one HTTP status this code is answered with."""
        return error_class(self).status

    # 500
    INTERNAL_ERROR = "internal_error", "anything not foreseen; the server log has the details"
    ARTIFACT_CORRUPT = "artifact_corrupt", (
        "the stored artifact is missing or no longer matches its sha256 and is not served; "
        "submit again with ?cache=bypass")
    # 400
    BAD_REQUEST = "bad_request", (
        "the form cannot be read: a file in a field other than `program`, a second file, "
        "more than 32 fields, a field that is not UTF-8")
    MALFORMED_MULTIPART = "malformed_multipart", (
        "the multipart framing is broken: bad boundary, a part without a form-data name, "
        "a truncated body")
    DUPLICATE_FIELD = "duplicate_field", "a form field is sent more than once"
    CLIENT_DISCONNECTED = "client_disconnected", (
        "the client went away mid-request (nobody reads this answer)")
    # 401, 403
    UNAUTHORIZED = "unauthorized", (
        "LOWERING_AUTH=required and the request has no `Authorization: Bearer <key>`, or "
        "its key is malformed, unknown or revoked")
    FORBIDDEN_SCOPE = "forbidden_scope", (
        "the API key lacks the scope this route needs (read, submit or admin); the message "
        "names it")
    # 404, 405, 408
    NOT_FOUND = "not_found", "no lowering has this id, or no route has this path"
    UNKNOWN_UPLOAD = "unknown_upload", (
        "no resumable upload has this id or sha256 (never created, expired or removed)")
    UNKNOWN_WEBHOOK = "unknown_webhook", "no webhook endpoint has this id (never made, or deleted)"
    METHOD_NOT_ALLOWED = "method_not_allowed", (
        "the path exists but not for this method; the Allow header lists those that do")
    UPLOAD_STALLED = "upload_stalled", (
        "the upload sent nothing for LOWERING_UPLOAD_STALL_TIMEOUT_S and was dropped")
    # 409
    CONFLICT = "conflict", "the job's status does not allow this"
    ARTIFACT_NOT_READY = "artifact_not_ready", (
        "the artifact is asked for before the job has succeeded")
    JOB_CANCELLED = "job_cancelled", (
        "?wait= saw the job cancelled; error.lowering is the job")
    NOT_CANCELLABLE = "not_cancellable", "cancel is asked of a job that has already ended"
    JOB_ACTIVE = "job_active", "delete is asked of a queued or running job; cancel it first"
    PARTS_MISSING = "parts_missing", (
        "complete is asked of a resumable upload with parts not yet received; the message "
        "lists them: send them and complete again")
    UPLOAD_CLOSED = "upload_closed", (
        "a part or complete is sent to a resumable upload that is no longer receiving "
        "(being completed, ready or failed)")
    UPLOAD_NOT_READY = "upload_not_ready", (
        "a submit names a resumable upload that is not ready (not completed, or refused)")
    # 410
    ARTIFACT_EXPIRED = "artifact_expired", (
        "the job succeeded, but retention removed its archive (unused for "
        "LOWERING_ARTIFACT_TTL_S, or evicted for LOWERING_STORAGE_BUDGET_BYTES); the message "
        "says which and when: submit the program again to build it anew")
    LOG_EXPIRED = "log_expired", (
        "retention removed the job's log, LOWERING_LOG_TTL_S after the job ended")
    # 413
    UPLOAD_TOO_LARGE = "upload_too_large", (
        "the upload is over LOWERING_MAX_UPLOAD_BYTES, or a form field over 64 KiB")
    PART_TOO_LARGE = "part_too_large", (
        "a part of a resumable upload is longer than the part size its upload announced")
    ARCHIVE_TOO_LARGE = "archive_too_large", (
        "the archive is over a limit of /v1/info limits.archive: members, member or total "
        "uncompressed size, compression ratio, JSON values")
    # 415
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type", (
        "the body is of a type this route does not read")
    NOT_MULTIPART = "not_multipart", "the submit body is not multipart/form-data with a boundary"
    NOT_A_PT2_ARCHIVE = "not_a_pt2_archive", (
        "`program` is not the zip torch.export.save writes, or one of its members is corrupt")
    # 422: the form's fields
    INVALID_PARAMETER = "invalid_parameter", (
        "a field or query parameter has a bad value: verify, rtol, atol, options as a whole "
        "(not a JSON object within its limits), ?wait, ?limit, ?cursor, ...")
    JOB_FAILED = "job_failed", (
        "?wait= saw the job fail; error.lowering is the job, its error says why")
    MISSING_FIELD = "missing_field", (
        "a required form field is absent: model_name, or the program file")
    UNKNOWN_FIELD = "unknown_field", "the form has a field the service does not know"
    INVALID_NAME = "invalid_name", "model_name or backend_id does not match its pattern"
    INVALID_DEVICE = "invalid_device", "device is not cpu, cuda or cuda:N"
    DEVICE_UNAVAILABLE = "device_unavailable", "this host has no such device"
    UNKNOWN_OPTION = "unknown_option", "options names a setting outside /v1/info options"
    INVALID_OPTION = "invalid_option", (
        "an allowed option has a value of the wrong type, outside its choices or its pattern")
    INVALID_PART = "invalid_part", (
        "a part number outside 1..parts, or a part whose size is not the one announced "
        "(every part is part_size_bytes but the last, which is the rest)")
    CHECKSUM_MISMATCH = "checksum_mismatch", (
        "the assembled upload's sha256 or size is not the one declared at create; nothing "
        "was kept: start a new upload")
    INVALID_WEBHOOK_URL = "invalid_webhook_url", (
        "a webhook url or callback_url is not an absolute http(s) URL with a host, without "
        "credentials, of at most 2048 characters")
    WEBHOOK_TARGET_REFUSED = "webhook_target_refused", (
        "a webhook url or callback_url does not resolve, or resolves to a private, loopback, "
        "link-local, multicast, reserved or unspecified address (allowed only with "
        "LOWERING_WEBHOOK_ALLOW_PRIVATE=true)")
    UNKNOWN_EVENT = "unknown_event", (
        "events is empty or names an event other than lowering.succeeded, lowering.failed "
        "and lowering.cancelled")
    CALLBACKS_DISABLED = "callbacks_disabled", (
        "a submit names a callback_url, but the service has no LOWERING_WEBHOOK_CALLBACK_SECRET "
        "to sign callbacks with; register a webhook (POST /v1/webhooks) instead")
    # 422: the upload gate
    UNSAFE_MEMBER_NAME = "unsafe_member_name", (
        "an archive member's name is absolute, climbs with .., has a backslash, colon or "
        "control character, or appears twice")
    UNSUPPORTED_LAYOUT = "unsupported_layout", (
        "the archive's folders and files are not those of a torch.export program")
    MISSING_EXAMPLE_INPUTS = "missing_example_inputs", (
        "the program was exported without the example inputs that verification runs")
    UNSAFE_PICKLE = "unsafe_pickle", (
        "a pickle in the archive names a global or opcode outside the allowlist")
    UNSAFE_GRAPH = "unsafe_graph", (
        "the serialized graph holds an operator, expression or value outside the allowlist")
    UPLOAD_TOO_COMPLEX = "upload_too_complex", (
        "checking the upload needed more memory, CPU or time than the gate allows")
    # 429, 503, 507
    QUEUE_FULL = "queue_full", (
        "LOWERING_MAX_QUEUED lowerings already wait; retry after Retry-After seconds")
    TOO_MANY_UPLOADS = "too_many_uploads", (
        "LOWERING_MAX_OPEN_UPLOADS resumable uploads are already open; complete or let "
        "some expire, retry after Retry-After seconds")
    TENANT_QUOTA = "tenant_quota", (
        "the key's tenant is over its quota of active (queued and running) lowerings "
        "(LOWERING_TENANT_MAX_ACTIVE_JOBS) or of stored bytes "
        "(LOWERING_TENANT_MAX_STORAGE_BYTES); retry after Retry-After seconds, or delete "
        "finished lowerings")
    SERVICE_UNAVAILABLE = "service_unavailable", "the service cannot take requests now"
    SANDBOX_UNAVAILABLE = "sandbox_unavailable", (
        "no lowering can run here: the sandbox or the workers are missing (see /readyz)")
    DATABASE_BUSY = "database_busy", (
        "the job database stayed locked for a minute; retry after Retry-After seconds")
    OBJECT_STORE_UNAVAILABLE = "object_store_unavailable", (
        "the S3 object store (LOWERING_STORAGE=s3) cannot be reached or refused the request "
        "(endpoint down, access denied, missing bucket, throttling); retry after Retry-After "
        "seconds")
    STORAGE_FULL = "storage_full", "the data dir or the job database is out of disk space"


_CLASS_OF: dict[ApiErrorCode, type[ServiceError]] = {}


def error_class(code: ApiErrorCode) -> type[ServiceError]:
    """The one ServiceError class that carries ``code``."""
    return _CLASS_OF[code]


class ServiceError(Exception):
    """Base class; ``status`` and ``code`` are read by the exception handler.

    :param message: what the caller reads; for a 4xx, exactly what to fix.
    :param code: one of the class's ``codes``; its default ``code`` if left out.

    A subclass that sets ``codes`` owns them: no other class may list them.
    """

    status: ClassVar[int] = 500
    code: ApiErrorCode = ApiErrorCode.INTERNAL_ERROR
    codes: ClassVar[frozenset[ApiErrorCode]] = frozenset({ApiErrorCode.INTERNAL_ERROR})

    def __init__(self, message: str, *, code: ApiErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            code = ApiErrorCode(code)
            if code not in self.codes:
                raise ValueError(f"{type(self).__name__} ({self.status}) cannot carry the code "
                                 f"{code.value!r}; {error_class(code).__name__} does")
            self.code = code

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "codes" in cls.__dict__:
            _register(cls)


def _register(cls: type[ServiceError]) -> None:
    assert cls.code in cls.codes, f"{cls.__name__}.code must be one of its codes"
    for code in cls.codes:
        owner = _CLASS_OF.setdefault(code, cls)
        assert owner is cls, f"{code.value!r} belongs to {owner.__name__}, not {cls.__name__}"


_register(ServiceError)


class ArtifactCorrupt(ServiceError):
    code = ApiErrorCode.ARTIFACT_CORRUPT
    codes = frozenset({ApiErrorCode.ARTIFACT_CORRUPT})


class BadRequest(ServiceError):
    status = 400
    code = ApiErrorCode.BAD_REQUEST
    codes = frozenset({ApiErrorCode.BAD_REQUEST, ApiErrorCode.MALFORMED_MULTIPART,
                       ApiErrorCode.DUPLICATE_FIELD, ApiErrorCode.CLIENT_DISCONNECTED})


class Unauthorized(ServiceError):
    """Answered with ``WWW-Authenticate: Bearer``."""

    status = 401
    code = ApiErrorCode.UNAUTHORIZED
    codes = frozenset({ApiErrorCode.UNAUTHORIZED})


class Forbidden(ServiceError):
    status = 403
    code = ApiErrorCode.FORBIDDEN_SCOPE
    codes = frozenset({ApiErrorCode.FORBIDDEN_SCOPE})


class NotFound(ServiceError):
    status = 404
    code = ApiErrorCode.NOT_FOUND
    codes = frozenset({ApiErrorCode.NOT_FOUND, ApiErrorCode.UNKNOWN_UPLOAD,
                       ApiErrorCode.UNKNOWN_WEBHOOK})


class MethodNotAllowed(ServiceError):
    status = 405
    code = ApiErrorCode.METHOD_NOT_ALLOWED
    codes = frozenset({ApiErrorCode.METHOD_NOT_ALLOWED})


class RequestTimeout(ServiceError):
    status = 408
    code = ApiErrorCode.UPLOAD_STALLED
    codes = frozenset({ApiErrorCode.UPLOAD_STALLED})


class Conflict(ServiceError):
    status = 409
    code = ApiErrorCode.CONFLICT
    codes = frozenset({ApiErrorCode.CONFLICT, ApiErrorCode.ARTIFACT_NOT_READY,
                       ApiErrorCode.NOT_CANCELLABLE, ApiErrorCode.JOB_ACTIVE,
                       ApiErrorCode.JOB_CANCELLED, ApiErrorCode.PARTS_MISSING,
                       ApiErrorCode.UPLOAD_CLOSED, ApiErrorCode.UPLOAD_NOT_READY})


class Gone(ServiceError):
    status = 410
    code = ApiErrorCode.ARTIFACT_EXPIRED
    codes = frozenset({ApiErrorCode.ARTIFACT_EXPIRED, ApiErrorCode.LOG_EXPIRED})


class PayloadTooLarge(ServiceError):
    status = 413
    code = ApiErrorCode.UPLOAD_TOO_LARGE
    codes = frozenset({ApiErrorCode.UPLOAD_TOO_LARGE, ApiErrorCode.ARCHIVE_TOO_LARGE,
                       ApiErrorCode.PART_TOO_LARGE})


class UnsupportedMediaType(ServiceError):
    status = 415
    code = ApiErrorCode.UNSUPPORTED_MEDIA_TYPE
    codes = frozenset({ApiErrorCode.UNSUPPORTED_MEDIA_TYPE, ApiErrorCode.NOT_MULTIPART,
                       ApiErrorCode.NOT_A_PT2_ARCHIVE})


class Unprocessable(ServiceError):
    status = 422
    code = ApiErrorCode.INVALID_PARAMETER
    codes = frozenset({
        ApiErrorCode.INVALID_PARAMETER, ApiErrorCode.MISSING_FIELD, ApiErrorCode.UNKNOWN_FIELD,
        ApiErrorCode.INVALID_NAME, ApiErrorCode.INVALID_DEVICE, ApiErrorCode.DEVICE_UNAVAILABLE,
        ApiErrorCode.UNKNOWN_OPTION, ApiErrorCode.INVALID_OPTION,
        ApiErrorCode.UNSAFE_MEMBER_NAME, ApiErrorCode.UNSUPPORTED_LAYOUT,
        ApiErrorCode.MISSING_EXAMPLE_INPUTS, ApiErrorCode.UNSAFE_PICKLE, ApiErrorCode.UNSAFE_GRAPH,
        ApiErrorCode.UPLOAD_TOO_COMPLEX, ApiErrorCode.JOB_FAILED, ApiErrorCode.INVALID_PART,
        ApiErrorCode.CHECKSUM_MISMATCH, ApiErrorCode.INVALID_WEBHOOK_URL,
        ApiErrorCode.WEBHOOK_TARGET_REFUSED, ApiErrorCode.UNKNOWN_EVENT,
        ApiErrorCode.CALLBACKS_DISABLED,
    })


class TooManyRequests(ServiceError):
    """The queue is full.

    :param retry_after_s: sent as the Retry-After header: when a retry may find room.
    """

    status = 429
    code = ApiErrorCode.QUEUE_FULL
    codes = frozenset({ApiErrorCode.QUEUE_FULL, ApiErrorCode.TOO_MANY_UPLOADS,
                       ApiErrorCode.TENANT_QUOTA})

    def __init__(self, message: str, *, retry_after_s: int,
                 code: ApiErrorCode | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class ServiceUnavailable(ServiceError):
    """Nothing can be done here now.

    :param retry_after_s: sent as the Retry-After header when the wait is known.
    """

    status = 503
    code = ApiErrorCode.SERVICE_UNAVAILABLE
    codes = frozenset({ApiErrorCode.SERVICE_UNAVAILABLE, ApiErrorCode.SANDBOX_UNAVAILABLE,
                       ApiErrorCode.DATABASE_BUSY})

    def __init__(self, message: str, *, code: ApiErrorCode | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class ObjectStoreUnavailable(ServiceUnavailable):
    """The object store failed: unreachable, access denied, no bucket, throttled.

    :param retry_after_s: sent as the Retry-After header.
    """

    code = ApiErrorCode.OBJECT_STORE_UNAVAILABLE
    codes = frozenset({ApiErrorCode.OBJECT_STORE_UNAVAILABLE})

    def __init__(self, message: str, *, retry_after_s: int = 30) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


class StorageFull(ServiceError):
    status = 507
    code = ApiErrorCode.STORAGE_FULL
    codes = frozenset({ApiErrorCode.STORAGE_FULL})


def error_code_table() -> str:
    """The codes as a Markdown table (status, code, when), for the README."""
    rows = ["| status | code | when |", "| --- | --- | --- |"]
    rows += [f"| {code.status} | `{code.value}` | {code.meaning} |"
             for code in sorted(ApiErrorCode, key=lambda code: code.status)]
    return "\n".join(rows)


class JobError(Exception):
    """A job's failure as data: ``code`` is one of constants.ErrorCode."""

    def __init__(self, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.detail = detail or {}

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "detail": self.detail}
