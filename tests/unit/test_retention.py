"""Retention against a real job database (SQLite, and PostgreSQL when it answers) and
real local stores, with the sweep's clock moved forward instead of waiting: TTLs of
archives, inputs and logs, the storage budget's LRU eviction, what live jobs protect, and
the races with cache hits, workers and other replicas."""

from __future__ import annotations

import datetime as dt
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from app.constants import JobStatus
from app.jobs.cache_key import cache_key
from app.jobs.lifecycle import ArtifactLost, JobLifecycle
from app.jobs.models import uploads as uploads_table
from app.jobs.models import webhook_deliveries
from app.jobs.retention import Retention, mark_used
from app.jobs.store import JobFields, JobRecord, utcnow
from app.settings import Settings
from app.storage.artifacts import LocalArtifactStore
from app.storage.files import LocalLogStore, LocalUploadStore
from tests.factories import job_database, migrated_store

DAY = dt.timedelta(days=1)
TOOLCHAIN = {"torch_version": "2.13.0", "cpu_isa": "AVX512", "compiler": "g++ 12"}


class World:
    """A lifecycle and its stores, and retention over them with settings to vary."""

    def __init__(self, url: str, root: Path) -> None:
        self.root = root
        self.store = migrated_store(url)
        (root / "logs").mkdir(parents=True)
        self.uploads = LocalUploadStore(root / "uploads")
        self.uploads.root.mkdir(parents=True)
        self.logs = LocalLogStore(root / "logs")
        self.artifacts = LocalArtifactStore(root / "artifacts")
        self.dispatched: list[str] = []
        self.life = JobLifecycle(self.store, uploads=self.uploads, logs=self.logs,
                                 artifacts=self.artifacts, dispatch=self.dispatched.append)

    def retention(self, **overrides: Any) -> Retention:
        settings = Settings(data_dir=self.root / "data", **overrides)
        return Retention(self.store, uploads=self.uploads, logs=self.logs,
                         artifacts=self.artifacts, settings=settings)

    def fields(self, name: str, *, code: str | None = None, size: int = 10,
               tenant: str = "default") -> JobFields:
        params = {"model_name": name, "backend_id": "aoti", "device": "cpu", "options": {},
                  "verify": True, "rtol": 1e-4, "atol": 1e-4}
        key = cache_key(input_sha256=name.ljust(64, "0")[:64], params=params,
                        toolchain=TOOLCHAIN)
        return {**params, "input_sha256": "0" * 64, "input_size_bytes": size,  # type: ignore[typeddict-item]
                "cache_key": key, "code_key": code, "tenant": tenant}

    def submit(self, name: str, **kwargs: Any) -> JobRecord:
        """Admit a job (a cache hit when an identical one is stored) with an input file."""
        job = self.life.admit(self.fields(name, **kwargs), use_cache=True).job
        staged = self.uploads.staging_path()
        staged.write_bytes(b"x" * 10)
        self.uploads.commit(job["id"], staged)
        return job

    def succeed(self, job_id: str, content: bytes) -> None:
        assert self.life.claim(job_id, worker_pid=1) is not None
        (self.root / "logs" / f"{job_id}.log").write_text("compiled\n")
        ref = self.artifacts.put_stream(io.BytesIO(content))
        assert self.life.succeed(job_id, artifact=ref, timings={}, verification=None,
                                 toolchain=TOOLCHAIN, resources=None)

    def lowered(self, name: str, content: bytes, **kwargs: Any) -> JobRecord:
        job = self.submit(name, **kwargs)
        self.succeed(job["id"], content)
        return self.job(job["id"])

    def job(self, job_id: str) -> JobRecord:
        job = self.store.get(job_id)
        assert job is not None
        return job

    def stored(self, job: JobRecord) -> bool:
        return self.artifacts.exists(str(self.job(job["id"])["artifact_sha256"]))


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    with job_database(request.param, tmp_path) as url:
        made = World(url, tmp_path)
        yield made
        made.store.close()


