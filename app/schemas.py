"""API shapes. ``LoweringPublic.from_job`` is the one place a job row becomes JSON."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from app.constants import DEVICE_PATTERN, NAME_PATTERN, ErrorCode, JobStatus, Phase
from app.errors import ServiceError
from app.options import parse_options


class InputInfo(BaseModel):
    sha256: str
    size_bytes: int


class ArtifactInfo(BaseModel):
    sha256: str
    size_bytes: int
    url: str = Field(description="where to GET the archive")
    expired_at: dt.datetime | None = Field(None, description=(
        "when retention removed the archive (url then answers 410 artifact_expired)"))
    expired_reason: str | None = Field(None, description=(
        "ttl: unused for LOWERING_ARTIFACT_TTL_S; budget: the least recently used when "
        "storage was over LOWERING_STORAGE_BUDGET_BYTES"))


class ErrorInfo(BaseModel):
    code: str
    message: str
    detail: dict[str, Any] = Field(default_factory=dict)


class _Report(BaseModel):
    """Verification reports are an allowlist: unknown keys (such as the raw error values
    records from before this schema held) are dropped, and absent ones are left out."""

    model_config = ConfigDict(extra="ignore")


def _optional(description: str | None = None) -> Any:
    return Field(None, description=description, exclude_if=lambda value: value is None)


class TensorInfo(_Report):
    shape: list[int] | None = _optional()
    dtype: str | None = _optional()
    type: str | None = _optional("set instead of shape/dtype for a non-tensor")


class VerificationOutput(_Report):
    """One flat output of one case. Never a value: the compiled code's outputs may hold
    memory it had no business reading."""

    index: int = Field(description="position in the flat list of the program's outputs")
    passed: bool
    expected: TensorInfo | None = _optional("shape/dtype of the reference output")
    got: TensorInfo | None = _optional("shape/dtype the compiled runner returned")
    error_magnitude: str | None = _optional(
        'power-of-ten bucket of the max abs error, e.g. "1e-4..1e-3"; "0", "<1e-12", '
        '">=1e3" or "non-finite"; absent when not compared')
    problem: str | None = _optional("why it was not compared: shape, dtype, not a tensor, ...")


class VerificationCase(_Report):
    name: str = Field(description='"example", or SYMBOL=SIZE for a size the example did not use')
    sizes: dict[str, int] = Field(default_factory=dict, description="dynamic dim symbol sizes")
    input_shapes: list[list[int]] = Field(default_factory=list)
    passed: bool
    error_magnitude: str | None = _optional("worst bucket over this case's outputs")
    mismatched_outputs: list[int] = Field(default_factory=list,
                                          description="flat indices of the failed outputs")
    outputs: list[VerificationOutput] = Field(default_factory=list)
    error: str | None = _optional("the runner raised, or returned the wrong number of outputs "
                                  "(numbers in the runner's message are redacted)")


class Verification(_Report):
    """The archive's runner against the original program at the example and other sizes."""

    passed: bool
    rtol: float | None = _optional()
    atol: float | None = _optional()
    error_magnitude: str | None = _optional(
        "worst power-of-ten bucket of the max abs error over all cases")
    cases: list[VerificationCase] = Field(default_factory=list)


class Profile(BaseModel):
    """The verified runner against the program run eagerly, on the example inputs, on the
    job's device, in its sandbox: medians after a warm-up."""

    eager_ms: float
    compiled_ms: float
    speedup: float | None = Field(description="eager_ms / compiled_ms")
    runs: int = Field(description="timed calls per side")


