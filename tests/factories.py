"""Helpers that build requests and hostile-or-broken files for the tests."""

from __future__ import annotations

import io
import os
import pickle
import socket
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from app.storage.artifacts import LocalArtifactStore
from app.storage.files import LocalUploadStore

if TYPE_CHECKING:
    from app.jobs.store import JobStore

FINAL = {"succeeded", "failed", "cancelled"}


def submit(
    client: httpx.Client, program: Path | bytes, *, wait: float | None = None,
    filename: str = "program.pt2", **fields: Any,
) -> httpx.Response:
    """POST /v1/lowerings with ``program`` and string-converted form ``fields``."""
    data = program.read_bytes() if isinstance(program, Path) else program
    form = {k: (v if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v))
            for k, v in fields.items()}
    params = {"wait": wait} if wait is not None else None
    return client.post("/v1/lowerings", params=params, data=form,
                       files={"program": (filename, data, "application/octet-stream")})


def wait_for(client: httpx.Client, job_id: str, *, until: set[str] | None = None,
             phase: str | None = None, timeout_s: float = 240) -> dict[str, Any]:
    """Poll a job until its status is in ``until`` (and ``phase`` matches if given)."""
    until = until or FINAL
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/lowerings/{job_id}").json()
        if job["status"] in until and (phase is None or job["phase"] == phase):
            return job
        if job["status"] in FINAL and job["status"] not in until:
            raise AssertionError(f"job ended {job['status']}: {job.get('error')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']}/{job['phase']}")
        time.sleep(0.1)


def zip_bytes(members: dict[str, bytes], *, compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def rewrite_zip(source: Path, *, drop: str = "", add: dict[str, bytes] | None = None) -> bytes:
    """A copy of ``source`` without members containing ``drop``, plus ``add``."""
    members: dict[str, bytes] = {}
    with zipfile.ZipFile(source) as archive:
        for info in archive.infolist():
            if not (drop and drop in info.filename):
                members[info.filename] = archive.read(info)
    members.update(add or {})
    return zip_bytes(members)


def leftover_uploads(data_dir: Path) -> list[str]:
    """Partial or rejected upload files still on disk (must be none)."""
    staging = LocalUploadStore(data_dir / "uploads").staging_dir
    return sorted(p.name for p in staging.glob("*")) if staging.is_dir() else []


def open_partial_upload(url: str, *, declared_bytes: int, sent_bytes: int) -> socket.socket:
    """A raw POST /v1/lowerings that declares ``declared_bytes`` and sends fewer (caller
    closes the socket): a client that dies or stalls mid-upload."""
    host, port = url.removeprefix("http://").split(":")
    head = (b"--b\r\nContent-Disposition: form-data; name=\"model_name\"\r\n\r\nm\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"program\"; filename=\"m.pt2\"\r\n"
            b"\r\n")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/lowerings HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: multipart/form-data; boundary=b\r\n"
                 + f"Content-Length: {declared_bytes}\r\n\r\n".encode() + head
                 + b"\0" * sent_bytes)
    return sock


def readyz_saying(client: httpx.Client, needle: str, *, timeout_s: float) -> httpx.Response:
    """Poll /readyz of a server still starting until its answer mentions ``needle``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ready = client.get("/readyz")
            if needle in ready.text or time.monotonic() > deadline:
                return ready
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


@contextmanager
def job_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty job database: ``sqlite`` (a file in ``tmp_path``) or
    ``postgresql`` (a fresh database, dropped afterwards; a skip when it is down)."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
        return
    from tests.integration.conftest import fresh_pg_database

    with fresh_pg_database() as url:
        yield url


def migrated_store(url: str) -> JobStore:
    """A JobStore on ``url`` after the migrations have made its tables (as the service does)."""
    from app.jobs import migrate
    from app.jobs.store import JobStore

    migrate.upgrade(url)
    return JobStore(url)


# ---- zip readers and hostile payloads, shared by the gate tests ---------------------------

def members_of(archive: Path | bytes) -> dict[str, bytes]:
    """Every member of a zip file (or of a zip's bytes), by name, in archive order."""
    source = archive if isinstance(archive, Path) else io.BytesIO(archive)
    with zipfile.ZipFile(source) as opened:
        return {info.filename: opened.read(info) for info in opened.infolist()}


def read_member(archive: Path, name: str) -> bytes:
    """The bytes of one member of a zip file."""
    with zipfile.ZipFile(archive) as opened:
        return opened.read(name)


class RunsShell:
    """Pickles as ``os.system(command)``: unpickling it runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


def evil_pickle(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when loaded: a file there proves something ran it."""
    return pickle.dumps(RunsShell(f"touch {marker}"), protocol=2)


def failed_job(response: httpx.Response) -> dict[str, Any]:
    """The job a ``?wait=`` submit answered as failed (422 job_failed, the job inside)."""
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "job_failed", error
    job: dict[str, Any] = error["lowering"]
    assert job["status"] == "failed" and job["id"] in error["message"]
    return job


def artifact_store(data_dir: Path) -> LocalArtifactStore:
    """The server's artifact store, read as the server reads it (never by path)."""
    return LocalArtifactStore(data_dir / "artifacts")


def stored_artifacts(data_dir: Path) -> list[str]:
    """The sha256 of every archive the local store holds: the one place tests list it."""
    root = data_dir / "artifacts"
    return sorted(p.stem for p in root.rglob("*.pt2")) if root.is_dir() else []