def test_an_unused_archive_expires_after_its_ttl_and_no_submit_is_served_it(
        world: World) -> None:
    job = world.lowered("m", b"archive m")
    rules = world.retention(artifact_ttl_s=30 * 86_400)
    assert rules.sweep(now=utcnow() + 29 * DAY).archives_ttl == 0
    assert world.stored(job)

    sweep = rules.sweep(now=utcnow() + 31 * DAY)

    assert (sweep.archives_ttl, sweep.errors) == (1, [])
    assert not world.stored(job)
    expired = world.job(job["id"])
    assert expired["status"] == JobStatus.SUCCEEDED.value
    assert expired["artifact_expired_reason"] == "ttl"
    assert expired["artifact_expired_at"] is not None
    again = world.life.admit(world.fields("m"), use_cache=True)
    assert again.must_run and not again.job["cache_hit"]  # built anew, not a hit on nothing
    # What the tenant holds: the new job's input; the first's went a day after it ended.
    assert world.store.stored_bytes(tenant="default") == 10


def test_a_download_or_a_cache_hit_is_a_use_that_restarts_the_ttl(world: World) -> None:
    first = world.lowered("m", b"archive m")
    rules = world.retention(artifact_ttl_s=30 * 86_400)
    mark_used(world.store, first, now=utcnow() + 20 * DAY)  # downloaded on day 20
    assert rules.sweep(now=utcnow() + 31 * DAY).archives_ttl == 0

    hit = world.submit("m")  # a cache hit: a second job holding the same archive
    assert hit["cache_hit"] and hit["artifact_sha256"] == first["artifact_sha256"]
    assert rules.sweep(now=utcnow() + 49 * DAY).archives_ttl == 0

    assert rules.sweep(now=utcnow() + 51 * DAY).archives_ttl == 1  # one archive, two jobs
    for job in (first, hit):
        assert world.job(job["id"])["artifact_expired_reason"] == "ttl"


def test_an_archive_a_queued_job_may_reuse_code_from_is_kept(world: World) -> None:
    donor = world.lowered("donor", b"archive donor", code="k" * 64)
    waiting = world.submit("other weights", code="k" * 64)  # queued: may take donor's code
    rules = world.retention(artifact_ttl_s=86_400, storage_budget_bytes=1, evict_grace_s=0)

    sweep = rules.sweep(now=utcnow() + 10 * DAY)

    assert (sweep.archives_ttl, sweep.archives_budget) == (0, 0)
    assert sweep.over_budget_bytes > 0  # reported: what is left is live
    assert world.stored(donor)
    world.life.cancel(waiting["id"])
    assert rules.sweep(now=utcnow() + 10 * DAY).archives_ttl == 1
    assert not world.stored(donor)


def test_the_budget_evicts_least_recently_used_first_and_spares_recent_ones(
        world: World) -> None:
    now = utcnow()
    jobs = [world.lowered(name, name.encode() * 100) for name in ("old", "mid", "new", "hot")]
    for job, age_days in zip(jobs, (40, 30, 20, 0), strict=True):
        mark_used(world.store, job, now=now - age_days * DAY)
    usage = world.retention().usage()
    assert (usage.archives, usage.archive_bytes) == (4, 300 + 300 + 300 + 300)
    # Over by one archive and a bit: down to 90% takes two, oldest first.
    budget = usage.total_bytes - 300 - 50
    rules = world.retention(storage_budget_bytes=budget, evict_grace_s=86_400,
                            artifact_ttl_s=None)

    sweep = rules.sweep(now=now)

    assert [world.stored(job) for job in jobs] == [False, False, True, True]
    assert sweep.archives_budget == 2 and sweep.over_budget_bytes == 0
    assert world.job(jobs[0]["id"])["artifact_expired_reason"] == "budget"
    # A budget nothing more can meet: "hot" was used within the grace, "new" is all left.
    tight = world.retention(storage_budget_bytes=1, evict_grace_s=86_400, artifact_ttl_s=None)
    sweep = tight.sweep(now=now)
    assert sweep.archives_budget == 1 and world.stored(jobs[3]) and not world.stored(jobs[2])
    assert sweep.over_budget_bytes == world.retention().usage().total_bytes - 1


def test_inputs_and_logs_of_finished_jobs_go_after_their_ttls_never_an_active_jobs(
        world: World) -> None:
    done = world.lowered("done", b"archive")
    active = world.submit("still queued")
    input_of = world.uploads.root / f"{done['id']}.pt2"
    log_of = world.logs.path(done["id"])
    assert input_of.exists() and log_of.exists()
    rules = world.retention(input_ttl_s=3600, log_ttl_s=7 * 86_400)

    assert rules.sweep(now=utcnow() + dt.timedelta(minutes=30)).inputs == 0
    sweep = rules.sweep(now=utcnow() + 2 * DAY)
    assert (sweep.inputs, sweep.logs) == (1, 0)
    assert not input_of.exists() and log_of.exists()
    assert (world.uploads.root / f"{active['id']}.pt2").exists()
    assert world.job(done["id"])["input_removed_at"] is not None
    assert world.job(active["id"])["input_removed_at"] is None

    assert rules.sweep(now=utcnow() + 8 * DAY).logs == 1
    assert not log_of.exists()
    assert world.job(done["id"])["log_removed_at"] is not None
    assert world.store.stored_bytes(tenant="default") == 10 + len(b"archive")  # active's input


