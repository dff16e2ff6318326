"""In-process route tests: ``create_app`` over httpx's ASGI transport with a fake
executor. The routes, the lifecycle, the real SQLite store, the local stores and the
upload gate's child are real; only the sandboxed lowering is replaced by a script."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi import FastAPI

from app.constants import ErrorCode
from app.errors import JobError
from app.jobs.store import JobRecord
from app.main import create_app
from app.settings import Settings
from app.worker import JobContext

TOOLCHAIN = {"torch_version": "2.13.0", "cpu_isa": "AVX2", "compiler": "g++ 12",
             "cuda_devices": 0}


class FakeExecutor:
    """Plays each submitted job by its model_name: ``hold*`` stays queued, ``fail*``
    fails as a lowering failure, anything else succeeds with a small archive."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.toolchain: dict[str, Any] | None = dict(TOOLCHAIN)
        self.probe_error: str | None = None
        self.runs_jobs_here = True
        self.submitted: list[str] = []
        self.stopped: list[str] = []
        self._threads: list[threading.Thread] = []

    def toolchain_for(self, device: str) -> dict[str, Any] | None:
        return self.toolchain

    @property
    def ready(self) -> bool:
        return self.probe_error is None

    @property
    def unavailable(self) -> str | None:
        return self.probe_error

    def start(self) -> None:
        pass

    def submit(self, job_id: str) -> None:
        self.submitted.append(job_id)
        thread = threading.Thread(target=self._play, args=(job_id,))
        self._threads.append(thread)
        thread.start()

    def _play(self, job_id: str) -> None:
        lifecycle = self.ctx.lifecycle
        queued = lifecycle.store.get(job_id)
        if queued is None or queued["model_name"].startswith("hold"):
            return
        job = lifecycle.claim(job_id, worker_pid=None)
        if job is None:
            return
        if job["model_name"].startswith("fail"):
            lifecycle.fail(job_id, JobError(ErrorCode.LOWERING_FAILED, "the compiler said no"))
            return
        ref = self.ctx.artifacts.put_stream(io.BytesIO(f"archive of {job['model_name']}"
                                                       .encode()))
        lifecycle.succeed(job_id, artifact=ref, timings={"lower": 0.1},
                          verification={"passed": True, "cases": []},
                          toolchain=self.toolchain, resources=None)

    def cancel(self, job_id: str) -> bool:
        self.stopped.append(job_id)
        return False

    def job_finished(self, job: JobRecord) -> None:
        if job["status"] == "cancelled":
            self.cancel(job["id"])

    def info(self) -> dict[str, Any]:
        return {"kind": "fake", "workers": 1, "ready": self.ready, "slots": [],
                "sandbox": None, "limits": {}}

    def settle(self) -> None:
        """Wait until every job played so far has done what it will do."""
        for thread in list(self._threads):
            thread.join(timeout=30)

    def close(self) -> None:
        self.settle()


class _Verbs:
    """get/head/post/put/delete over the subclass's ``request``."""

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        raise NotImplementedError

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def head(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("HEAD", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", url, **kwargs)


class AsgiClient(_Verbs):
    """A blocking facade over ``httpx.AsyncClient(transport=ASGITransport(app))`` with the
    app's lifespan run, so sync tests (and tests.factories helpers) can use it."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._portal_cm = start_blocking_portal()
        self.portal: BlockingPortal = self._portal_cm.__enter__()
        self._lifespan = app.router.lifespan_context(app)
        self.portal.call(self._lifespan.__aenter__)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        self.http = httpx.AsyncClient(transport=transport, base_url="http://api", timeout=60)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def send() -> httpx.Response:
            return await self.http.request(method, url, **kwargs)

        return self.portal.call(send)

    def close(self) -> None:
        try:
            self.portal.call(self.http.aclose)
            self.portal.call(self._lifespan.__aexit__, None, None, None)
        finally:
            self._portal_cm.__exit__(None, None, None)


@dataclass
class Api:
    client: AsgiClient
    executor: FakeExecutor
    settings: Settings

    @property
    def services(self) -> Any:
        return self.client.app.state.services


@pytest.fixture
def make_api(tmp_path: Path) -> Iterator[Callable[..., Api]]:
    """Factory: an app on a fresh data dir with LOWERING_* settings overridden."""
    clients: list[AsgiClient] = []

    def make(**overrides: Any) -> Api:
        made: list[FakeExecutor] = []

        def executor(ctx: JobContext) -> FakeExecutor:
            made.append(FakeExecutor(ctx))
            return made[0]

        settings = Settings(data_dir=tmp_path / f"data{len(clients)}", workers=1,
                            prime_workers=False, **overrides)
        client = AsgiClient(create_app(settings, make_executor=executor))
        clients.append(client)
        return Api(client, made[0], settings)

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    return make_api()


# -- LOWERING_AUTH=required ---------------------------------------------------------------

PEPPER = "pepper-for-tests-0123456789abcdef"
# name: (tenant, scopes); every key made before the app starts (it refuses to start keyless).
KEYS = {"a": ("acme", "admin"), "b": ("globex", "admin"), "a_read": ("acme", "read"),
        "a_submit": ("acme", "submit"), "revoked": ("acme", "admin")}


class KeyedClient(_Verbs):
    """The app's client, every request sent with one key (or none)."""

    def __init__(self, client: AsgiClient, key: str | None) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return self.client.request(method, url, headers=headers, **kwargs)



@dataclass
class AuthApi:
    """An app with LOWERING_AUTH=required, and a client per key of KEYS (``as_("a")``)."""

    api: Api
    keys: dict[str, str]
    key_ids: dict[str, str]

    def as_(self, name: str | None) -> KeyedClient:
        return KeyedClient(self.api.client, self.keys[name] if name else None)


@pytest.fixture
def make_auth_api(make_api: Callable[..., Api], tmp_path: Path) -> Callable[..., AuthApi]:
    """Factory: an app with auth required over a database holding the keys of KEYS."""
    from app.auth import KeyStore
    from app.jobs import migrate
    from app.jobs.store import JobStore

    def make(**overrides: Any) -> AuthApi:
        url = f"sqlite:///{tmp_path / f'auth-{len(list(tmp_path.iterdir()))}.db'}"
        migrate.upgrade(url)
        store = JobStore(url)
        keys: dict[str, str] = {}
        ids: dict[str, str] = {}
        try:
            made = KeyStore(store.engine, PEPPER)
            for name, (tenant, scope) in KEYS.items():
                keys[name], row = made.create(tenant=tenant, scopes=[scope])
                ids[name] = row["id"]
            made.revoke(ids["revoked"])
        finally:
            store.close()
        api = make_api(auth="required", auth_pepper=PEPPER, database_url=url, **overrides)
        return AuthApi(api, keys, ids)

    return make
