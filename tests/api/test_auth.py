"""LOWERING_AUTH=required in process: keys (401), scopes (403), tenants (every other
tenant's object is 404 and never listed), the cache's sharing rule, and quotas (429)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import AuthApi, KeyedClient
from tests.factories import submit


@pytest.fixture
def linear(programs: Path) -> Path:
    return programs / "linear.pt2"


@pytest.fixture
def auth(make_auth_api: Callable[..., AuthApi]) -> AuthApi:
    return make_auth_api()


def _error(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return str(error["message"])


# -- keys -----------------------------------------------------------------------------


def test_no_key_a_garbage_key_a_wrong_secret_and_a_revoked_key_are_401(
        auth: AuthApi, linear: Path) -> None:
    real = auth.keys["a"]
    prefix, key_id, secret = real.split("_")
    wrong_secret = f"{prefix}_{key_id}_{'0' * 64 if secret != '0' * 64 else '1' * 64}"
    unknown_id = f"{prefix}_{'f' * 16}_{secret}"
    headers: list[dict[str, Any]] = [
        {}, {"Authorization": "Bearer"}, {"Authorization": "Bearer nonsense"},
        {"Authorization": f"Basic {real}"}, {"Authorization": f"Bearer {real}x"},
        {"Authorization": f"Bearer {wrong_secret}"}, {"Authorization": f"Bearer {unknown_id}"},
        {"Authorization": f"Bearer {auth.keys['revoked']}"},
        {"Authorization": ("Bearer " + "\u00e9" * 4_000).encode("latin-1")},  # type: ignore[dict-item]
    ]
    for header in headers:
        for method, url in [("GET", "/v1/lowerings"), ("GET", "/v1/lowerings/" + "a" * 32),
                            ("GET", "/v1/webhooks"), ("POST", "/v1/uploads"),
                            ("GET", "/metrics")]:
            response = auth.api.client.request(method, url, headers=header)
            _error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"].startswith("Bearer")
        # The upload is refused before a byte of it is read.
        response = auth.api.client.post("/v1/lowerings", headers=header,
                                        data={"model_name": "m"},
                                        files={"program": ("p.pt2", linear.read_bytes())})
        _error(response, 401, "unauthorized")
    assert auth.api.executor.submitted == []
    # The wrong secret and the unknown id read the same: nothing to learn about ids.
    same = {auth.api.client.get("/v1/lowerings", headers=h).json()["error"]["message"]
            for h in headers[5:8]}
    assert len(same) == 1


def test_health_info_and_docs_need_no_key(auth: AuthApi) -> None:
    for path in ("/healthz", "/readyz", "/v1/info", "/openapi.json"):
        assert auth.api.client.get(path).status_code != 401, path


def test_a_missing_scope_is_403_naming_it(auth: AuthApi, linear: Path) -> None:
    reader, submitter = auth.as_("a_read"), auth.as_("a_submit")
    assert reader.get("/v1/lowerings").status_code == 200
    message = _error(submit(reader, linear, model_name="m"), 403, "forbidden_scope")
    assert "'submit'" in message
    _error(reader.post("/v1/uploads", json={"size_bytes": 10}), 403, "forbidden_scope")
    for response in (submitter.get("/v1/webhooks"), submitter.get("/metrics"),
                     submitter.post("/v1/webhooks", json={"url": "https://example.com",
                                                          "events": ["lowering.failed"]})):
        assert "'admin'" in _error(response, 403, "forbidden_scope")
    job = submit(submitter, linear, model_name="hold_me").json()
    assert reader.get(f"/v1/lowerings/{job['id']}").status_code == 200
    _error(reader.post(f"/v1/lowerings/{job['id']}/cancel"), 403, "forbidden_scope")
    _error(reader.delete(f"/v1/lowerings/{job['id']}"), 403, "forbidden_scope")
    assert submitter.post(f"/v1/lowerings/{job['id']}/cancel").status_code == 200
    assert auth.as_("a").get("/metrics").status_code == 200


def test_a_used_key_records_when(auth: AuthApi) -> None:
    from app.auth import KeyStore

    auth.as_("a_read").get("/v1/lowerings")
    rows = {row["id"]: row for row in KeyStore(auth.api.services.store.engine, None).all()}
    assert rows[auth.key_ids["a_read"]]["last_used_at"] is not None
    assert rows[auth.key_ids["b"]]["last_used_at"] is None
    assert all("key_hmac" not in row for row in rows.values())


def test_a_key_revoked_while_its_event_stream_is_open_ends_the_stream(
        auth: AuthApi, linear: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from app.api.routes import lowerings as routes
    from app.auth import KeyStore

    monkeypatch.setattr(routes, "EVENTS_POLL_S", 0.02)
    monkeypatch.setattr(routes, "EVENTS_KEY_CHECK_S", 0.1)
    client = auth.as_("a_read")
    job = submit(auth.as_("a"), linear, model_name="hold_me").json()  # stays queued
    keys = KeyStore(auth.api.services.store.engine, None)
    revoke = threading.Timer(0.5, keys.revoke, args=[auth.key_ids["a_read"]])
    revoke.start()
    response = client.get(f"/v1/lowerings/{job['id']}/events", params={"wait": 30})
    revoke.join()
    assert response.status_code == 200
    last = response.text.strip().split("\n\n")[-1].splitlines()
    assert last[0] == "event: error"
    error = json.loads(last[1].removeprefix("data: "))["error"]
    assert error["code"] == "unauthorized" and "revoked" in error["message"]
    assert response.elapsed.total_seconds() < 10  # not the 30 s it asked for
    # A key that stays valid keeps its stream to the end.
    still = auth.as_("a").get(f"/v1/lowerings/{job['id']}/events", params={"wait": 1})
    assert "event: error" not in still.text


# -- tenants ----------------------------------------------------------------------------


def test_a_list_cursor_is_made_of_the_callers_own_job_alone(auth: AuthApi,
                                                             linear: Path) -> None:
    import datetime as dt

    mine, theirs = auth.as_("a"), auth.as_("b")
    first = submit(mine, linear, model_name="hold_1").json()
    for n in range(3):  # another tenant's jobs in between: nothing of them may show
        assert submit(theirs, linear, model_name=f"hold_b{n}").status_code == 202
    second = submit(mine, linear, model_name="hold_2").json()
    page = mine.get("/v1/lowerings", params={"limit": 1}).json()
    assert [job["id"] for job in page["items"]] == [second["id"]]
    created = dt.datetime.fromisoformat(second["created_at"])
    micros = (created - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
    assert page["next_cursor"] == f"{micros}.{second['id']}"
    rest = mine.get("/v1/lowerings", params={"limit": 1, "cursor": page["next_cursor"]}).json()
    assert [job["id"] for job in rest["items"]] == [first["id"]]
    assert rest["next_cursor"] is None


def _same_shape(mine: Any, unknown: Any, job_id: str, other_id: str) -> None:
    """Another tenant's id answers exactly as an id that never existed."""
    assert mine.status_code == unknown.status_code == 404
    assert mine.json()["error"]["code"] == unknown.json()["error"]["code"] == "not_found"
    assert (mine.json()["error"]["message"].replace(job_id, "X")
            == unknown.json()["error"]["message"].replace(other_id, "X"))


def test_another_tenants_job_is_404_everywhere_and_never_listed(
        auth: AuthApi, linear: Path) -> None:
    a, b = auth.as_("a"), auth.as_("b")
    done = submit(a, linear, wait=30, model_name="m")
    assert done.status_code == 200, done.text
    done_id = done.headers["x-lowering-id"]
    held_id = submit(a, linear, model_name="hold_me").json()["id"]
    unknown_id = "0" * 32
    for job_id in (done_id, held_id):
        for method, suffix in [("GET", ""), ("GET", "/artifact"), ("HEAD", "/artifact"),
                               ("GET", "/log"), ("GET", "/events"), ("POST", "/cancel"),
                               ("DELETE", "")]:
            mine = b.request(method, f"/v1/lowerings/{job_id}{suffix}")
            unknown = b.request(method, f"/v1/lowerings/{unknown_id}{suffix}")
            if method == "HEAD":
                assert mine.status_code == unknown.status_code == 404
                continue
            _same_shape(mine, unknown, job_id, unknown_id)
        assert job_id not in json.dumps(b.get("/v1/lowerings?limit=500").json())
        assert job_id not in json.dumps(b.get("/v1/lowerings?status=queued").json())
    assert b.get("/v1/lowerings").json()["items"] == []
    # Nothing B tried touched A's jobs.
    assert a.get(f"/v1/lowerings/{held_id}").json()["status"] == "queued"
    assert a.get(f"/v1/lowerings/{done_id}/artifact").status_code == 200
    assert {job["id"] for job in a.get("/v1/lowerings").json()["items"]} == {done_id, held_id}
    # A's own key on the same routes works (control).
    assert a.post(f"/v1/lowerings/{held_id}/cancel").status_code == 200
    assert a.delete(f"/v1/lowerings/{held_id}").status_code == 204


def _submit_upload(client: KeyedClient, name: str, model_name: str) -> Any:
    form = {"model_name": model_name, "upload": name}
    return client.post("/v1/lowerings", files={k: (None, v) for k, v in form.items()})


def _upload(client: KeyedClient, data: bytes) -> dict[str, Any]:
    sha = hashlib.sha256(data).hexdigest()
    made = client.post("/v1/uploads", json={"size_bytes": len(data), "sha256": sha})
    assert made.status_code == 201, made.text
    upload = made.json()
    assert client.put(f"/v1/uploads/{upload['id']}/parts/1", content=data).status_code == 200
    done = client.post(f"/v1/uploads/{upload['id']}/complete")
    assert done.status_code == 200 and done.json()["status"] == "ready", done.text
    return dict(done.json())


def test_an_upload_is_its_tenants_by_id_and_by_sha256(auth: AuthApi, linear: Path) -> None:
    a, b = auth.as_("a"), auth.as_("b")
    data = linear.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    upload = _upload(a, data)
    # B knows the sha256 and the id: neither hands it A's upload.
    again = b.post("/v1/uploads", json={"size_bytes": len(data), "sha256": sha})
    assert again.status_code == 201 and again.json()["id"] != upload["id"], again.text
    for name in (f"sha256:{sha}", upload["id"]):
        _error(_submit_upload(b, name, "m"), 404, "unknown_upload")
    _error(b.get(f"/v1/uploads/{upload['id']}"), 404, "unknown_upload")
    _error(b.post(f"/v1/uploads/{upload['id']}/complete"), 404, "unknown_upload")
    _error(b.put(f"/v1/uploads/{upload['id']}/parts/1", content=data), 404, "unknown_upload")
    # A's own: reused by sha256 (200), and submittable.
    assert a.post("/v1/uploads", json={"size_bytes": len(data), "sha256": sha}).status_code == 200
    assert _submit_upload(a, f"sha256:{sha}", "hold").status_code == 202


def test_webhooks_are_per_tenant_and_hear_only_their_tenants_jobs(
        make_auth_api: Callable[..., AuthApi], linear: Path) -> None:
    auth = make_auth_api(webhook_allow_private=True)
    a, b = auth.as_("a"), auth.as_("b")
    made = a.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook",
                                        "events": ["lowering.succeeded"]})
    assert made.status_code == 201, made.text
    hook = made.json()["id"]
    assert b.get("/v1/webhooks").json()["items"] == []
    for method, suffix in [("GET", ""), ("GET", "/deliveries"), ("DELETE", "")]:
        _error(b.request(method, f"/v1/webhooks/{hook}{suffix}"), 404, "unknown_webhook")
    assert submit(b, linear, wait=30, model_name="m").status_code == 200
    auth.api.executor.settle()
    assert a.get(f"/v1/webhooks/{hook}/deliveries").json()["items"] == []
    assert submit(a, linear, wait=30, model_name="m2").status_code == 200
    auth.api.executor.settle()
    items = a.get(f"/v1/webhooks/{hook}/deliveries").json()["items"]
    assert len(items) == 1
    assert [h["id"] for h in a.get("/v1/webhooks").json()["items"]] == [hook]


# -- the cache --------------------------------------------------------------------------


def test_the_cache_is_per_tenant_by_default(auth: AuthApi, linear: Path) -> None:
    a, b = auth.as_("a"), auth.as_("b")
    first = submit(a, linear, wait=30, model_name="m")
    assert first.status_code == 200
    hit = submit(a, linear, model_name="m").json()
    assert hit["cache_hit"] is True  # within a tenant, as before
    theirs = submit(b, linear, wait=30, model_name="m")
    assert theirs.status_code == 200, theirs.text
    job = b.get(f"/v1/lowerings/{theirs.headers['x-lowering-id']}").json()
    assert job["cache_hit"] is False  # B's own lowering ran
    assert len(auth.api.executor.submitted) == 2
    # An active job of A is never B's leader either.
    held = submit(a, linear, model_name="hold_x").json()
    other = submit(b, linear, model_name="hold_x").json()
    assert other["coalesced_with"] is None and held["id"] not in json.dumps(other)


