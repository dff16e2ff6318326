"""Resumable uploads on LOWERING_STORAGE=s3, in process against a real moto server: parts
go straight to the bucket by presigned UploadPart URLs, the API lists them (ListParts),
completes, gates, keeps the gate's copy and copies it server-side to each job."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from app.storage.s3 import make_client
from tests.api.conftest import Api, make_api  # noqa: F401  (the fixture, in process)

pytestmark = pytest.mark.slow
MIB = 1024**2


@pytest.fixture
def s3(endpoint: str) -> tuple[Any, str]:
    client = make_client(endpoint_url=endpoint, region="us-east-1")
    name = f"up-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture
def s3_api(make_api: Callable[..., Api], endpoint: str,  # noqa: F811
           s3: tuple[Any, str]) -> Callable[..., Api]:
    def make(**overrides: Any) -> Api:
        return make_api(storage="s3", s3_endpoint_url=endpoint, s3_bucket=s3[1],
                        s3_prefix="svc", upload_part_bytes=5 * MIB, **overrides)
    return make


def _keys(s3: tuple[Any, str]) -> list[str]:
    client, bucket = s3
    return sorted(item["Key"] for item in
                  client.list_objects_v2(Bucket=bucket).get("Contents", []))


def _multipart(s3: tuple[Any, str]) -> list[str]:
    client, bucket = s3
    return [item["Key"] for item in
            client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text
    return str(response.json()["error"]["message"])


def test_parts_go_to_the_bucket_and_a_job_gets_a_server_side_copy(
    s3_api: Callable[..., Api], s3: tuple[Any, str], endpoint: str, programs: Path,
) -> None:
    api = s3_api(upload_ttl_s=3600)
    program = (programs / "linear.pt2").read_bytes()
    sha256 = hashlib.sha256(program).hexdigest()
    created = api.client.post("/v1/uploads", json={"size_bytes": len(program), "sha256": sha256})
    assert created.status_code == 201, created.text
    upload = created.json()
    assert upload["part_size_bytes"] == 5 * MIB and upload["part_count"] == 1
    url = urlsplit(upload["parts"][0]["url"])
    query = parse_qs(url.query)
    # moto does not check signatures or expiry: the signed query says what S3 would.
    assert f"{url.scheme}://{url.netloc}" == endpoint
    assert url.path == f"/{s3[1]}/svc/incoming/{upload['id']}.pt2"
    assert query["partNumber"] == ["1"] and query["uploadId"][0]
    assert 3500 <= int(query["X-Amz-Expires"][0]) <= 3600 and "X-Amz-Signature" in query
    # The API takes no part of an S3 upload itself.
    _error(api.client.request("PUT", f"/v1/uploads/{upload['id']}/parts/1", content=program),
           422, "invalid_part")
    assert httpx.put(upload["parts"][0]["url"], content=program).status_code == 200
    state = api.client.get(f"/v1/uploads/{upload['id']}").json()
    assert state["parts_received"] == [1] and state["parts"] == []

    done = api.client.post(f"/v1/uploads/{upload['id']}/complete")
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "ready" and done.json()["sha256"] == sha256
    assert _multipart(s3) == []
    assert _keys(s3) == [f"svc/uploads/kept/{upload['id']}.pt2"]

    submitted = api.client.post("/v1/lowerings", files={
        "model_name": (None, "hold_m"), "upload": (None, f"sha256:{sha256}")})
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert job["input"] == {"sha256": sha256, "size_bytes": len(program)}
    client, bucket = s3
    kept = client.get_object(Bucket=bucket, Key=f"svc/uploads/kept/{upload['id']}.pt2")
    copy = client.get_object(Bucket=bucket, Key=f"svc/uploads/{job['id']}.pt2")
    assert copy["Body"].read() == kept["Body"].read()
    again = api.client.post("/v1/uploads", json={"size_bytes": len(program), "sha256": sha256})
    assert again.status_code == 200 and again.json()["id"] == upload["id"]


def test_missing_and_misfit_parts_then_a_gate_refusal_keep_nothing(
    s3_api: Callable[..., Api], s3: tuple[Any, str],
) -> None:
    api = s3_api()
    data = os.urandom(11 * MIB)  # three parts: 5, 5 and 1 MiB; not a pt2 archive
    upload = api.client.post("/v1/uploads", json={"size_bytes": len(data)}).json()
    assert upload["part_count"] == 3
    urls = {part["number"]: part["url"] for part in upload["parts"]}
    complete = f"/v1/uploads/{upload['id']}/complete"
    for number in (1, 3):
        start = (number - 1) * 5 * MIB
        assert httpx.put(urls[number], content=data[start:start + 5 * MIB]).status_code == 200
    assert "parts: 2;" in _error(api.client.post(complete), 409, "parts_missing")
    assert httpx.put(urls[2], content=data[5 * MIB:9 * MIB]).status_code == 200  # too short
    assert "parts 2 of" in _error(api.client.post(complete), 422, "invalid_part")
    # A GET signs fresh URLs for what is missing or misfit: resume from there.
    resend = api.client.get(f"/v1/uploads/{upload['id']}").json()["parts"]
    assert [part["number"] for part in resend] == [2]
    assert httpx.put(resend[0]["url"], content=data[5 * MIB:10 * MIB]).status_code == 200
    _error(api.client.post(complete), 415, "not_a_pt2_archive")
    assert _multipart(s3) == [] and _keys(s3) == []
    assert api.client.get(f"/v1/uploads/{upload['id']}").json()["status"] == "failed"


def test_an_expired_upload_is_aborted(s3_api: Callable[..., Api], s3: tuple[Any, str]) -> None:
    api = s3_api(upload_ttl_s=0.5)
    first = api.client.post("/v1/uploads", json={"size_bytes": 100}).json()
    assert _multipart(s3) == [f"svc/incoming/{first['id']}.pt2"]
    time.sleep(0.6)
    second = api.client.post("/v1/uploads", json={"size_bytes": 100}).json()
    assert _multipart(s3) == [f"svc/incoming/{second['id']}.pt2"]
