"""Retention over HTTP, in process: an expired archive or log is 410 with when and why,
the job still reads, a resubmit builds anew, a sweep racing a download is 410 (not 500),
and /v1/info shows usage to whom it may."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.jobs.store import utcnow
from tests.api.conftest import Api, AuthApi
from tests.factories import submit

LATER = dt.timedelta(days=31)


@pytest.fixture
def linear(programs: Path) -> Path:
    return programs / "linear.pt2"


def _lowered(api: Api, linear: Path, name: str = "m") -> dict[str, Any]:
    response = submit(api.client, linear, wait=30, model_name=name)
    assert response.status_code == 200, response.text
    return dict(api.client.get(f"/v1/lowerings/{response.headers['x-lowering-id']}").json())


def _error(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return str(error["message"])


def test_an_expired_archive_is_410_with_when_and_why_and_a_resubmit_builds_it_anew(
        api: Api, linear: Path) -> None:
    job = _lowered(api, linear)
    url = f"/v1/lowerings/{job['id']}"
    sweep = api.services.janitor.retention.sweep(now=utcnow() + LATER)
    assert sweep.archives_ttl == 1

    message = _error(api.client.get(f"{url}/artifact"), 410, "artifact_expired")
    assert "LOWERING_ARTIFACT_TTL_S" in message and "30 d" in message
    assert f"{utcnow() + LATER:%Y-%m-%d}" in message and "Submit the program again" in message
    assert api.client.head(f"{url}/artifact").status_code == 410
    shown = api.client.get(url).json()
    assert shown["status"] == "succeeded"
    assert shown["artifact"]["expired_reason"] == "ttl" and shown["artifact"]["expired_at"]

    again = submit(api.client, linear, wait=30, model_name="m")
    assert again.status_code == 200 and again.content == b"archive of m"
    rebuilt = api.client.get(f"/v1/lowerings/{again.headers['x-lowering-id']}").json()
    assert not rebuilt["cache_hit"] and rebuilt["artifact"]["expired_at"] is None


def test_an_archive_evicted_for_the_budget_says_so(make_api: Callable[..., Api],
                                                    linear: Path) -> None:
    api = make_api(storage_budget_bytes=1, evict_grace_s=0)
    job = _lowered(api, linear)
    assert api.services.janitor.retention.sweep().archives_budget == 1
    message = _error(api.client.get(f"/v1/lowerings/{job['id']}/artifact"), 410,
                     "artifact_expired")
    assert "least recently used" in message and "LOWERING_STORAGE_BUDGET_BYTES" in message


def test_a_sweep_between_the_read_and_the_download_is_410_not_500(
        api: Api, linear: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = _lowered(api, linear)
    artifacts = api.services.artifacts
    checked = artifacts.is_intact

    def swept_first(sha256: str) -> bool:  # a replica's sweep lands right here
        api.services.janitor.retention.sweep(now=utcnow() + LATER)
        return checked(sha256)

    monkeypatch.setattr(artifacts, "is_intact", swept_first)
    response = api.client.get(f"/v1/lowerings/{job['id']}/artifact")
    assert "LOWERING_ARTIFACT_TTL_S" in _error(response, 410, "artifact_expired")


def test_a_download_records_a_use(api: Api, linear: Path) -> None:
    job = _lowered(api, linear)
    store = api.services.store
    assert store.get(job["id"])["last_used_at"] is None
    assert api.client.get(f"/v1/lowerings/{job['id']}/artifact").status_code == 200
    first_use = store.get(job["id"])["last_used_at"]
    assert first_use is not None
    assert api.client.get(f"/v1/lowerings/{job['id']}/artifact").status_code == 200
    assert store.get(job["id"])["last_used_at"] == first_use  # once a minute at most


def test_a_removed_log_is_410_log_expired(api: Api, linear: Path) -> None:
    job = _lowered(api, linear)
    api.services.logs.path(job["id"]).write_text("the worker's log\n")
    assert api.client.get(f"/v1/lowerings/{job['id']}/log").text == "the worker's log\n"
    assert api.services.janitor.retention.sweep(now=utcnow() + LATER).logs == 1
    message = _error(api.client.get(f"/v1/lowerings/{job['id']}/log"), 410, "log_expired")
    assert "LOWERING_LOG_TTL_S" in message
    assert api.client.get(f"/v1/lowerings/{job['id']}").json()["log_expired_at"]


def test_info_shows_retention_and_usage_with_auth_off(api: Api, linear: Path) -> None:
    _lowered(api, linear)
    info = api.client.get("/v1/info").json()
    assert info["retention"]["artifact_ttl_s"] == 30 * 86_400
    tenant, service = info["usage"]["tenant"], info["usage"]["service"]
    size = linear.stat().st_size
    assert tenant["name"] == "default" and tenant["active_jobs"] == 0
    assert tenant["stored_bytes"] == size + len(b"archive of m")
    assert service["archives"] == {"count": 1, "bytes": len(b"archive of m")}
    assert service["inputs"] == {"count": 1, "bytes": size}
    assert service["total_bytes"] == size + len(b"archive of m")
    assert service["last_sweep"] is not None  # the first sweep runs at start


def test_info_shows_a_tenant_its_own_usage_and_only_admins_the_services(
        make_auth_api: Callable[..., AuthApi]) -> None:
    auth = make_auth_api()
    assert auth.as_(None).get("/v1/info").json()["usage"] is None
    read = auth.as_("a_read").get("/v1/info").json()["usage"]
    assert read["tenant"]["name"] == "acme" and "service" not in read
    admin = auth.as_("b").get("/v1/info").json()["usage"]
    assert admin["tenant"]["name"] == "globex" and "total_bytes" in admin["service"]
    assert auth.as_("revoked").get("/v1/info").status_code == 401


def test_metrics_show_what_the_latest_sweep_found_stored(make_api: Callable[..., Api],
                                                         linear: Path) -> None:
    api = make_api(storage_budget_bytes=10**9)
    _lowered(api, linear)
    api.services.janitor.last = api.services.janitor.retention.sweep()
    text = api.client.get("/metrics").text
    assert f'lowering_storage_bytes{{kind="archives"}} {float(len(b"archive of m"))}' in text
    assert f'lowering_storage_bytes{{kind="inputs"}} {float(linear.stat().st_size)}' in text
    assert 'lowering_storage_bytes{kind="uploads"} 0.0' in text
    assert "lowering_storage_budget_bytes 1e+09" in text
