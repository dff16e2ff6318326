"""GET /metrics in process: each event moves its counter by exactly its amount, once, and
the queue gauges read the job table as it is (fake executor; app.metrics says what counts
where)."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert, text
from sqlalchemy.dialects import sqlite

from app import metrics
from app.jobs import failures
from app.jobs.models import lowerings
from tests.api.conftest import Api
from tests.conftest import ROOT
from tests.factories import submit

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def linear(programs: Path) -> Path:
    return programs / "linear.pt2"


def scrape(api: Api) -> Samples:
    """Every sample of /metrics, by name and labels; the exposition must parse."""
    response = api.client.get("/metrics")  # no credentials: none are needed
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == metrics.CONTENT_TYPE
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"{key} appears twice"
            samples[key] = sample.value
    return samples


def at(samples: Samples, name: str, **labels: str) -> float:
    """One sample; a missing series fails (every bounded series exists from the start)."""
    return samples[(name, frozenset(labels.items()))]


def moved(before: Samples, after: Samples) -> dict[str, float]:
    """The samples that changed, as ``name{k=v,...}``: delta (gauges excluded)."""
    gauges = {"lowering_queue_depth", "lowering_jobs_running",
              "lowering_queue_oldest_age_seconds", "lowering_database_up"}
    changes = {}
    for key, value in after.items():
        name, labels = key
        if name in gauges or not name.startswith("lowering_"):
            continue
        delta = value - before.get(key, 0.0)
        if delta:
            rendered = ",".join(f"{k}={v}" for k, v in sorted(labels))
            changes[f"{name}{{{rendered}}}"] = round(delta, 6)
    return changes


def test_submit_hit_fail_and_refusal_move_their_counters_exactly(api: Api,
                                                                 linear: Path) -> None:
    size = linear.stat().st_size
    not_a_program = b"PK\x03\x04 not a zip at all" * 8
    before = scrape(api)
    done = submit(api.client, linear, wait=30, model_name="m")
    assert done.status_code == 200, done.text
    hit = submit(api.client, linear, wait=30, model_name="m")
    assert hit.status_code == 200, hit.text
    failed = submit(api.client, linear, wait=30, model_name="fail_me")
    assert failed.status_code == 422 and failed.json()["error"]["code"] == "job_failed"
    refused = submit(api.client, not_a_program, model_name="m")
    assert refused.status_code == 415, refused.text
    assert refused.json()["error"]["code"] == "not_a_pt2_archive"
    api.executor.settle()
    after = scrape(api)

    changes = moved(before, after)
    assert {k: v for k, v in changes.items() if "phase_seconds" not in k} == {
        "lowering_jobs_total{status=succeeded}": 2,  # the run and the cache hit
        "lowering_jobs_total{status=failed}": 1,
        "lowering_cache_hits_total{kind=result}": 1,
        "lowering_gate_refusals_total{code=not_a_pt2_archive}": 1,
        # Every program file received, the refused one too.
        "lowering_uploaded_bytes_total{via=submit}": 3 * size + len(not_a_program),
        "lowering_stored_bytes_total{}": len(b"archive of m"),  # the hit stored nothing
    }
    # validate: the three jobs that ended (the refused upload never became one); lower:
    # the one job that ran (the fake executor's timings say 0.1 s).
    assert changes["lowering_phase_seconds_count{phase=validate}"] == 3
    assert changes["lowering_phase_seconds_bucket{le=+Inf,phase=validate}"] == 3
    assert changes["lowering_phase_seconds_sum{phase=validate}"] > 0
    assert changes["lowering_phase_seconds_count{phase=lower}"] == 1
    assert changes["lowering_phase_seconds_sum{phase=lower}"] == 0.1
    assert changes["lowering_phase_seconds_bucket{le=0.1,phase=lower}"] == 1
    assert "lowering_phase_seconds_bucket{le=0.05,phase=lower}" not in changes
    for phase in ("load", "package", "verify", "profile"):
        assert at(after, "lowering_phase_seconds_count", phase=phase) == at(
            before, "lowering_phase_seconds_count", phase=phase)
    assert at(after, "lowering_queue_depth") == 0
    assert at(after, "lowering_jobs_running") == 0
    assert at(after, "lowering_queue_oldest_age_seconds") == 0
    assert at(after, "lowering_database_up") == 1


def test_queue_gauges_followers_cancel_and_a_crash(api: Api, linear: Path) -> None:
    lifecycle = api.services.lifecycle
    before = scrape(api)
    leader = submit(api.client, linear, model_name="hold_a").json()
    follower = submit(api.client, linear, model_name="hold_a").json()
    assert follower["coalesced_with"] == leader["id"]
    queued = scrape(api)
    # The follower rides along: one job needs a worker.
    assert at(queued, "lowering_queue_depth") == 1
    assert at(queued, "lowering_jobs_running") == 0
    assert 0 <= at(queued, "lowering_queue_oldest_age_seconds") < 60
    assert moved(before, queued) == {
        "lowering_cache_hits_total{kind=coalesced}": 1,
        "lowering_uploaded_bytes_total{via=submit}": 2 * linear.stat().st_size,
    }

    assert lifecycle.claim(leader["id"], worker_pid=None) is not None
    running = scrape(api)
    assert at(running, "lowering_queue_depth") == 0
    assert at(running, "lowering_jobs_running") == 1
    assert at(running, "lowering_queue_oldest_age_seconds") == 0

    # The sandbox dies: the leader fails worker_crashed and its follower with it (the same
    # code, inherited): one crash, two failed jobs.
    assert lifecycle.fail(leader["id"], failures.died(returncode=-9, signal=9))
    assert api.client.get(f"/v1/lowerings/{follower['id']}").json()["status"] == "failed"
    held = submit(api.client, linear, model_name="hold_c").json()
    assert api.client.post(f"/v1/lowerings/{held['id']}/cancel").status_code == 200
    after = scrape(api)
    assert at(after, "lowering_queue_depth") == 0
    assert at(after, "lowering_jobs_running") == 0
    changes = moved(queued, after)
    assert {k: v for k, v in changes.items() if "phase_seconds" not in k} == {
        "lowering_jobs_total{status=failed}": 2,
        "lowering_jobs_total{status=cancelled}": 1,
        "lowering_worker_crashes_total{}": 1,
        "lowering_uploaded_bytes_total{via=submit}": linear.stat().st_size,
    }
    # Failed jobs report the phases in their timings (validate here), cancelled ones none.
    assert changes["lowering_phase_seconds_count{phase=validate}"] == 2


def test_webhook_deliveries_are_counted_by_bounded_outcome(api: Api) -> None:
    before = scrape(api)
    metrics.record_webhook_delivery("delivered")
    metrics.record_webhook_delivery("delivered")
    metrics.record_webhook_delivery("failed")
    metrics.record_webhook_delivery("https://receiver.example/hook?job=123")  # never a label
    metrics.record_worker_recycle("after_job")
    metrics.record_worker_recycle("not a reason")  # ignored
    assert moved(before, scrape(api)) == {
        "lowering_webhook_deliveries_total{outcome=delivered}": 2,
        "lowering_webhook_deliveries_total{outcome=failed}": 1,
        "lowering_webhook_deliveries_total{outcome=other}": 1,
        "lowering_worker_recycles_total{reason=after_job}": 1,
    }


def test_a_scrape_reads_only_the_active_jobs(api: Api) -> None:
    """Thousands of finished jobs: the gauges come from the status index (no table scan)
    and a scrape answers well under a second."""
    now = dt.datetime.now(dt.UTC)
    base = {"model_name": "m", "backend_id": "b", "device": "cpu", "options": {},
            "verify": True, "rtol": 1e-4, "atol": 1e-4, "input_sha256": "0" * 64,
            "input_size_bytes": 1, "timings": {}, "attempts": 0, "cache_hit": False,
            "parent_id": None}
    statuses = ["succeeded"] * 4000 + ["failed"] * 900 + ["cancelled"] * 50
    statuses += ["queued"] * 40 + ["running"] * 8
    rows = [{**base, "id": uuid.uuid4().hex, "status": status,
             "created_at": now - dt.timedelta(seconds=len(statuses) - i)}
            for i, status in enumerate(statuses)]
    rows += [{**base, "id": uuid.uuid4().hex, "status": "queued", "parent_id": rows[-9]["id"],
              "created_at": now - dt.timedelta(days=1)}]  # a follower: not waiting itself
    engine = api.services.store.engine
    with engine.begin() as conn:
        conn.execute(insert(lowerings), rows)
    started = time.monotonic()
    for _ in range(3):
        samples = scrape(api)
    assert (time.monotonic() - started) / 3 < 0.5
    assert at(samples, "lowering_queue_depth") == 40
    assert at(samples, "lowering_jobs_running") == 8
    # The first of the 40 queued rows was made 48 s before now (the follower is older, but
    # it does not wait for a worker).
    assert 48 <= at(samples, "lowering_queue_oldest_age_seconds") < 120

    query = metrics.JobStateCollector.query().compile(
        dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        plan = " | ".join(str(row[-1]) for row in conn.execute(
            text(f"EXPLAIN QUERY PLAN {query}")))
    assert "SEARCH lowerings USING INDEX ix_lowerings_status" in plan, plan  # (status, ...)
    assert "SCAN lowerings" not in plan, plan


def test_metrics_never_import_torch() -> None:
    code = ("import sys; import app.main, app.api.routes.metrics; from app import metrics; "
            "metrics.exposition(); assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr

