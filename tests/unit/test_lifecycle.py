"""The job lifecycle against a real SQLite store and real local stores: the transition
table, admission (hits, followers, the queue bound), settlement, cooperative cancel,
recovery, and artifact deletion that a concurrent cache hit cannot outrun."""

from __future__ import annotations

import datetime as dt
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.constants import ErrorCode, JobStatus, Phase
from app.errors import Conflict, JobError, NotFound
from app.jobs import migrate
from app.jobs.cache_key import cache_key
from app.jobs.lifecycle import TRANSITIONS, ArtifactLost, JobLifecycle, QueueFull
from app.jobs.store import JobFields, JobRecord, JobStore
from app.storage.artifacts import LocalArtifactStore
from app.storage.base import ArtifactRef
from app.storage.files import LocalLogStore, LocalUploadStore

PARAMS: dict[str, Any] = {"model_name": "m", "backend_id": "aoti", "device": "cpu",
                          "options": {}, "verify": True, "rtol": 1e-4, "atol": 1e-4}
TOOLCHAIN = {"torch_version": "2.13.0", "cpu_isa": "AVX512", "compiler": "g++ 12"}


class Recorder:
    """A listener and a dispatcher that remember what they were told."""

    def __init__(self) -> None:
        self.finished: list[tuple[str, str]] = []
        self.dispatched: list[str] = []

    def job_finished(self, job: JobRecord) -> None:
        self.finished.append((job["id"], job["status"]))


@pytest.fixture
def seen() -> Recorder:
    return Recorder()


@pytest.fixture
def life(tmp_path: Path, seen: Recorder) -> Iterator[JobLifecycle]:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrate.upgrade(url)
    store = JobStore(url)
    jobs = JobLifecycle(store, uploads=LocalUploadStore(tmp_path / "uploads"),
                        logs=LocalLogStore(tmp_path / "logs"),
                        artifacts=LocalArtifactStore(tmp_path / "artifacts"),
                        listeners=[seen], dispatch=seen.dispatched.append)
    (tmp_path / "logs").mkdir()
    yield jobs
    store.close()


def _fields(**params: Any) -> JobFields:
    merged = {**PARAMS, **params}
    key = cache_key(input_sha256="a" * 64, params=merged, toolchain=TOOLCHAIN)
    return {**merged, "input_sha256": "a" * 64, "input_size_bytes": 10,  # type: ignore[typeddict-item]
            "cache_key": key}


def _stored(life: JobLifecycle, content: bytes = b"archive") -> ArtifactRef:
    return life.artifacts.put_stream(io.BytesIO(content))


def _run_to_success(life: JobLifecycle, job_id: str, content: bytes = b"archive") -> None:
    assert life.claim(job_id, worker_pid=1) is not None
    assert life.succeed(job_id, artifact=_stored(life, content), timings={"lower": 1.0},
                        verification={"passed": True}, toolchain=TOOLCHAIN, resources=None)


def _status(life: JobLifecycle, job_id: str) -> str:
    job = life.store.get(job_id)
    assert job is not None
    return job["status"]


def test_the_table_is_the_law(life: JobLifecycle) -> None:
    assert all(not TRANSITIONS[s] for s in JobStatus if s.is_final)
    job = life.admit(_fields(), use_cache=False).job
    # Not in the table: refused before the database is asked.
    with pytest.raises(ValueError, match="TRANSITIONS"):
        life._move(job["id"], from_=[JobStatus.SUCCEEDED], to=JobStatus.RUNNING)
    # In the table but not where the job is: the guarded UPDATE moves nothing.
    assert not life.succeed(job["id"], artifact=_stored(life), timings={}, verification=None,
                            toolchain=None, resources=None)
    assert not life.fail(job["id"], JobError(ErrorCode.INTERNAL, "x"))
    assert _status(life, job["id"]) == "queued"


def test_claim_progress_and_cooperative_cancel(life: JobLifecycle, seen: Recorder) -> None:
    job_id = life.admit(_fields(), use_cache=False).job["id"]
    assert seen.dispatched == [job_id]
    claimed = life.claim(job_id, worker_pid=42)
    assert claimed is not None and claimed["status"] == "running"
    assert claimed["attempts"] == 1 and claimed["phase"] == "load"
    assert life.claim(job_id, worker_pid=43) is None  # nobody runs it twice
    assert life.progress(job_id, phase=Phase.LOWER) and life.progress(job_id)
    assert life.cancel(job_id)["status"] == "cancelled"
    # The worker's next report learns it must stop.
    assert not life.progress(job_id, phase=Phase.PACKAGE) and not life.progress(job_id)
    assert seen.finished == [(job_id, "cancelled")]
    with pytest.raises(Conflict, match="can no longer be cancelled"):
        life.cancel(job_id)
    with pytest.raises(NotFound):
        life.cancel("0" * 32)


