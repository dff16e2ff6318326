"""LOWERING_SANDBOX: required refuses jobs without bwrap and says why; off runs them loudly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Server
from tests.factories import readyz_saying, submit

pytestmark = pytest.mark.slow


def test_required_without_bwrap_refuses_jobs_and_names_what_is_missing(
    start_server: Callable[..., Server], programs: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    server = start_server(ready=False, workers=1, env_extra={"PATH": str(empty)})
    with server.client() as http:
        ready = readyz_saying(http, "bwrap", timeout_s=60)
        assert ready.status_code == 503
        assert "bwrap (bubblewrap) is not installed" in ready.json()["checks"]["sandbox"]
        assert "apt-get install bubblewrap" in ready.json()["checks"]["sandbox"]
        info = http.get("/v1/info").json()["sandbox"]
        assert info["mode"] == "required" and info["available"] is False
        refused = submit(http, programs / "linear.pt2", model_name="nope")
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "sandbox_unavailable" and "bwrap" in error["message"]
        assert http.get("/v1/lowerings").json()["items"] == []


def test_off_runs_jobs_unsandboxed_and_says_so_loudly(
    start_server: Callable[..., Server], programs: Path
) -> None:
    server = start_server(workers=1, sandbox="off", prime_workers="false")
    with server.client() as http:
        checks = http.get("/readyz").json()["checks"]
        assert checks["sandbox"].startswith("ok (off")
        assert http.get("/v1/info").json()["sandbox"]["mode"] == "off"
        done = submit(http, programs / "linear.pt2", wait=600, model_name="trusted")
        assert done.status_code == 200, done.text
    assert "UNSANDBOXED" in server.log()


def test_priming_again_over_a_primed_cache_and_a_job_compiling_the_same_code(
    start_server: Callable[..., Server], programs: Path, tmp_path: Path
) -> None:
    """Inductor rewrites some outputs in place when their hashed name exists: a job (or a
    second priming) that compiles code the shared cache already holds must not trip over
    the read-only cache."""
    cache = tmp_path / "inductor"
    first = start_server(workers=1, inductor_cache_dir=cache)
    first.stop()
    markers = list(cache.glob("primed-*.json"))
    assert len(markers) == 1
    markers[0].unlink()  # the next start primes again: the same code, already in the cache
    second = start_server(workers=1, inductor_cache_dir=cache)
    with second.client() as http:
        assert http.get("/v1/info").json()["executor"]["primed_s"] > 0
        done = submit(http, programs / "linear.pt2", wait=600, model_name="after_reprime")
        assert done.status_code == 200, done.text
