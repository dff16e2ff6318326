"""The HTTP contract of /v1/lowerings, in process: statuses, bodies, headers, paging,
?wait, cancel, delete and artifact serving, with the lowering played by a fake executor."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import Api
from tests.factories import submit


@pytest.fixture
def linear(programs: Path) -> Path:
    return programs / "linear.pt2"


def _error(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    return dict(body["error"])


def test_submit_queues_and_answers_202_with_a_location(api: Api, linear: Path) -> None:
    response = submit(api.client, linear, model_name="hold_me")
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/lowerings/{job['id']}"
    assert job["status"] == "queued" and job["input"]["size_bytes"] == linear.stat().st_size
    assert job["input"]["sha256"] == hashlib.sha256(linear.read_bytes()).hexdigest()
    assert set(job["timings"]) == {"validate"}
    assert api.executor.submitted == [job["id"]]
    assert api.client.get(job_url := f"/v1/lowerings/{job['id']}").json()["status"] == "queued"
    assert api.client.get(f"{job_url}/log").text == ""


def test_wait_answers_the_archive_then_etag_304_and_head(api: Api, linear: Path) -> None:
    response = submit(api.client, linear, wait=30, model_name="m")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert response.content == b"archive of m"
    sha = hashlib.sha256(b"archive of m").hexdigest()
    assert response.headers["etag"] == f'"{sha}"'
    url = f"/v1/lowerings/{response.headers['x-lowering-id']}/artifact"
    assert api.client.get(url, headers={"If-None-Match": f'W/"{sha}"'}).status_code == 304
    assert api.client.get(url, headers={"If-None-Match": '"other"'}).content == b"archive of m"
    head = api.client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(b"archive of m"))


def test_wait_on_a_failed_job_is_an_error_carrying_the_job(api: Api, linear: Path) -> None:
    response = submit(api.client, linear, wait=30, model_name="fail_me")
    assert response.status_code == 422, response.text
    error = _error(response)
    assert error["code"] == "job_failed" and "the compiler said no" in error["message"]
    assert error["lowering"]["status"] == "failed"
    assert error["lowering"]["error"]["code"] == "lowering_failed"


def test_wait_that_runs_out_answers_202(api: Api, linear: Path) -> None:
    response = submit(api.client, linear, wait=0.3, model_name="hold_long")
    assert response.status_code == 202 and response.json()["status"] == "queued"
    assert response.headers["location"].endswith(response.json()["id"])


def test_identical_submission_is_a_cache_hit(api: Api, linear: Path) -> None:
    first = submit(api.client, linear, wait=30, model_name="m")
    second = submit(api.client, linear, wait=30, model_name="m")
    assert second.status_code == 200 and second.content == first.content
    job = api.client.get(f"/v1/lowerings/{second.headers['x-lowering-id']}").json()
    assert job["cache_hit"] and len(api.executor.submitted) == 1
    bypass = api.client.post("/v1/lowerings", params={"cache": "bypass", "wait": 30},
                             data={"model_name": "m"},
                             files={"program": ("p.pt2", linear.read_bytes())})
    assert bypass.status_code == 200 and len(api.executor.submitted) == 2


def test_cancel(api: Api, linear: Path) -> None:
    job = submit(api.client, linear, model_name="hold_me").json()
    follower = submit(api.client, linear, model_name="hold_me").json()
    assert follower["coalesced_with"] == job["id"]
    cancelled = api.client.post(f"/v1/lowerings/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert api.executor.stopped == [job["id"]]
    # The identical job that waited on it takes the work over.
    assert api.executor.submitted == [job["id"], follower["id"]]
    again = api.client.post(f"/v1/lowerings/{job['id']}/cancel")
    assert again.status_code == 409 and _error(again)["code"] == "not_cancellable"
    assert api.client.post("/v1/lowerings/nope/cancel").status_code == 404


def test_delete_keeps_a_shared_archive_until_the_last_job(api: Api, linear: Path) -> None:
    first = submit(api.client, linear, wait=30, model_name="m").headers["x-lowering-id"]
    hit = submit(api.client, linear, wait=30, model_name="m").headers["x-lowering-id"]
    held = submit(api.client, linear, model_name="hold_me").json()["id"]
    refused = api.client.delete(f"/v1/lowerings/{held}")
    assert refused.status_code == 409 and _error(refused)["code"] == "job_active"
    assert api.client.delete(f"/v1/lowerings/{first}").status_code == 204
    assert api.client.get(f"/v1/lowerings/{first}").status_code == 404
    assert api.client.get(f"/v1/lowerings/{hit}/artifact").content == b"archive of m"
    assert api.client.delete(f"/v1/lowerings/{hit}").status_code == 204
    sha = hashlib.sha256(b"archive of m").hexdigest()
    assert not api.services.artifacts.exists(sha)
    assert api.client.delete(f"/v1/lowerings/{hit}").status_code == 404


def test_artifact_of_an_unfinished_job_is_409(api: Api, linear: Path) -> None:
    job = submit(api.client, linear, model_name="hold_me").json()
    response = api.client.get(f"/v1/lowerings/{job['id']}/artifact")
    assert response.status_code == 409 and _error(response)["code"] == "artifact_not_ready"


def test_a_corrupt_archive_is_never_served(api: Api, linear: Path) -> None:
    done = submit(api.client, linear, wait=30, model_name="m")
    path = api.services.artifacts.location(hashlib.sha256(done.content).hexdigest())
    path.write_bytes(b"flipped bits")
    response = api.client.get(f"/v1/lowerings/{done.headers['x-lowering-id']}/artifact")
    assert response.status_code == 500 and _error(response)["code"] == "artifact_corrupt"


def test_an_object_store_location_is_a_redirect(api: Api, linear: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    done = submit(api.client, linear, wait=30, model_name="m")
    monkeypatch.setattr(api.services.artifacts, "location",
                        lambda sha: f"https://objects.example/{sha}?signed")
    response = api.client.get(f"/v1/lowerings/{done.headers['x-lowering-id']}/artifact",
                              follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"].startswith("https://objects.example/")


def test_list_pages_newest_first(api: Api, linear: Path) -> None:
    ids = [submit(api.client, linear, model_name=f"hold_{i}").json()["id"] for i in range(5)]
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.client.get("/v1/lowerings", params=params).json()
        seen += [job["id"] for job in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    only = api.client.get("/v1/lowerings", params={"model_name": "hold_3"}).json()["items"]
    assert [job["id"] for job in only] == [ids[3]]
    assert api.client.get("/v1/lowerings", params={"status": "bogus"}).status_code == 422


def test_queue_bound_answers_429_with_retry_after(make_api: Callable[..., Api],
                                                  linear: Path) -> None:
    api = make_api(max_queued=1)
    assert submit(api.client, linear, model_name="hold_a").status_code == 202
    full = submit(api.client, linear, model_name="hold_b")
    assert full.status_code == 429 and _error(full)["code"] == "queue_full"
    assert int(full.headers["retry-after"]) >= 5
    # Nothing of the refused upload is kept.
    uploads = api.settings.uploads_dir
    assert sorted(p.name for p in uploads.glob("*.pt2")) == [
        f"{api.executor.submitted[0]}.pt2"]


def test_no_sandbox_means_503_before_the_upload(api: Api, linear: Path) -> None:
    api.executor.probe_error = "sandbox unavailable: bwrap not found"
    response = submit(api.client, linear, model_name="m")
    assert response.status_code == 503 and _error(response)["code"] == "sandbox_unavailable"
    assert "bwrap" in _error(response)["message"]


@pytest.mark.parametrize("job_id", ["x" * 65, "a%00b", "..%2Fetc", "0" * 32])
def test_unknown_or_impossible_ids_are_404(api: Api, job_id: str) -> None:
    for method, suffix in (("GET", ""), ("GET", "/artifact"), ("GET", "/log"),
                           ("POST", "/cancel"), ("DELETE", "")):
        response = api.client.request(method, f"/v1/lowerings/{job_id}{suffix}")
        assert response.status_code == 404, (method, suffix, response.text)
        assert _error(response)["code"] == "not_found"


def test_the_openapi_document_describes_the_form_and_errors(api: Api) -> None:
    spec = api.client.get("/openapi.json").json()
    post = spec["paths"]["/v1/lowerings"]["post"]
    form = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["model_name"]  # and the program file or a ready upload
    assert {"program", "upload"} <= set(form["properties"])
    assert form["properties"]["backend_id"]["default"] == "aoti"
    assert "422" in post["responses"] and "429" in post["responses"]


def test_wait_on_a_cancelled_job_is_409_carrying_the_job(api: Api, linear: Path) -> None:
    import threading

    job: dict[str, Any] = {}

    def cancel_when_queued() -> None:
        while not api.executor.submitted:
            threading.Event().wait(0.05)
        job_id = api.executor.submitted[0]
        job.update(api.services.lifecycle.cancel(job_id))

    canceller = threading.Thread(target=cancel_when_queued)
    canceller.start()
    response = submit(api.client, linear, wait=30, model_name="hold_then_cancel")
    canceller.join()
    assert response.status_code == 409, response.text
    error = _error(response)
    assert error["code"] == "job_cancelled" and error["lowering"]["id"] == job["id"]
    assert error["lowering"]["status"] == "cancelled"


def test_an_unreachable_database_is_503_with_retry_after(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.jobs.store import make_engine

    dead = make_engine("postgresql+psycopg://postgres@127.0.0.1:9/none?connect_timeout=2")
    monkeypatch.setattr(api.services.store, "engine", dead)
    response = api.client.get(f"/v1/lowerings/{'0' * 32}")
    assert response.status_code == 503, response.text
    assert _error(response)["code"] == "service_unavailable"
    assert response.headers["retry-after"] == "5"
    ready = api.client.get("/readyz").json()
    assert ready["status"] == "not_ready" and ready["checks"]["database"].startswith("error")


def test_code_keys_pair_fine_tunes_and_skip_value_dependent_code(
        api: Api, tmp_path: Path) -> None:
    """The job's code key (what worker._take_compiled matches on) is the same for another
    fine-tune of the same structure, so the earlier job is offered as its donor; it is
    absent under options whose code depends on weight values and under ?cache=bypass."""
    import torch

    from tests.models import fine_tune

    paths = []
    for seed in (1, 2):
        paths.append(tmp_path / f"seed{seed}.pt2")
        torch.export.save(fine_tune(seed), str(paths[-1]))
    store, lifecycle = api.executor.ctx.lifecycle.store, api.executor.ctx.lifecycle
    first = submit(api.client, paths[0], wait=30, model_name="m")
    assert first.status_code == 200
    donor = store.get(first.headers["x-lowering-id"])
    tuned = store.get(submit(api.client, paths[1], model_name="hold_m").json()["id"])
    same = store.get(submit(api.client, paths[1], model_name="m").json()["id"])
    assert donor and tuned and same and donor["code_key"] and same["code_key"]
    assert same["code_key"] == donor["code_key"] != tuned["code_key"]  # names are in it
    assert [job["id"] for job in lifecycle.code_donors(same)] == [donor["id"]]
    embedded = submit(api.client, paths[1], model_name="hold_e",
                      options='{"aot_inductor.package_constants_in_so": true}')
    bypassed = api.client.post("/v1/lowerings", params={"cache": "bypass"},
                               data={"model_name": "hold_b"},
                               files={"program": ("p.pt2", paths[1].read_bytes())})
    for response in (embedded, bypassed):
        job = store.get(response.json()["id"])
        assert job is not None and job["code_key"] is None
        assert lifecycle.code_donors(job) == []
