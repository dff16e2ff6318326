"""One upload, several targets (the submit form's ``targets``): one job per target sharing
the gated upload, each with its own input, keys and admission; a bad target, a repeat, or
a refused admission leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.schemas import MAX_TARGETS
from tests.api.conftest import TOOLCHAIN, Api, AuthApi
from tests.factories import leftover_uploads, submit, wait_for

THREE = [{"device": "cpu", "options": {"cpp.march": "x86-64-v2"}},
         {"device": "cpu", "options": {"cpp.march": "x86-64-v3"}},
         {"device": "cuda"}]


@pytest.fixture
def linear(programs: Path) -> Path:
    return programs / "linear.pt2"


@pytest.fixture
def gpu_api(make_api: Callable[..., Api]) -> Api:
    """A host with one CUDA device, so "cuda" is a target it takes."""
    api = make_api()
    api.executor.toolchain = {**TOOLCHAIN, "cuda_devices": 1}
    return api


def _targets(client: Any, program: Path, targets: Any, **fields: Any) -> httpx.Response:
    text = targets if isinstance(targets, str) else json.dumps(targets)
    return submit(client, program, targets=text, **{"model_name": "m", **fields})


def _jobs(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 202, response.text
    body = response.json()
    assert set(body) == {"lowerings"} and "location" not in response.headers
    return list(body["lowerings"])


def _inputs(api: Api) -> list[str]:
    return sorted(p.name for p in api.settings.uploads_dir.glob("*.pt2"))


def test_three_targets_are_three_jobs_sharing_the_input(gpu_api: Api, linear: Path) -> None:
    jobs = _jobs(_targets(gpu_api.client, linear, THREE, options='{"freezing": true}'))
    assert [(job["device"], job["options"]) for job in jobs] == [
        ("cpu", {"freezing": True, "cpp.march": "x86-64-v2"}),
        ("cpu", {"freezing": True, "cpp.march": "x86-64-v3"}),
        ("cuda", {"freezing": True})]
    sha = hashlib.sha256(linear.read_bytes()).hexdigest()
    assert {job["input"]["sha256"] for job in jobs} == {sha}
    assert len({job["id"] for job in jobs}) == 3
    store = gpu_api.services.store
    keys = [store.get(job["id"])["cache_key"] for job in jobs]
    assert None not in keys and len(set(keys)) == 3
    assert [wait_for(gpu_api.client, job["id"])["status"] for job in jobs] == ["succeeded"] * 3

    again = _jobs(_targets(gpu_api.client, linear, THREE, options='{"freezing": true}'))
    assert [job["cache_hit"] for job in again] == [True, True, True]
    assert [store.get(job["id"])["cache_key"] for job in again] == keys
    assert leftover_uploads(gpu_api.settings.data_dir) == []


def test_one_target_is_answered_as_a_list_and_a_plain_submit_is_unchanged(
        api: Api, linear: Path) -> None:
    assert len(_jobs(_targets(api.client, linear, [{"device": "cpu"}]))) == 1
    plain = submit(api.client, linear, model_name="m", targets="  ")  # blank: absent
    assert plain.status_code == 202 and plain.headers["location"].endswith(plain.json()["id"])


@pytest.mark.parametrize(("targets", "code", "needle"), [
    ("[{", "invalid_parameter", "targets must be a JSON array of objects"),
    ('{"device": "cpu"}', "invalid_parameter", f"JSON array of 1 to {MAX_TARGETS} objects"),
    ("[]", "invalid_parameter", f"JSON array of 1 to {MAX_TARGETS} objects"),
    ([{"device": "cpu", "options": {"cpp.march": f"x86-64-v{n % 4 + 1}"}, "x": n}
      for n in range(MAX_TARGETS + 1)], "invalid_parameter", f"1 to {MAX_TARGETS} objects"),
    ([{"device": "cpu"}, "cuda"], "invalid_parameter", "targets[1] must be an object"),
    ([{"device": "cpu"}, {}], "invalid_parameter", "targets[1] must be an object"),
    ([{"device": "cpu", "march": "v3"}], "invalid_parameter", "targets[0] must be an object"),
    ([{"options": "{}"}], "invalid_parameter", "targets[0].options must be a JSON object"),
    ([{"device": "cpu"}, {"device": "tpu"}], "invalid_device",
     "targets[1]: device 'tpu' must be cpu, cuda or cuda:N"),
    ([{"device": "cpu"}, {"device": "cpu", "options": {"cpp.march": "x86-64-v3"}},
      {"options": {"no.such.option": 1}}], "unknown_option", "targets[2]: "),
    ([{"device": "cpu"}, {"device": "cuda:0"}], "device_unavailable", "targets[1]: device"),
    ([{"device": "cpu"}, {"device": " CPU "}], "invalid_parameter",
     "targets[1] repeats targets[0]"),
    ([{"options": {"cpp.march": "x86-64-v3"}}, {"device": "cpu"},
      {"device": "cpu", "options": {"cpp.march": "x86-64-v3"}}], "invalid_parameter",
     "targets[2] repeats targets[0]"),
])
def test_a_bad_target_refuses_the_whole_submit(
        api: Api, linear: Path, targets: Any, code: str, needle: str) -> None:
    response = _targets(api.client, linear, targets)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code and needle in error["message"], error
    assert api.client.get("/v1/lowerings").json()["items"] == []
    assert api.executor.submitted == [] and _inputs(api) == []
    assert leftover_uploads(api.settings.data_dir) == []


def test_wait_with_targets_is_refused(api: Api, linear: Path) -> None:
    response = submit(api.client, linear, wait=5, model_name="m", targets='[{"device": "cpu"}]')
    assert response.status_code == 422 and "?wait" in response.json()["error"]["message"]
    assert api.client.get("/v1/lowerings").json()["items"] == [] and _inputs(api) == []


def test_each_job_has_its_own_input(gpu_api: Api, linear: Path) -> None:
    jobs = _jobs(_targets(gpu_api.client, linear, THREE, model_name="hold_m"))
    paths = [gpu_api.settings.uploads_dir / f"{job['id']}.pt2" for job in jobs]
    assert len({path.stat().st_ino for path in paths}) == 3  # copies, not links
    gated = paths[0].read_bytes()  # the gate's rebuilt copy, the same for every job
    client = gpu_api.client
    assert client.post(f"/v1/lowerings/{jobs[0]['id']}/cancel").status_code == 200
    assert client.delete(f"/v1/lowerings/{jobs[0]['id']}").status_code == 204
    assert not paths[0].exists()
    for job, path in zip(jobs[1:], paths[1:], strict=True):
        assert path.read_bytes() == gated
        assert client.get(f"/v1/lowerings/{job['id']}").json()["status"] == "queued"


def test_targets_of_a_ready_upload_each_adopt_a_copy(gpu_api: Api, linear: Path) -> None:
    data = linear.read_bytes()
    client = gpu_api.client
    upload = client.post("/v1/uploads", json={"size_bytes": len(data)}).json()
    size = upload["part_size_bytes"]
    for part in upload["parts"]:
        start = (part["number"] - 1) * size
        assert client.request("PUT", part["url"], content=data[start:start + size]
                              ).status_code == 200
    assert client.post(f"/v1/uploads/{upload['id']}/complete").status_code == 200
    form = {"model_name": "hold_m", "upload": upload["id"], "targets": json.dumps(THREE)}
    jobs = _jobs(client.post("/v1/lowerings",
                             files={name: (None, value) for name, value in form.items()}))
    assert len(jobs) == 3 and len(_inputs(gpu_api)) == 3
    assert {job["input"]["sha256"] for job in jobs} == {hashlib.sha256(data).hexdigest()}


def test_a_quota_that_fits_some_targets_admits_none(
        make_auth_api: Callable[..., AuthApi], linear: Path) -> None:
    auth = make_auth_api(tenant_max_active_jobs=2)
    a = auth.as_("a")
    three = [{"options": {"cpp.march": f"x86-64-v{n}"}} for n in (2, 3, 4)]
    over = _targets(a, linear, three, model_name="hold_m")
    assert over.status_code == 429 and over.json()["error"]["code"] == "tenant_quota"
    assert int(over.headers["retry-after"]) > 0
    assert a.get("/v1/lowerings").json()["items"] == [] and _inputs(auth.api) == []
    assert len(_jobs(_targets(a, linear, three[:2], model_name="hold_m"))) == 2
