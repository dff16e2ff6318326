"""Tenants in the lifecycle: quotas that hold across replicas (two stores, one database,
threads racing), hits, followers and compiled-code donors within a tenant, and the
opt-in shared cache that hands over bytes only."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from app.jobs import migrate
from app.jobs.lifecycle import JobLifecycle, Quota, QuotaExceeded
from app.jobs.store import JobRecord, JobStore
from app.storage.artifacts import LocalArtifactStore
from app.storage.files import LocalLogStore, LocalUploadStore
from tests.unit.test_lifecycle import _fields, _run_to_success


def _lifecycle(tmp_path: Path, url: str, **kwargs: Any) -> JobLifecycle:
    (tmp_path / "logs").mkdir(exist_ok=True)
    return JobLifecycle(JobStore(url), uploads=LocalUploadStore(tmp_path / "uploads"),
                        logs=LocalLogStore(tmp_path / "logs"),
                        artifacts=LocalArtifactStore(tmp_path / "artifacts"),
                        dispatch=lambda job_id: None, **kwargs)


@pytest.fixture
def url(tmp_path: Path) -> str:
    made = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrate.upgrade(made)
    return made


def test_the_active_quota_holds_across_two_replicas_racing(tmp_path: Path, url: str) -> None:
    replicas = [_lifecycle(tmp_path, url, quota=Quota(max_active_jobs=2)) for _ in range(2)]
    admitted: list[JobRecord] = []
    refused: list[QuotaExceeded] = []

    def admit(n: int) -> None:
        try:
            admitted.append(replicas[n % 2].admit(
                {**_fields(model_name=f"m{n}"), "tenant": "acme"}, use_cache=True).job)
        except QuotaExceeded as exc:
            refused.append(exc)

    threads = [threading.Thread(target=admit, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 2 and len(refused) == 8
    assert all(exc.retry_after_s > 0 and "acme" in exc.message for exc in refused)
    # Another tenant is not held back by acme's jobs.
    assert replicas[0].admit({**_fields(model_name="x"), "tenant": "globex"},
                             use_cache=True).must_run
    for life in replicas:
        life.store.close()


def test_hits_followers_and_code_donors_stay_within_a_tenant(tmp_path: Path,
                                                             url: str) -> None:
    life = _lifecycle(tmp_path, url)
    try:
        mine = life.admit({**_fields(), "tenant": "acme", "code_key": "k" * 64},
                          use_cache=True).job
        theirs = life.admit({**_fields(), "tenant": "globex", "code_key": "k" * 64},
                            use_cache=True)
        assert theirs.must_run and theirs.job["parent_id"] is None  # not acme's follower
        _run_to_success(life, mine["id"])
        again = life.admit({**_fields(), "tenant": "globex", "code_key": "k" * 64},
                           use_cache=True)
        assert again.job["parent_id"] == theirs.job["id"]  # globex's own leader
        assert life.code_donors(theirs.job) == []  # acme's compiled code is not globex's
        ours = life.admit({**_fields(), "tenant": "acme", "code_key": "k" * 64},
                          use_cache=True)
        assert ours.job["cache_hit"] and not ours.must_run  # acme's own hit
    finally:
        life.store.close()


def test_a_shared_hit_takes_the_bytes_and_nothing_of_the_job(tmp_path: Path,
                                                             url: str) -> None:
    life = _lifecycle(tmp_path, url, share_cache=True)
    try:
        first = life.admit({**_fields(), "tenant": "acme"}, use_cache=True).job
        _run_to_success(life, first["id"])
        hit = life.admit({**_fields(), "tenant": "globex"}, use_cache=True).job
        done = life.store.get(first["id"])
        assert done is not None
        assert hit["cache_hit"] and hit["tenant"] == "globex"
        assert hit["artifact_sha256"] == done["artifact_sha256"]
        assert hit["parent_id"] is None and hit["profile"] is None and hit["worker"] is None
        assert hit["timings"] == {} and hit["id"] != first["id"]
    finally:
        life.store.close()