def test_hit_shares_the_artifact(life: JobLifecycle, seen: Recorder) -> None:
    first = life.admit(_fields(), use_cache=True)
    assert first.must_run
    _run_to_success(life, first.job["id"])
    hit = life.admit(_fields(), use_cache=True)
    assert not hit.must_run and hit.job["status"] == "succeeded" and hit.job["cache_hit"]
    assert hit.job["artifact_sha256"] == _stored(life).sha256
    assert (hit.job["id"], "succeeded") in seen.finished  # hits are terminal changes too
    # A corrupt archive is no hit: it is removed and the work runs again.
    path = life.artifacts.location(hit.job["artifact_sha256"] or "")
    assert isinstance(path, Path)
    path.write_bytes(b"tampered")
    again = life.admit(_fields(), use_cache=True)
    assert again.must_run and not path.exists()
    # Bypass never hits, nor follows the identical job already running.
    assert life.admit(_fields(), use_cache=False).must_run


def test_followers_finish_with_their_leader(life: JobLifecycle, seen: Recorder) -> None:
    leader = life.admit(_fields(), use_cache=True)
    followers = [life.admit(_fields(), use_cache=True) for _ in range(3)]
    assert leader.must_run and not any(f.must_run for f in followers)
    assert all(f.job["parent_id"] == leader.job["id"] for f in followers)
    assert life.store.count_waiting() == 1  # followers need no worker
    assert life.claim(followers[0].job["id"], worker_pid=1) is None  # nor may take one
    _run_to_success(life, leader.job["id"])
    for follower in followers:
        done = life.store.get(follower.job["id"])
        assert done is not None and done["status"] == "succeeded" and done["cache_hit"]
        assert done["artifact_sha256"] == _stored(life).sha256
    assert len(seen.finished) == 4


def test_failure_is_shared_with_a_log_tail_but_never_cached(life: JobLifecycle) -> None:
    leader = life.admit(_fields(), use_cache=True).job
    follower = life.admit(_fields(), use_cache=True).job
    life.claim(leader["id"], worker_pid=1)
    (life.logs.root / f"{leader['id']}.log").write_text("g++: error: boom\n")  # type: ignore[attr-defined]
    assert life.fail(leader["id"], JobError(ErrorCode.LOWERING_FAILED, "compile failed"))
    failed = life.store.get(leader["id"])
    assert failed is not None and failed["error"] is not None
    assert "boom" in failed["error"]["detail"]["log_tail"]
    shared = life.store.get(follower["id"])
    assert shared is not None and shared["status"] == "failed" and not shared["cache_hit"]
    assert shared["error"] is not None
    assert shared["error"]["detail"]["coalesced_with"] == leader["id"]
    assert life.admit(_fields(), use_cache=True).must_run


def test_a_cancelled_leader_hands_the_work_over(life: JobLifecycle, seen: Recorder) -> None:
    leader = life.admit(_fields(), use_cache=True).job
    second = life.admit(_fields(), use_cache=True).job
    third = life.admit(_fields(), use_cache=True).job
    life.cancel(leader["id"])
    assert seen.dispatched == [leader["id"], second["id"]]
    promoted, rest = life.store.get(second["id"]), life.store.get(third["id"])
    assert promoted is not None and promoted["parent_id"] is None
    assert rest is not None and rest["parent_id"] == second["id"]
    assert _status(life, second["id"]) == _status(life, third["id"]) == "queued"


def test_queue_bound_counts_only_work(life: JobLifecycle) -> None:
    life.admit(_fields(), use_cache=True, max_waiting=1)
    life.admit(_fields(), use_cache=True, max_waiting=1)  # a follower: no worker needed
    with pytest.raises(QueueFull):
        life.admit(_fields(model_name="other"), use_cache=True, max_waiting=1)


def test_stop_and_restart(life: JobLifecycle, seen: Recorder) -> None:
    stopped = life.admit(_fields(model_name="a"), use_cache=False).job["id"]
    life.claim(stopped, worker_pid=1)
    assert life.requeue(stopped)  # a graceful stop: not counted
    requeued = life.store.get(stopped)
    assert requeued is not None and requeued["attempts"] == 0 and requeued["phase"] is None
    twice = life.admit(_fields(model_name="b"), use_cache=False).job["id"]
    once = life.admit(_fields(model_name="c"), use_cache=False).job["id"]
    for job_id in (twice, once):
        life.claim(job_id, worker_pid=1)
    life.store.transition(twice, from_=[JobStatus.RUNNING], to=JobStatus.RUNNING, attempts=2)
    seen.dispatched.clear()
    life.recover()  # the service died with `twice` and `once` running
    assert _status(life, twice) == "failed"
    error = (life.store.get(twice) or {}).get("error") or {}
    assert error["code"] == ErrorCode.INTERRUPTED
    assert sorted(seen.dispatched) == sorted([stopped, once])


