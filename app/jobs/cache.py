"""The content-addressed result cache and the coalescing of identical submissions.

A job's cache key hashes everything that shapes its artifact. A submission whose key
has a succeeded job with its artifact on disk becomes a succeeded job at once (sharing
the stored file). One whose key has a queued or running job attaches to it (parent_id)
and finishes with it, so identical requests cost one compile. Failed and cancelled
jobs are never cache entries.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from app.constants import LOWERING_VERSION, JobStatus
from app.jobs.store import Job, JobStore, utcnow

ACTIVE = [JobStatus.QUEUED, JobStatus.RUNNING]
# What a finished job hands on to the jobs that waited on it.
INHERITED = ("artifact_sha256", "artifact_size_bytes", "verification", "toolchain", "error")


def cache_key(*, input_sha256: str, params: dict[str, Any], toolchain: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of every input that can change the artifact."""
    options = params["options"]
    material = {
        "input_sha256": input_sha256,
        "model_name": params["model_name"],
        "backend_id": params["backend_id"],
        "device": params["device"],
        "options": options,
        # verification results are written into the archive's provenance
        "verify": params["verify"], "rtol": params["rtol"], "atol": params["atol"],
        "cpu_isa": toolchain.get("cpu_isa"),
        "cpp_march": options.get("cpp.march") or toolchain.get("cpp_march") or "native",
        "cuda_arch": toolchain.get("cuda_arch") if params["device"] != "cpu" else None,
        "compiler": toolchain.get("compiler"),
        "torch_version": toolchain.get("torch_version"),
        "lowering_version": LOWERING_VERSION,
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class QueueFull(Exception):
    """Admitting one more job that needs a worker would exceed the queue bound."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} lowerings are waiting")
        self.waiting = waiting


def admit(
    store: JobStore, *, fields: dict[str, Any], use_cache: bool,
    artifact_exists: Callable[[str], bool], max_waiting: int | None = None,
) -> tuple[Job, bool]:
    """Create the job for a submission; True when it must be handed to the executor.

    Callers serialise calls per process, so two identical submissions cannot both
    become leaders, and the queue bound (``max_waiting``, checked here, where the
    count and the insert cannot interleave with another admission) holds under
    concurrent submits. Cache hits and followers never count against it.
    """
    key = fields.get("cache_key")
    if use_cache and key:
        hit = store.find_by_key(cache_key=key, statuses=[JobStatus.SUCCEEDED])
        if hit is not None and artifact_exists(hit["artifact_sha256"]):
            now = utcnow()
            inherited = {name: hit[name] for name in INHERITED}
            job = store.create(**fields, **inherited, status=JobStatus.SUCCEEDED.value,
                               cache_hit=True, created_at=now, started_at=now,
                               finished_at=now)
            return job, False
        leader = store.find_by_key(cache_key=key, statuses=ACTIVE)
        if leader is not None:
            return store.create(**fields, parent_id=leader["id"]), False
    if max_waiting is not None:
        waiting = store.count_waiting()
        if waiting >= max_waiting:
            raise QueueFull(waiting)
    return store.create(**fields), True


def settle_children(store: JobStore, parent_id: str) -> str | None:
    """Finish the jobs attached to a finished ``parent_id``.

    Returns the id of a job that must now be submitted: when the parent was cancelled,
    the oldest waiting child takes over the work and the others attach to it.
    """
    parent = store.get(parent_id)
    children = [c for c in store.children_of(parent_id) if c["status"] in ("queued", "running")]
    if parent is None or not children or not JobStatus(parent["status"]).is_final:
        return None
    if parent["status"] == JobStatus.CANCELLED.value:
        leader, rest = children[0], children[1:]
        store.reparent([leader["id"]], parent_id=None)
        store.reparent([c["id"] for c in rest], parent_id=leader["id"])
        return str(leader["id"])
    inherited = {name: parent[name] for name in INHERITED}
    if parent["status"] == JobStatus.FAILED.value and parent["error"]:
        inherited["error"] = {**parent["error"], "detail": {
            **(parent["error"].get("detail") or {}), "coalesced_with": parent_id}}
    status = JobStatus(parent["status"])
    for child in children:
        store.transition(child["id"], from_=ACTIVE, to=status,
                         cache_hit=status is JobStatus.SUCCEEDED,
                         started_at=parent["started_at"], **inherited)
    return None