def test_shared_cache_hands_over_bytes_but_nothing_of_the_other_job(
        make_auth_api: Callable[..., AuthApi], linear: Path) -> None:
    auth = make_auth_api(share_cache_across_tenants=True)
    a, b = auth.as_("a"), auth.as_("b")
    first = submit(a, linear, wait=30, model_name="m")
    a_id = first.headers["x-lowering-id"]
    second = submit(b, linear, wait=30, model_name="m")
    assert second.status_code == 200 and second.content == first.content
    b_id = second.headers["x-lowering-id"]
    job = b.get(f"/v1/lowerings/{b_id}").json()
    assert job["cache_hit"] is True and job["coalesced_with"] is None
    assert job.get("profile") is None and job.get("worker") is None
    assert job["timings"] == {"validate": job["timings"]["validate"]}
    shown = json.dumps(job) + json.dumps(b.get("/v1/lowerings").json()) + second.headers.get(
        "x-lowering-id", "") + b.get(f"/v1/lowerings/{b_id}/events").text
    assert a_id not in shown
    # Coalescing stays within a tenant even when results are shared.
    held = submit(a, linear, model_name="hold_y").json()
    assert submit(b, linear, model_name="hold_y").json()["coalesced_with"] is None
    assert held["id"] not in json.dumps(b.get("/v1/lowerings").json())
    # Deleting B's job keeps the archive A's job references.
    assert b.delete(f"/v1/lowerings/{b_id}").status_code == 204
    assert a.get(f"/v1/lowerings/{a_id}/artifact").content == first.content


# -- quotas -----------------------------------------------------------------------------


def test_active_jobs_quota_is_429_with_retry_after_per_tenant(
        make_auth_api: Callable[..., AuthApi], linear: Path) -> None:
    auth = make_auth_api(tenant_max_active_jobs=2)
    a, b = auth.as_("a"), auth.as_("b")
    ids = [submit(a, linear, model_name=f"hold_{n}").json()["id"] for n in range(2)]
    over = submit(a, linear, model_name="hold_2")
    assert "LOWERING_TENANT_MAX_ACTIVE_JOBS" in _error(over, 429, "tenant_quota")
    assert int(over.headers["retry-after"]) > 0
    assert submit(a, linear, model_name="hold_1").status_code == 429  # a follower counts too
    assert submit(b, linear, model_name="hold_0").status_code == 202  # B has its own quota
    assert len(a.get("/v1/lowerings").json()["items"]) == 2
    assert a.post(f"/v1/lowerings/{ids[0]}/cancel").status_code == 200
    assert submit(a, linear, model_name="hold_3").status_code == 202


def test_storage_quota_is_429_for_submits_and_uploads(
        make_auth_api: Callable[..., AuthApi], linear: Path) -> None:
    size = linear.stat().st_size
    auth = make_auth_api(tenant_max_storage_bytes=size + size // 2)
    a, b = auth.as_("a"), auth.as_("b")
    assert submit(a, linear, wait=30, model_name="m").status_code == 200
    over = submit(a, linear, model_name="m2")
    assert "LOWERING_TENANT_MAX_STORAGE_BYTES" in _error(over, 429, "tenant_quota")
    assert "retry-after" in over.headers
    # A cache hit would store the input again: refused too; nothing of it is kept.
    _error(submit(a, linear, model_name="m"), 429, "tenant_quota")
    assert len(a.get("/v1/lowerings").json()["items"]) == 1
    _error(a.post("/v1/uploads", json={"size_bytes": size}), 429, "tenant_quota")
    assert b.post("/v1/uploads", json={"size_bytes": size}).status_code == 201
    job_id = a.get("/v1/lowerings").json()["items"][0]["id"]
    assert a.delete(f"/v1/lowerings/{job_id}").status_code == 204
    assert submit(a, linear, model_name="m3").status_code == 202


def test_auth_off_is_tenant_default_with_every_scope(api: Any, linear: Path) -> None:
    job = submit(api.client, linear, wait=30, model_name="m")
    assert job.status_code == 200
    stored = api.services.store.get(job.headers["x-lowering-id"])
    assert stored["tenant"] == "default"
    assert api.client.get("/metrics").status_code == 200
    assert api.client.get("/v1/webhooks").status_code == 200


def test_a_tenants_own_quota_overrides_the_default(
        make_auth_api: Callable[..., AuthApi], linear: Path) -> None:
    auth = make_auth_api(tenant_max_active_jobs=3)
    auth.api.services.store.set_tenant_limits(tenant="acme", max_active_jobs=1,
                                              max_storage_bytes=None)
    a, b = auth.as_("a"), auth.as_("b")
    assert submit(a, linear, model_name="hold_0").status_code == 202
    assert "=1" in _error(submit(a, linear, model_name="hold_1"), 429, "tenant_quota")
    assert [submit(b, linear, model_name=f"hold_{n}").status_code for n in range(4)] == [
        202, 202, 202, 429]
