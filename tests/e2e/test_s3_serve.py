"""A real server on LOWERING_STORAGE=s3 against a real moto server: lower, redirect, relay."""

from __future__ import annotations

import hashlib
import io
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from app.storage.s3 import make_client
from tests.conftest import CREDENTIALS, Server, free_port
from tests.factories import submit

pytestmark = pytest.mark.slow


@pytest.fixture
def bucket(endpoint: str) -> tuple[Any, str]:
    client = make_client(endpoint_url=endpoint, region="us-east-1")
    name = f"svc-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=name)
    return client, name


def _keys(client: Any, bucket: str) -> list[str]:
    return sorted(item["Key"] for item in
                  client.list_objects_v2(Bucket=bucket).get("Contents", []))


def _s3_server(start_server: Callable[..., Server], endpoint: str, bucket: str,
               data_dir: Path | None = None, **overrides: object) -> Server:
    return start_server(data_dir, storage="s3", s3_endpoint_url=endpoint, s3_bucket=bucket,
                        s3_prefix="svc", env_extra=CREDENTIALS, **overrides)


def test_lowered_archive_is_redirected_to_then_relayed(
    start_server: Callable[..., Server], programs: Path, endpoint: str,
    bucket: tuple[Any, str],
) -> None:
    client, name = bucket
    server = _s3_server(start_server, endpoint, name, s3_presign_s=120)
    with httpx.Client(base_url=server.url, timeout=600) as http:  # redirects not followed
        response = submit(http, programs / "linear.pt2", wait=600, model_name="linear")
        assert response.status_code == 307, response.text
        job_id = response.headers["x-lowering-id"]
        job = http.get(f"/v1/lowerings/{job_id}").json()
        again = http.get(f"/v1/lowerings/{job_id}/artifact")
    sha256 = job["artifact"]["sha256"]
    key = f"svc/artifacts/{sha256[:2]}/{sha256}.pt2"
    url = urlsplit(response.headers["location"])
    assert f"{url.scheme}://{url.netloc}" == endpoint and url.path == f"/{name}/{key}"
    assert parse_qs(url.query)["X-Amz-Expires"] == ["120"]  # moto does not enforce it
    assert response.headers["etag"] == f'"{sha256}"'
    archive = httpx.get(response.headers["location"]).content
    assert hashlib.sha256(archive).hexdigest() == sha256
    assert len(archive) == job["artifact"]["size_bytes"]
    with zipfile.ZipFile(io.BytesIO(archive)) as zipped:
        assert any(n.endswith("models/linear-aoti.json") for n in zipped.namelist())
    assert again.status_code == 307 and urlsplit(again.headers["location"]).path == url.path
    # Uploads, artifacts and the ended job's log are in the bucket, not in the data dir.
    assert _keys(client, name) == sorted([key, f"svc/uploads/{job_id}.pt2",
                                          f"svc/logs/{job_id}.log"])
    assert not list((server.data_dir / "artifacts").rglob("*.pt2"))
    assert not list((server.data_dir / "uploads").rglob("*.pt2"))
    assert not (server.data_dir / "logs" / f"{job_id}.log").exists()
    server.stop()

    relay = _s3_server(start_server, endpoint, name, server.data_dir, s3_downloads="stream")
    with httpx.Client(base_url=relay.url, timeout=600) as http:
        streamed = http.get(f"/v1/lowerings/{job_id}/artifact")
        job_log = http.get(f"/v1/lowerings/{job_id}/log")
        sealed = client.get_object(Bucket=name, Key=f"svc/logs/{job_id}.log")["Body"].read()
        head = http.head(f"/v1/lowerings/{job_id}/artifact")
        hit = submit(http, programs / "linear.pt2", wait=600, model_name="linear")
        hit_id = hit.headers["x-lowering-id"]
        assert http.delete(f"/v1/lowerings/{job_id}").status_code == 204
        assert http.delete(f"/v1/lowerings/{hit_id}").status_code == 204
    assert streamed.status_code == 200 and streamed.content == archive
    assert job_log.status_code == 200 and job_log.content == sealed and sealed  # from the bucket
    assert streamed.headers["content-type"] == "application/zip"
    assert streamed.headers["content-length"] == str(len(archive))
    assert streamed.headers["etag"] == f'"{sha256}"'
    assert 'filename="linear-aoti.pt2"' in streamed.headers["content-disposition"]
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(archive))
    assert hit.status_code == 200 and hit.content == archive and hit_id != job_id  # cache hit
    assert _keys(client, name) == []  # deleting the last job removed the artifact


@pytest.mark.parametrize("case", ["unreachable", "no bucket"])
def test_an_unusable_bucket_refuses_to_start_in_one_line(
    start_server: Callable[..., Server], endpoint: str, case: str,
) -> None:
    where = f"http://127.0.0.1:{free_port()}" if case == "unreachable" else endpoint
    server = start_server(storage="s3", s3_endpoint_url=where, s3_bucket="no-such-bucket",
                          env_extra=CREDENTIALS, ready=False)
    assert server.proc.wait(timeout=60) == 1
    log = server.log()
    refusals = [line for line in log.splitlines() if "cannot start:" in line]
    assert len(refusals) == 1, log
    assert "LOWERING_STORAGE=s3: bucket 'no-such-bucket'" in refusals[0]
    assert ("cannot connect" if case == "unreachable" else "no such bucket") in refusals[0]
    assert "Traceback" not in log


def test_a_fine_tune_reuses_compiled_code_from_the_bucket(
    start_server: Callable[..., Server], endpoint: str, bucket: tuple[Any, str],
    tmp_path: Path,
) -> None:
    import torch

    from tests.models import fine_tune

    for name, seed in (("base", 10), ("tuned", 11)):
        torch.export.save(fine_tune(seed), str(tmp_path / f"{name}.pt2"))
    server = _s3_server(start_server, endpoint, bucket[1], s3_downloads="stream")
    jobs = {}
    with httpx.Client(base_url=server.url, timeout=600) as http:
        for name in ("base", "tuned"):
            response = submit(http, tmp_path / f"{name}.pt2", wait=600, model_name="m")
            assert response.status_code == 200, response.text
            jobs[name] = http.get(f"/v1/lowerings/{response.headers['x-lowering-id']}").json()
            assert hashlib.sha256(response.content).hexdigest() == \
                jobs[name]["artifact"]["sha256"]
    # The donor archive was fetched from the bucket into a private dir, then removed.
    assert jobs["tuned"]["code_reused_from"] == jobs["base"]["id"]
    assert jobs["tuned"]["verification"]["passed"] is True
    assert not list((server.data_dir / "scratch").glob("donor-*"))