class LoweringPublic(BaseModel):
    """A lowering job as clients see it."""

    id: str
    status: JobStatus
    phase: Phase | None = Field(None, description=(
        "the step a running job is in; waiting_for_host: queued, and no live worker host "
        "serves its target"))
    model_name: str
    backend_id: str
    device: str
    options: dict[str, Any]
    verify: bool
    rtol: float
    atol: float
    input: InputInfo
    artifact: ArtifactInfo | None = None
    verification: Verification | None = None
    error: ErrorInfo | None = None
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per phase")
    toolchain: dict[str, Any] | None = Field(None, description=(
        "what builds it: the toolchain of the host (class) it is sent to, then the one that "
        "built it"))
    worker_pid: int | None = None
    worker: str | None = Field(
        None, description="node name of the worker host that ran (or runs) it, "
        "e.g. local@<hostname> or host-a@<hostname>")
    attempts: int = 0
    cache_hit: bool = Field(False, description="served from an identical earlier lowering")
    coalesced_with: str | None = Field(
        None, description="id of the identical job this one waited on instead of compiling")
    code_reused_from: str | None = Field(
        None, description="id of the earlier job whose compiled code this one packaged "
        "instead of compiling: the same program structure with other weight values; "
        "the archive is still verified in full with this job's weights")
    resources: dict[str, Any] | None = Field(
        None, description="worker cpu_s, children_cpu_s (g++), peak_rss_bytes")
    profile: Profile | None = Field(
        None, description="does lowering pay: eager vs compiled time (verified jobs)")
    log_expired_at: dt.datetime | None = Field(
        None, description="when retention removed the job's log (LOWERING_LOG_TTL_S)")

    @classmethod
    def from_job(cls, job: Mapping[str, Any]) -> LoweringPublic:
        artifact = None
        if job["status"] == JobStatus.SUCCEEDED.value and job["artifact_sha256"]:
            artifact = ArtifactInfo(
                sha256=job["artifact_sha256"],
                size_bytes=job["artifact_size_bytes"],
                url=f"/v1/lowerings/{job['id']}/artifact",
                expired_at=job.get("artifact_expired_at"),
                expired_reason=job.get("artifact_expired_reason"),
            )
        fields = {k: v for k, v in job.items() if k in cls.model_fields}
        fields["input"] = InputInfo(sha256=job["input_sha256"], size_bytes=job["input_size_bytes"])
        fields["artifact"] = artifact
        fields["timings"] = job["timings"] or {}
        fields["coalesced_with"] = job.get("parent_id")
        fields["log_expired_at"] = job.get("log_removed_at")
        error = job.get("error")
        if error and error.get("code") == ErrorCode.VERIFICATION_FAILED:
            fields["error"] = {**error, "detail": _verification_detail(error.get("detail"))}
        return cls(**fields)


def _verification_detail(detail: Any) -> dict[str, Any]:
    """A verification_failed detail goes out through the Verification allowlist."""
    if not isinstance(detail, dict) or "passed" not in detail:
        # Verification itself raised: the detail names the exception type and phase.
        return {k: v for k, v in (detail or {}).items() if k in ("exception_type", "phase")}
    try:
        return Verification.model_validate(detail).model_dump(mode="json")
    except ValidationError:
        return {}


class LoweringsPublic(BaseModel):
    """One page of jobs, newest first."""

    items: list[LoweringPublic]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page")


class ApiError(BaseModel):
    code: str = Field(description="one of the codes listed for this status")
    message: str = Field(description="what went wrong and what to do about it")
    lowering: LoweringPublic | None = Field(
        None, description="the job, when a ?wait= submit saw it fail (job_failed) or be "
        "cancelled (job_cancelled)")


class ErrorBody(BaseModel):
    error: ApiError


_BOOLS = {"true": True, "1": True, "yes": True, "on": True,
          "false": False, "0": False, "no": False, "off": False}
# A blank optional field means its default (an HTML form sends every input, empty or not).
_BLANK_IS_DEFAULT = ("options", "verify", "rtol", "atol", "callback_url", "targets")
MAX_TARGETS = 8
"""The most targets one submit may name (``targets``)."""
_TARGET_KEYS = frozenset({"device", "options"})


def _form_bool(value: Any) -> Any:
    # Only these spellings: pydantic's own lax bool would also take t/f/y/n.
    return _BOOLS.get(value.strip().lower(), value) if isinstance(value, str) else value


