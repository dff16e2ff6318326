"""Real lowerings through the real server: archives, verification, paging, delete."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server
from tests.factories import artifact_store, submit, wait_for

pytestmark = pytest.mark.slow


def test_wait_returns_the_archive(linear: dict[str, Any]) -> None:
    response, job = linear["response"], linear["job"]
    assert response.headers["content-type"] == "application/zip"
    assert 'filename="linear-aoti.pt2"' in response.headers["content-disposition"]
    digest = hashlib.sha256(linear["archive"]).hexdigest()
    assert response.headers["etag"] == f'"{digest}"'
    assert job["status"] == "succeeded"
    assert job["artifact"] == {"sha256": digest, "size_bytes": len(linear["archive"]),
                               "url": f"/v1/lowerings/{job['id']}/artifact",
                               "expired_at": None, "expired_reason": None}


def test_archive_layout_and_provenance(linear: dict[str, Any]) -> None:
    with zipfile.ZipFile(io.BytesIO(linear["archive"])) as archive:
        names = archive.namelist()
        roots = {name.split("/", 1)[0] for name in names if "/" in name}
        rel = {name.split("/", 1)[1] for name in names if "/" in name}
        provenance_name = next(n for n in names if n.endswith("provenance.json"))
        provenance = json.loads(archive.read(provenance_name))
    assert {"models/linear.json", "models/linear-aoti.json"} <= rel, rel
    assert any(name.startswith("data/aotinductor/linear-aoti/") for name in rel)
    assert any(name.endswith(".so") for name in rel)
    # One root folder holding every member, as torch.export.load and our own gate expect.
    assert len(roots) == 1 and all("/" in name for name in names), names
    job = linear["job"]
    assert provenance["input_sha256"] == job["input"]["sha256"]
    assert provenance["verification"]["passed"] is True
    assert provenance["toolchain"]["torch_version"] == job["toolchain"]["torch_version"]
    assert provenance["service_version"] and provenance["device"] == "cpu"
    assert provenance["toolchain"]["compiler"] and provenance["toolchain"]["cpu_isa"]


def test_job_record_is_complete(linear: dict[str, Any], programs: Path) -> None:
    job = linear["job"]
    upload = (programs / "linear.pt2").read_bytes()
    assert job["input"] == {"sha256": hashlib.sha256(upload).hexdigest(),
                            "size_bytes": len(upload)}
    assert job["verification"]["passed"] is True
    assert len(job["verification"]["cases"]) >= 1
    assert set(job["timings"]) >= {"validate", "load", "lower", "package", "verify", "profile"}
    profile = job["profile"]  # measured in the sandbox, relayed through the checked result
    assert profile["eager_ms"] > 0 and profile["compiled_ms"] > 0 and profile["runs"] >= 3
    assert profile["speedup"] == pytest.approx(profile["eager_ms"] / profile["compiled_ms"],
                                               rel=1e-2)
    assert job["toolchain"]["compiler"] and job["toolchain"]["cpu_isa"]
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    assert job["error"] is None and job["phase"] is None


def test_artifact_download_range_and_etag(client: httpx.Client, linear: dict[str, Any]) -> None:
    job = linear["job"]
    url = job["artifact"]["url"]
    full = client.get(url)
    assert full.status_code == 200 and full.content == linear["archive"]
    part = client.get(url, headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == linear["archive"][:10]
    etag = full.headers["etag"]
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200


def test_log_list_and_paging(client: httpx.Client, linear: dict[str, Any]) -> None:
    job = linear["job"]
    log = client.get(f"/v1/lowerings/{job['id']}/log")
    assert log.status_code == 200 and "lowering job" in log.text
    page = client.get("/v1/lowerings", params={"model_name": "linear", "status": "succeeded"})
    assert job["id"] in [item["id"] for item in page.json()["items"]]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 1}
        if cursor:
            params["cursor"] = cursor
        body = client.get("/v1/lowerings", params=params).json()
        seen += [item["id"] for item in body["items"]]
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) and job["id"] in seen
    created = [client.get(f"/v1/lowerings/{i}").json()["created_at"] for i in seen]
    assert created == sorted(created, reverse=True)


def test_finished_job_conflicts(client: httpx.Client, linear: dict[str, Any]) -> None:
    job_id = linear["job"]["id"]
    response = client.post(f"/v1/lowerings/{job_id}/cancel")
    assert response.status_code == 409 and response.json()["error"]["code"] == "not_cancellable"


@pytest.mark.parametrize("name", ["convnet", "dict_io", "kwargs"])
def test_varied_models_lower_and_verify(client: httpx.Client, programs: Path, name: str) -> None:
    accepted = submit(client, programs / f"{name}.pt2", model_name=name)
    assert accepted.status_code == 202, accepted.text
    assert accepted.headers["location"] == f"/v1/lowerings/{accepted.json()['id']}"
    job = wait_for(client, accepted.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["verification"]["passed"] is True


def test_dynamic_batch_is_right_at_every_size(
    client: httpx.Client, programs: Path, tmp_path: Path
) -> None:
    response = submit(client, programs / "dynamic.pt2", wait=600, model_name="dyn")
    assert response.status_code == 200, response.text
    job = client.get(f"/v1/lowerings/{response.headers['x-lowering-id']}").json()
    cases = job["verification"]["cases"]
    assert len({json.dumps(case["input_shapes"]) for case in cases}) >= 2, cases
    # Independently of the service's own check: run the archive at sizes it never saw.
    archive = tmp_path / "dyn.pt2"
    archive.write_bytes(response.content)
    torch = pytest.importorskip("torch")
    from torch.export.pt2_archive._package import load_pt2

    from app.lowering.package import bind_constants

    package = load_pt2(str(archive))
    runner = bind_constants(package, model_name="dyn", backend_id="aoti")
    original = torch.export.load(str(programs / "dynamic.pt2")).module()
    for batch in (1, 7, 33):
        x = torch.randn(batch, 16)
        got = runner.loader.run([x])[0]
        assert got.shape[0] == batch
        torch.testing.assert_close(got, original(x), rtol=1e-4, atol=1e-4)


def test_delete_removes_everything(client: httpx.Client, server: Server, programs: Path) -> None:
    response = submit(client, programs / "linear.pt2", wait=600, model_name="to_delete",
                      verify=False)
    assert response.status_code == 200, response.text
    job_id = response.headers["x-lowering-id"]
    job = client.get(f"/v1/lowerings/{job_id}").json()
    assert job["verification"] is None
    assert client.delete(f"/v1/lowerings/{job_id}").status_code == 204
    assert client.get(f"/v1/lowerings/{job_id}").status_code == 404
    assert not (server.data_dir / "uploads" / f"{job_id}.pt2").exists()
    assert not (server.data_dir / "logs" / f"{job_id}.log").exists()
    sha = job["artifact"]["sha256"]
    assert not artifact_store(server.data_dir).exists(sha)