def test_expired_uploads_and_old_deliveries_are_pruned(world: World) -> None:
    now = utcnow()
    with world.store.engine.begin() as conn:
        for name, expires in (("gone", now - DAY), ("kept", now + DAY)):
            conn.execute(insert(uploads_table).values(
                id=name.ljust(32, "0"), status="ready", size_bytes=5, part_size_bytes=5,
                parts=1, sha256="a" * 64, created_at=now - 2 * DAY, expires_at=expires))
        for n, (status, age) in enumerate((("delivered", 40), ("failed", 40),
                                           ("pending", 40), ("delivered", 1))):
            conn.execute(insert(webhook_deliveries).values(
                id=f"msg_{n}", url="https://example.com/hook", event="lowering.succeeded",
                job_id="j" * 32, payload={}, status=status, attempts=1,
                next_attempt_at=now, created_at=now - age * DAY))

    sweep = world.retention(webhook_delivery_ttl_s=30 * 86_400).sweep(now=now)

    assert (sweep.uploads, sweep.deliveries) == (1, 2)
    with world.store.engine.connect() as conn:
        assert [r.id[:4] for r in conn.execute(select(uploads_table.c.id))] == ["kept"]
        left = sorted(r.status for r in conn.execute(select(webhook_deliveries.c.status)))
    assert left == ["delivered", "pending"]


def test_a_worker_succeeding_with_bytes_a_sweep_just_removed_stores_them_again(
        world: World) -> None:
    old = world.lowered("old", b"the same bytes")
    running = world.submit("new")
    assert world.life.claim(running["id"], worker_pid=1) is not None
    ref = world.artifacts.put_stream(io.BytesIO(b"the same bytes"))  # about to succeed

    assert world.retention(artifact_ttl_s=86_400).sweep(now=utcnow() + 2 * DAY).archives_ttl
    with pytest.raises(ArtifactLost):  # not a success pointing at nothing
        world.life.succeed(running["id"], artifact=ref, timings={}, verification=None,
                           toolchain=TOOLCHAIN, resources=None)
    ref = world.artifacts.put_stream(io.BytesIO(b"the same bytes"))  # the worker's retry
    assert world.life.succeed(running["id"], artifact=ref, timings={}, verification=None,
                              toolchain=TOOLCHAIN, resources=None)
    assert world.stored(running) and world.job(old["id"])["artifact_expired_at"] is not None
    # Deleting the expired job keeps the bytes the new one holds.
    world.life.delete(old["id"])
    assert world.stored(running)


def test_replicas_sweeping_at_once_remove_each_archive_once(world: World) -> None:
    jobs = [world.lowered(f"m{n}", f"archive {n}".encode()) for n in range(6)]
    later = utcnow() + 2 * DAY
    results = []

    def sweep() -> None:
        results.append(world.retention(artifact_ttl_s=86_400).sweep(now=later))

    threads = [threading.Thread(target=sweep) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sum(r.archives_ttl for r in results) == len(jobs)
    assert all(not r.errors for r in results)
    assert not any(world.stored(job) for job in jobs)


def test_archives_no_job_references_are_removed_hourly_and_referenced_ones_kept(
        world: World) -> None:
    kept = world.lowered("kept", b"referenced")
    stray = world.artifacts.put_stream(io.BytesIO(b"a cancelled job's archive")).sha256
    rules = world.retention(job_timeout_s=600)
    # Younger than the job timeout plus an hour: maybe a worker's, not yet committed.
    assert rules.sweep(now=utcnow() + dt.timedelta(minutes=30)).archives_orphaned == 0
    assert world.artifacts.exists(stray)

    sweep = rules.sweep(now=utcnow() + 2 * DAY)

    assert sweep.archives_orphaned == 1 and not world.artifacts.exists(stray)
    assert world.stored(kept)
    assert rules.sweep(now=utcnow() + 2 * DAY).archives_orphaned == 0  # not again this hour
