"""Job store: guarded transitions, paging, portable schema (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.constants import JobStatus
from app.jobs.store import JobStore
from tests.factories import job_database, migrated_store

FIELDS = {"model_name": "m", "backend_id": "aoti", "device": "cpu", "options": {},
          "verify": True, "rtol": 1e-4, "atol": 1e-4, "input_sha256": "0" * 64,
          "input_size_bytes": 1}

@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    with job_database(request.param, tmp_path) as url:
        job_store = migrated_store(url)
        yield job_store
        job_store.close()


def test_create_and_get(store: JobStore) -> None:
    job = store.create(**FIELDS)
    assert job["status"] == JobStatus.QUEUED.value
    assert store.get(job["id"]) == job
    assert store.get(uuid.uuid4().hex) is None
    assert job["created_at"].tzinfo is not None


def test_transitions_are_guarded(store: JobStore) -> None:
    job = store.create(**FIELDS)
    assert store.transition(job["id"], from_=[JobStatus.QUEUED], to=JobStatus.RUNNING)
    # A second actor that also saw "queued" cannot move it again.
    assert not store.transition(job["id"], from_=[JobStatus.QUEUED], to=JobStatus.RUNNING)
    assert store.update_running(job["id"], phase="lower")
    assert store.transition(job["id"], from_=[JobStatus.RUNNING], to=JobStatus.CANCELLED)
    assert not store.update_running(job["id"], phase="verify")
    assert not store.transition(job["id"], from_=[JobStatus.RUNNING], to=JobStatus.SUCCEEDED)
    final = store.get(job["id"])
    assert final is not None
    assert final["status"] == "cancelled" and final["phase"] is None
    assert final["started_at"] is not None and final["finished_at"] is not None


def test_paging_newest_first(store: JobStore) -> None:
    ids = [store.create(**FIELDS)["id"] for _ in range(5)]
    first = store.list_page(limit=2)
    assert [j["id"] for j in first] == ids[::-1][:2]
    rest = store.list_page(limit=10, before=(first[-1]["created_at"], first[-1]["id"]))
    assert [j["id"] for j in rest] == ids[::-1][2:]
    assert store.ids_with_status(statuses=[JobStatus.QUEUED]) == ids
    assert store.delete(ids[0]) and not store.delete(ids[0])
    # Jobs made in the same microsecond (one submit's targets) page by id, none twice.
    same = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    tied = sorted((store.create(**FIELDS, created_at=same)["id"] for _ in range(3)),
                  reverse=True)
    older = store.list_page(limit=2, before=(same, tied[0]))
    assert [j["id"] for j in older] == tied[1:]
