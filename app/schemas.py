"""API shapes. ``LoweringPublic.from_job`` is the one place a job row becomes JSON."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, Field

from app.constants import JobStatus


class InputInfo(BaseModel):
    sha256: str
    size_bytes: int


class ArtifactInfo(BaseModel):
    sha256: str
    size_bytes: int
    url: str = Field(description="where to GET the archive")


class ErrorInfo(BaseModel):
    code: str
    message: str
    detail: dict[str, Any] = Field(default_factory=dict)


class LoweringPublic(BaseModel):
    """A lowering job as clients see it."""

    id: str
    status: JobStatus
    phase: str | None = Field(None, description="validate|load|lower|package|verify while running")
    model_name: str
    backend_id: str
    device: str
    options: dict[str, Any]
    verify: bool
    rtol: float
    atol: float
    input: InputInfo
    artifact: ArtifactInfo | None = None
    verification: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per phase")
    toolchain: dict[str, Any] | None = None
    worker_pid: int | None = None
    attempts: int = 0
    cache_hit: bool = Field(False, description="served from an identical earlier lowering")
    coalesced_with: str | None = Field(
        None, description="id of the identical job this one waited on instead of compiling")
    resources: dict[str, Any] | None = Field(
        None, description="worker cpu_s, children_cpu_s (g++), peak_rss_bytes")

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> LoweringPublic:
        artifact = None
        if job["status"] == JobStatus.SUCCEEDED.value and job["artifact_sha256"]:
            artifact = ArtifactInfo(
                sha256=job["artifact_sha256"],
                size_bytes=job["artifact_size_bytes"],
                url=f"/v1/lowerings/{job['id']}/artifact",
            )
        fields = {k: v for k, v in job.items() if k in cls.model_fields}
        fields["input"] = InputInfo(sha256=job["input_sha256"], size_bytes=job["input_size_bytes"])
        fields["artifact"] = artifact
        fields["timings"] = job["timings"] or {}
        fields["coalesced_with"] = job.get("parent_id")
        return cls(**fields)


class LoweringsPublic(BaseModel):
    """One page of jobs, newest first."""

    items: list[LoweringPublic]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page")


class ErrorBody(BaseModel):
    error: ErrorInfo