def _form_device(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _form_options(value: Any) -> Any:
    """The JSON text (or a dict, from Python) checked by app.options; its refusal keeps its
    ApiErrorCode as the error type."""
    try:
        raw = value if isinstance(value, str) else json.dumps(value, allow_nan=False)
        return parse_options(raw)
    except ServiceError as exc:
        raise PydanticCustomError(exc.code.value, "{message}", {"message": exc.message}) from None
    except (TypeError, ValueError):
        raise PydanticCustomError("invalid_parameter", "options must be a JSON object") from None


def _form_targets(value: Any) -> Any:
    """The JSON text (or a list, from Python): 1 to MAX_TARGETS objects of ``device`` and/or
    ``options``. Their values are checked as the form's own fields are (api/submit.py)."""
    def refuse(message: str) -> PydanticCustomError:
        return PydanticCustomError("invalid_parameter", "{message}", {"message": message})

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise refuse("targets must be a JSON array of objects") from None
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TARGETS:
        raise refuse(f"targets must be a JSON array of 1 to {MAX_TARGETS} objects")
    for index, target in enumerate(value):
        if not isinstance(target, dict) or not target or set(target) - _TARGET_KEYS:
            raise refuse(f"targets[{index}] must be an object with 'device' and/or 'options'")
        if not isinstance(target.get("options", {}), dict):
            raise refuse(f"targets[{index}].options must be a JSON object")
    return value


def _form_callback(value: Any) -> Any:
    """An http(s) URL without credentials (app.webhooks.targets); where it points is
    checked at submit, where the settings say whether private targets are allowed."""
    from app.webhooks.targets import TargetRefused, check_url

    if isinstance(value, str):
        value = value.strip()
        try:
            check_url(value)
        except TargetRefused as exc:
            raise PydanticCustomError(exc.code.value, "callback_url: {message}",
                                      {"message": exc.message}) from None
    return value


class LoweringCreate(BaseModel):
    """The submit form's text fields (the ``program`` file travels beside them).

    The one statement of the form: api/submit.py validates with it, api/openapi.py
    publishes its schema, and the client reads its field names and defaults.

    :param model_name: names the lowered model (and the archive's file name).
    :param backend_id: the lowering backend; ``aoti`` (AOTInductor).
    :param device: ``cpu``, ``cuda`` or ``cuda:N``; trimmed and lower-cased.
    :param options: a JSON object of AOTInductor settings from ``/v1/info`` options.
    :param verify: compare the archive's runner with the original program.
    :param rtol: relative tolerance of that comparison; None: the service's default.
    :param atol: absolute tolerance; None: the service's default.
    :param callback_url: told of the job's final status.
    :param targets: several targets, one job each, sharing the upload: each object sets
        ``device`` and/or ``options`` (merged over ``options``); None: the one target above.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field(pattern=NAME_PATTERN, description="names the lowered model")
    backend_id: str = Field("aoti", pattern=NAME_PATTERN, description="the lowering backend")
    device: Annotated[str, BeforeValidator(_form_device)] = Field(
        "cpu", pattern=DEVICE_PATTERN, description="cpu, cuda or cuda:N")
    options: Annotated[dict[str, Any], BeforeValidator(_form_options), WithJsonSchema({
        "type": "string", "description": "a JSON object of AOTInductor settings; the keys "
        "and values allowed are listed by /v1/info options"})] = Field(default_factory=dict)
    verify: Annotated[bool, BeforeValidator(_form_bool)] = Field(
        True, strict=True, description="compare the lowered program with the original; "
        "true/false, 1/0, yes/no or on/off")
    rtol: float | None = Field(None, ge=0, allow_inf_nan=False, description=(
        "relative tolerance of verification; default: /v1/info verification.default_rtol"))
    atol: float | None = Field(None, ge=0, allow_inf_nan=False, description=(
        "absolute tolerance of verification; default: /v1/info verification.default_atol"))

    callback_url: Annotated[str | None, BeforeValidator(_form_callback)] = Field(
        None, max_length=2048, description="an http(s) URL told of the job's final status "
        "like a webhook (the same signed body; see /v1/webhooks); optional")
    targets: Annotated[list[dict[str, Any]] | None, BeforeValidator(_form_targets),
                       WithJsonSchema({"type": "string", "description": (
                           f"a JSON array of 1 to {MAX_TARGETS} objects, each setting device "
                           "and/or options (merged over options): one job per target, all "
                           "sharing the upload; answered 202 with {\"lowerings\": [...]}")})] = (
        Field(None, description="several targets; optional"))

    @model_validator(mode="before")
    @classmethod
    def _blank_is_default(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        return {key: value for key, value in data.items() if not (
            key in _BLANK_IS_DEFAULT and isinstance(value, str) and not value.strip())}

    def as_fields(self) -> dict[str, Any]:
        """The job record's fields this form sets (callback_url only when given; targets
        are resolved into one form each by api/submit.py)."""
        return self.model_dump(exclude={"targets"} | (
            {"callback_url"} if self.callback_url is None else set()))


# -- resumable uploads (/v1/uploads) ----------------------------------------------------

SHA256_PATTERN = r"^[0-9a-f]{64}$"


class UploadCreate(BaseModel):
    """POST /v1/uploads: announce a program to send in parts.

    :param size_bytes: its exact size.
    :param sha256: its sha256 (lowercase hex); recommended: an upload of the same bytes
        already gated is answered at once (nothing is sent again), and the assembled bytes
        are checked against it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    size_bytes: int = Field(gt=0, le=2**62, description="the program's exact size")
    sha256: str | None = Field(None, pattern=SHA256_PATTERN,
                               description="the program's sha256, lowercase hex")


