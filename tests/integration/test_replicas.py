"""Several processes on one job database (API replicas, worker hosts): coalescing and the
result cache hold across them, because admission takes a lock in the database
(JobStore.admission_lock), not one in the process."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from app.jobs.lifecycle import JobLifecycle
from app.jobs.store import JobStore
from app.storage.artifacts import LocalArtifactStore
from app.storage.files import LocalLogStore, LocalUploadStore
from tests.factories import migrated_store

ROUNDS = 40
REPLICAS = 3
FIELDS: dict[str, Any] = {"model_name": "m", "backend_id": "aoti", "device": "cpu",
                          "options": {}, "verify": True, "rtol": 1e-4, "atol": 1e-4,
                          "input_sha256": "0" * 64, "input_size_bytes": 1}


def _replica(url: str, data_dir: str, barrier: Any, results: Any) -> None:
    """One API replica: admits the same submissions as the others, in lockstep."""
    root = Path(data_dir)
    store = JobStore(url)
    life = JobLifecycle(store, uploads=LocalUploadStore(root / "uploads"),
                        logs=LocalLogStore(root / "logs"),
                        artifacts=LocalArtifactStore(root / "artifacts"),
                        dispatch=lambda job_id: None)
    try:
        for round_ in range(ROUNDS):
            barrier.wait(timeout=60)
            admission = life.admit({**FIELDS, "cache_key": f"{round_:064d}"},  # type: ignore[typeddict-item]
                                   use_cache=True)
            results.put((round_, admission.must_run))
    finally:
        store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return str(request.getfixturevalue("pg_url"))


def test_identical_submissions_to_several_replicas_compile_once(
        shared_url: str, tmp_path: Path) -> None:
    migrated_store(shared_url).close()
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(REPLICAS), context.Queue()
    replicas = [context.Process(target=_replica, args=(shared_url, str(tmp_path), barrier,
                                                       results)) for _ in range(REPLICAS)]
    for process in replicas:
        process.start()
    admitted = [results.get(timeout=120) for _ in range(ROUNDS * REPLICAS)]
    for process in replicas:
        process.join(timeout=60)
        assert process.exitcode == 0
    leaders = dict.fromkeys(range(ROUNDS), 0)
    for round_, must_run in admitted:
        leaders[round_] += must_run
    assert leaders == dict.fromkeys(range(ROUNDS), 1), \
        "a submission was compiled by more than one replica"
    store = JobStore(shared_url)
    try:
        jobs = store.list_page(limit=ROUNDS * REPLICAS + 1)
    finally:
        store.close()
    assert len(jobs) == ROUNDS * REPLICAS
    assert sum(job["parent_id"] is None for job in jobs) == ROUNDS