def test_delete_counts_references(life: JobLifecycle) -> None:
    first = life.admit(_fields(), use_cache=True).job["id"]
    _run_to_success(life, first)
    hit = life.admit(_fields(), use_cache=True).job["id"]
    sha = _stored(life).sha256
    active = life.admit(_fields(model_name="busy"), use_cache=False).job["id"]
    with pytest.raises(Conflict, match="cancel it before deleting"):
        life.delete(active)
    life.delete(first)
    assert life.artifacts.exists(sha)  # the hit still points at it
    life.delete(hit)
    assert not life.artifacts.exists(sha)
    with pytest.raises(NotFound):
        life.delete(hit)


def test_succeed_refuses_an_archive_a_delete_removed(life: JobLifecycle) -> None:
    job_id = life.admit(_fields(), use_cache=False).job["id"]
    life.claim(job_id, worker_pid=1)
    ref = _stored(life)
    life.artifacts.remove(ref.sha256)  # what a concurrent delete of a twin does
    with pytest.raises(ArtifactLost):
        life.succeed(job_id, artifact=ref, timings={}, verification=None, toolchain=None,
                     resources=None)
    assert _status(life, job_id) == "running"


def test_delete_cannot_outrun_a_cache_hit(life: JobLifecycle,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Delete the only job holding an archive while an identical submission is admitted
    as a hit on it: whichever wins, no succeeded job may point at a missing archive."""
    intact = life.artifacts.is_intact

    def slow_intact(sha256: str) -> bool:
        found = intact(sha256)
        time.sleep(0.02)  # widen the window between "it is there" and the insert
        return found

    monkeypatch.setattr(life.artifacts, "is_intact", slow_intact)
    for round_ in range(8):
        owner = life.admit(_fields(model_name=f"r{round_}"), use_cache=True).job["id"]
        _run_to_success(life, owner, content=f"archive {round_}".encode())
        admitted: list[JobRecord] = []

        def admit(name: str, into: list[JobRecord]) -> None:
            into.append(life.admit(_fields(model_name=name), use_cache=True).job)

        racer = threading.Thread(target=admit, args=(f"r{round_}", admitted))
        racer.start()
        time.sleep(0.005)
        life.delete(owner)
        racer.join()
        job = admitted[0]
        if job["status"] == "succeeded":
            assert life.artifacts.exists(job["artifact_sha256"] or ""), f"round {round_}"


def test_a_failing_listener_changes_nothing(life: JobLifecycle) -> None:
    class Broken:
        def job_finished(self, job: JobRecord) -> None:
            raise RuntimeError("metrics backend down")

    life.listeners.insert(0, Broken())
    job_id = life.admit(_fields(), use_cache=False).job["id"]
    assert life.cancel(job_id)["status"] == "cancelled"


def test_no_dispatcher_is_a_wiring_error(life: JobLifecycle) -> None:
    life.dispatch = None
    with pytest.raises(RuntimeError, match="dispatch"):
        life.admit(_fields(), use_cache=False)


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


# -- leases: the job database is the truth across worker hosts ---------------------------

def _expire(life: JobLifecycle, job_id: str) -> None:
    """As if the worker host stopped renewing a while ago (it died or hung)."""
    from app.jobs.store import utcnow

    life.store.update_running(job_id, lease_expires_at=utcnow() - dt.timedelta(seconds=1))


def test_a_claim_holds_a_lease_that_progress_renews(life: JobLifecycle) -> None:
    job_id = life.admit(_fields(), use_cache=False).job["id"]
    claimed = life.claim(job_id, worker_pid=7, worker="host-a@box")
    assert claimed is not None and claimed["worker"] == "host-a@box"
    first = claimed["lease_expires_at"]
    assert first is not None and first > claimed["started_at"]
    time.sleep(0.01)
    assert life.progress(job_id, attempt=1)
    renewed = life.store.get(job_id)
    assert renewed is not None and renewed["lease_expires_at"] > first
    # A duplicate delivery while the lease holds is a no-op, and reaping finds nothing.
    assert life.claim(job_id, worker_pid=8, worker="host-b@box") is None
    assert life.reap() == 0
    assert _status(life, job_id) == "running"


def test_an_expired_lease_is_taken_over_and_the_old_worker_is_fenced_off(
        life: JobLifecycle) -> None:
    job_id = life.admit(_fields(), use_cache=False).job["id"]
    assert life.claim(job_id, worker_pid=7, worker="host-a@box") is not None
    _expire(life, job_id)
    taken = life.claim(job_id, worker_pid=8, worker="host-b@box")
    assert taken is not None and taken["worker"] == "host-b@box" and taken["attempts"] == 2
    # host-a comes back: none of its writes lands on host-b's run.
    assert not life.progress(job_id, phase=Phase.VERIFY, attempt=1)
    assert not life.fail(job_id, JobError(ErrorCode.INTERNAL, "late"), attempt=1)
    assert not life.succeed(job_id, artifact=_stored(life), timings={}, verification=None,
                            toolchain=None, resources=None, attempt=1)
    assert _status(life, job_id) == "running"
    assert life.succeed(job_id, artifact=_stored(life), timings={}, verification=None,
                        toolchain=None, resources=None, attempt=2)
    done = life.store.get(job_id)
    assert done is not None and done["status"] == "succeeded"
    assert done["worker"] == "host-b@box" and done["lease_expires_at"] is None


def test_reap_requeues_a_silent_host_s_job_then_fails_it_at_the_cap(
        life: JobLifecycle, seen: Recorder) -> None:
    job_id = life.admit(_fields(), use_cache=False).job["id"]
    assert life.claim(job_id, worker_pid=7, worker="host-a@box") is not None
    _expire(life, job_id)
    assert life.reap() == 1
    assert _status(life, job_id) == "queued" and seen.dispatched == [job_id, job_id]
    assert life.claim(job_id, worker_pid=8, worker="host-b@box") is not None
    _expire(life, job_id)
    assert life.reap() == 0  # attempt 2 of MAX_ATTEMPTS: it does not loop
    failed = life.store.get(job_id)
    assert failed is not None and failed["status"] == "failed"
    assert failed["error"]["code"] == "worker_crashed"
    assert "host-b@box" in failed["error"]["message"]
    assert seen.finished == [(job_id, "failed")]
    assert life.claim(job_id, worker_pid=9, worker="host-c@box") is None


def test_an_api_start_in_a_fleet_leaves_leased_jobs_alone(
        life: JobLifecycle, seen: Recorder) -> None:
    """A new API replica (or a restart) must not take back what worker hosts are running:
    only expired leases are; a local pool's start re-queues everything it left running."""
    live, stale, waiting = (life.admit(_fields(model_name=f"m{i}"), use_cache=False).job["id"]
                            for i in range(3))
    for job_id in (live, stale):
        assert life.claim(job_id, worker_pid=None, worker="host-a@box") is not None
    _expire(life, stale)
    seen.dispatched.clear()
    life.recover(requeue_running=False)
    assert _status(life, live) == "running"
    assert _status(life, stale) == "queued" and _status(life, waiting) == "queued"
    assert sorted(seen.dispatched) == sorted([stale, waiting])
    life.recover(requeue_running=True)
    assert _status(life, live) == "queued"


def test_a_job_built_with_another_toolchain_than_its_key_is_no_cache_entry(
        life: JobLifecycle) -> None:
    """A fleet mid-upgrade: the key was computed for the host class's toolchain, a host
    with another torch built it. The archive is the job's, but no later submit keyed for
    the first toolchain may be answered with it, nor take its code."""
    keyed = {**_fields(), "toolchain": TOOLCHAIN, "code_key": "c" * 64}
    first = life.admit(keyed, use_cache=True)  # type: ignore[arg-type]
    assert life.claim(first.job["id"], worker_pid=1) is not None
    # A cpu job: a GPU list that differs does not matter, the torch version does.
    elsewhere = {**TOOLCHAIN, "torch_version": "2.14.0", "cuda_arch": ["sm_90"]}
    assert life.succeed(first.job["id"], artifact=_stored(life), timings={}, verification=None,
                        toolchain=elsewhere, resources=None)
    job = life.store.get(first.job["id"])
    assert job is not None and job["status"] == "succeeded"
    assert job["cache_key"] is None and job["code_key"] is None
    assert job["toolchain"] == elsewhere  # what really built it
    assert life.admit(keyed, use_cache=True).must_run  # type: ignore[arg-type]

    other = {**_fields(options={"freezing": True}), "toolchain": TOOLCHAIN}
    same = life.admit(other, use_cache=True)  # type: ignore[arg-type]
    assert life.claim(same.job["id"], worker_pid=2) is not None
    assert life.succeed(same.job["id"], artifact=_stored(life, b"other"), timings={},
                        verification=None, toolchain={**TOOLCHAIN, "cuda_arch": ["sm_90"]},
                        resources=None)
    kept = life.store.get(same.job["id"])
    assert kept is not None and kept["cache_key"] == same.job["cache_key"] is not None
