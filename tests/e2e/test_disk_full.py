"""A full disk: clear 4xx/5xx answers, readiness that tells, and DELETE that still works."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Server
from tests.factories import readyz_saying, stored_artifacts, submit

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of its own at ``where`` (mounting needs root, as CI runs)."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """1.2 GiB: room for priming (inductor's precompiled headers), then filled."""
    with _tmpfs(tmp_path / "disk", "1200m") as mount:
        yield mount


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """48 MiB: too small for inductor's precompiled headers."""
    with _tmpfs(tmp_path / "tiny", "48m") as mount:
        yield mount


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    block = b"\0" * (1 << 20)
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(block)
                handle.flush()
        except OSError:
            pass
    assert shutil.disk_usage(disk).free < (1 << 20)
    return filler


def test_full_disk_is_507_not_500_and_delete_frees_space(
    start_server: Callable[..., Server], programs: Path, small_disk: Path
) -> None:
    server = start_server(small_disk / "data", workers=1)
    assert (small_disk / "data" / ".reserve").is_file()
    with server.client() as http:
        done = submit(http, programs / "linear.pt2", wait=600, model_name="fits", verify=False)
        assert done.status_code == 200, done.text
        job_id = done.headers["x-lowering-id"]
        filler = _fill(small_disk)

        ready = http.get("/readyz")
        assert ready.status_code == 503 and "space" in ready.json()["checks"]["data_dir"]
        again = submit(http, programs / "linear.pt2", model_name="fits", verify=False)
        assert again.status_code == 507, again.text  # even a cache hit needs its upload
        assert again.json()["error"]["code"] == "storage_full"
        assert "DELETE" in again.json()["error"]["message"]

        deleted = http.delete(f"/v1/lowerings/{job_id}")
        assert deleted.status_code == 204, deleted.text
        assert http.get(f"/v1/lowerings/{job_id}").status_code == 404
        assert stored_artifacts(small_disk / "data") == []

        filler.unlink()
        server.wait_ready(timeout_s=30)


def test_priming_that_runs_out_of_space_is_not_ready(
    start_server: Callable[..., Server], tiny_disk: Path, programs: Path
) -> None:
    server = start_server(tiny_disk / "data", ready=False, workers=1,
                          inductor_cache_dir=tiny_disk / "inductor")
    with server.client() as http:
        ready = readyz_saying(http, "priming failed", timeout_s=300)
        assert ready.status_code == 503, ready.text
        assert "priming failed" in ready.json()["checks"]["workers"]
        refused = submit(http, programs / "linear.pt2", model_name="no_room")
        assert refused.status_code == 503, refused.text