class PartTargetPublic(BaseModel):
    """Where to send one part: PUT its bytes (exactly ``part_size_bytes``, the last part
    the rest) to ``url``: an absolute URL (an object store's presigned one) or a path of
    this API."""

    number: int
    url: str
    method: str = "PUT"


class UploadPublic(BaseModel):
    """A resumable upload as the API shows it."""

    id: str
    status: str = Field(description="receiving, assembling, ready or failed")
    size_bytes: int
    sha256: str | None = Field(description="declared at create; once ready, of the bytes")
    part_size_bytes: int
    part_count: int
    parts_received: list[int] = Field(
        default_factory=list, description="numbers of the parts received (while receiving)")
    parts: list[PartTargetPublic] = Field(
        default_factory=list, description="where to send the parts not yet received "
        "(while receiving); presigned URLs are fresh at every GET")
    error: ErrorInfo | None = None
    created_at: dt.datetime
    completed_at: dt.datetime | None = None
    expires_at: dt.datetime = Field(description="removed after this unless used again")


# -- webhooks (/v1/webhooks) ------------------------------------------------------------


class WebhookCreate(BaseModel):
    """POST /v1/webhooks: where to send which events.

    :param url: an http(s) URL; private and loopback targets are refused unless
        LOWERING_WEBHOOK_ALLOW_PRIVATE=true.
    :param events: any of lowering.succeeded, lowering.failed, lowering.cancelled.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(max_length=2048, description="where deliveries are POSTed")
    events: list[str] = Field(min_length=1, max_length=8, description=(
        "lowering.succeeded, lowering.failed and/or lowering.cancelled"))


class WebhookPublic(BaseModel):
    """A webhook endpoint; its secret is shown once, in the answer to its creation."""

    id: str
    url: str
    events: list[str]
    enabled: bool
    disabled_reason: str | None = Field(None, description="why deliveries stopped (a 410, "
                                        "or a delivery that failed through every retry)")
    created_at: dt.datetime
    disabled_at: dt.datetime | None = None


class WebhookCreated(WebhookPublic):
    secret: str = Field(description="whsec_...: verifies the webhook-signature of every "
                        "delivery (Standard Webhooks); shown only here")


class WebhooksPublic(BaseModel):
    items: list[WebhookPublic]


class DeliveryPublic(BaseModel):
    """One event sent (or being sent) to an endpoint: the delivery log's row."""

    id: str = Field(description="the webhook-id header; the same on every retry")
    event: str
    job_id: str
    status: str = Field(description="pending, delivered or failed")
    attempts: int
    last_status_code: int | None = Field(None, description="the receiver's last HTTP status")
    last_error: str | None = None
    created_at: dt.datetime
    next_attempt_at: dt.datetime | None = Field(None, description="when a pending one is due")
    last_attempt_at: dt.datetime | None = None
    delivered_at: dt.datetime | None = None


class DeliveriesPublic(BaseModel):
    """An endpoint's deliveries, newest first."""

    items: list[DeliveryPublic]
