"""A gate bomb against the real server: refused with a 4xx, and the API process stays small.

The upload is a ~100 KB .pt2 whose weights config is a deflated 64 MiB JSON array of
empty lists (~1.5 GB of Python objects once parsed). The server runs with the caps that
would stop it early loosened (ratio, config size, JSON value count), so it reaches the
parser: the gate's child process must hit its own memory limit, the answer must be 422
``upload_too_complex``, and the API process's peak RSS (VmHWM) must stay under 1 GiB.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tests.factories import leftover_uploads, submit

GiB = 1024**3


def _bomb(source: Path, mib: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(
            buffer, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for info in original.infolist():
            payload = original.read(info)
            if info.filename.endswith("_weights_config.json"):
                payload = b"[" + b"[]," * (mib * 1024 * 1024 // 3) + b"[]]"
            out.writestr(info.filename, payload)
    return buffer.getvalue()


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def loose_server(start_server: Callable[..., Server]) -> Server:
    return start_server(
        workers=1, prime_workers="false", max_upload_bytes=64 * 1024**2,
        archive_max_ratio=1 << 30, archive_max_total_bytes=1 << 31,
        archive_max_member_bytes=1 << 31, graph_max_json_bytes=1 << 30,
        archive_max_config_bytes=1 << 30, archive_max_json_values=1 << 40,
        gate_max_memory_bytes=384 * 1024**2, gate_concurrency=2)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_bomb_upload_is_refused_and_the_api_stays_small(loose_server: Server,
                                                        programs: Path) -> None:
    payload = _bomb(programs / "linear.pt2", 64)
    assert len(payload) < 1024**2
    with httpx.Client(base_url=loose_server.url, timeout=120) as client:
        for _ in range(2):  # twice: the gate's memory is not the API's, every time
            response = submit(client, payload, model_name="bomb")
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert error["code"] == "upload_too_complex", error
            assert "memory" in error["message"]
        peak = _peak_rss(loose_server.proc.pid)
        print(f"API peak RSS (VmHWM) after two bomb uploads: {peak / 2**20:.0f} MiB")
        assert peak < GiB, f"API peak RSS {peak / 2**20:.0f} MiB"
        assert client.get("/healthz").json() == {"status": "ok"}
        assert response.headers.get("content-type", "").startswith("application/json")
        assert client.get("/v1/lowerings").json()["items"] == []  # no job was recorded
    assert leftover_uploads(loose_server.data_dir) == []
