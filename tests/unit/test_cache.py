"""Cache keys, cache hits and coalescing against a real SQLite store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.constants import JobStatus
from app.jobs.cache import admit, cache_key, settle_children
from app.jobs.store import JobStore

PARAMS = {"model_name": "m", "backend_id": "aoti", "device": "cpu", "options": {},
          "verify": True, "rtol": 1e-4, "atol": 1e-4}
TOOLCHAIN = {"torch_version": "2.13.0", "cpu_isa": "AVX512", "compiler": "g++ 12"}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    job_store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield job_store
    job_store.close()


def _fields(**params: Any) -> dict[str, Any]:
    merged = {**PARAMS, **params}
    key = cache_key(input_sha256="a" * 64, params=merged, toolchain=TOOLCHAIN)
    return {**merged, "input_sha256": "a" * 64, "input_size_bytes": 10, "cache_key": key}


def _succeed(store: JobStore, job_id: str, sha: str = "f" * 64) -> None:
    assert store.transition(job_id, from_=[JobStatus.QUEUED], to=JobStatus.RUNNING)
    assert store.transition(job_id, from_=[JobStatus.RUNNING], to=JobStatus.SUCCEEDED,
                            artifact_sha256=sha, artifact_size_bytes=5,
                            verification={"passed": True})


def test_key_covers_what_shapes_the_artifact() -> None:
    base = _fields()["cache_key"]
    assert _fields()["cache_key"] == base
    for change in ({"model_name": "n"}, {"backend_id": "b"}, {"options": {"freezing": True}},
                   {"verify": False}, {"atol": 1.0}, {"device": "cuda"}):
        assert _fields(**change)["cache_key"] != base, change
    other_torch = cache_key(input_sha256="a" * 64, params=PARAMS,
                            toolchain={**TOOLCHAIN, "torch_version": "2.14.0"})
    assert other_torch != base
    march = cache_key(input_sha256="a" * 64, params={**PARAMS, "options": {"cpp.march": "x"}},
                      toolchain=TOOLCHAIN)
    assert march != base


def test_hit_shares_the_artifact(store: JobStore) -> None:
    first, run = admit(store, fields=_fields(), use_cache=True, artifact_exists=lambda s: True)
    assert run
    _succeed(store, first["id"])
    hit, run = admit(store, fields=_fields(), use_cache=True, artifact_exists=lambda s: True)
    assert not run and hit["status"] == "succeeded" and hit["cache_hit"]
    assert hit["artifact_sha256"] == "f" * 64 and hit["verification"] == {"passed": True}
    # A missing (or corrupt) artifact is not a hit; bypass never is.
    _, run = admit(store, fields=_fields(), use_cache=True, artifact_exists=lambda s: False)
    assert run
    _, run = admit(store, fields=_fields(), use_cache=False, artifact_exists=lambda s: True)
    assert run


def test_identical_submissions_coalesce_and_finish_together(store: JobStore) -> None:
    leader, run = admit(store, fields=_fields(), use_cache=True, artifact_exists=lambda s: True)
    followers = [admit(store, fields=_fields(), use_cache=True, artifact_exists=lambda s: True)
                 for _ in range(3)]
    assert run and not any(run for _, run in followers)
    assert all(job["parent_id"] == leader["id"] for job, _ in followers)
    assert store.count_waiting() == 1  # followers need no worker
    _succeed(store, leader["id"])
    assert settle_children(store, leader["id"]) is None
    for job, _ in followers:
        done = store.get(job["id"])
        assert done is not None
        assert done["status"] == "succeeded" and done["artifact_sha256"] == "f" * 64


def test_failure_is_shared_but_never_cached(store: JobStore) -> None:
    leader, _ = admit(store, fields=_fields(), use_cache=True, artifact_exists=lambda s: True)
    follower, _ = admit(store, fields=_fields(), use_cache=True, artifact_exists=lambda s: True)
    store.transition(leader["id"], from_=[JobStatus.QUEUED], to=JobStatus.FAILED,
                     error={"code": "lowering_failed", "message": "x", "detail": {}})
    settle_children(store, leader["id"])
    failed = store.get(follower["id"])
    assert failed is not None and failed["status"] == "failed" and not failed["cache_hit"]
    assert failed["error"]["detail"]["coalesced_with"] == leader["id"]
    _, run = admit(store, fields=_fields(), use_cache=True, artifact_exists=lambda s: True)
    assert run


def test_cancelled_leader_hands_over(store: JobStore) -> None:
    leader, _ = admit(store, fields=_fields(), use_cache=True, artifact_exists=lambda s: True)
    second, _ = admit(store, fields=_fields(), use_cache=True, artifact_exists=lambda s: True)
    third, _ = admit(store, fields=_fields(), use_cache=True, artifact_exists=lambda s: True)
    store.transition(leader["id"], from_=[JobStatus.QUEUED], to=JobStatus.CANCELLED)
    assert settle_children(store, leader["id"]) == second["id"]
    promoted, rest = store.get(second["id"]), store.get(third["id"])
    assert promoted is not None and promoted["parent_id"] is None
    assert rest is not None and rest["parent_id"] == second["id"]
