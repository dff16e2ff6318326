"""Liveness, readiness and what this service offers."""

from __future__ import annotations

import os
import uuid
from typing import Any

from anyio import to_thread
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app import __version__
from app.api.deps import ExecutorDep, SettingsDep, StoreDep
from app.constants import TIMING_KEYS, Phase
from app.jobs.store import JobStore
from app.options import ALLOWED_OPTIONS
from app.settings import Settings

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and answering."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(settings: SettingsDep, store: StoreDep, executor: ExecutorDep) -> JSONResponse:
    """Ready when a job submitted now will run: sandbox, primed workers, DB, data dir."""
    checks = await to_thread.run_sync(_checks, settings, store)
    state = executor.info()
    sandbox = state.get("sandbox") or {}
    if sandbox.get("mode") == "off":
        checks["sandbox"] = "ok (off: jobs run unsandboxed)"
    else:
        checks["sandbox"] = "ok" if sandbox.get("available") else (
            sandbox.get("missing") or "checking")
    checks["workers"] = "ok" if executor.ready else (executor.unavailable or _slots(state))
    ready = all(value.startswith("ok") for value in checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                        status_code=200 if ready else 503)


def _slots(state: dict[str, Any]) -> str:
    errors = [slot["error"] for slot in state.get("slots", []) if slot.get("error")]
    return f"not ready: {errors[0]}" if errors else "starting"


def _checks(settings: Settings, store: JobStore) -> dict[str, str]:
    checks = {}
    try:
        store.ping()
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    probe = settings.data_dir / f".ready-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
        checks["data_dir"] = "ok"
    except OSError as exc:
        checks["data_dir"] = f"error: {exc.strerror}"
    return checks


@router.get("/v1/info")
async def info(settings: SettingsDep, executor: ExecutorDep) -> dict[str, Any]:
    """Versions, devices, workers, limits and the allowed AOTInductor options."""
    toolchain = executor.toolchain or {}
    devices = ["cpu"] + [f"cuda:{i}" for i in range(int(toolchain.get("cuda_devices") or 0))]
    state = executor.info()
    return {
        "service": {"name": "lowering-service", "version": __version__},
        "torch_version": toolchain.get("torch_version"),
        "toolchain": toolchain or None,
        "devices": devices,
        "executor": state,
        "sandbox": state.get("sandbox"),
        "limits": {
            "max_upload_bytes": settings.max_upload_bytes,
            "job_timeout_s": settings.job_timeout_s,
            "max_wait_s": settings.max_wait_s,
            "archive": settings.archive_limits().as_dict(),
        },
        "verification": {
            "default_rtol": settings.verify_rtol, "default_atol": settings.verify_atol,
        },
        "phases": [phase.value for phase in Phase],
        "timings": list(TIMING_KEYS),
        "options": {key: spec.describe() for key, spec in ALLOWED_OPTIONS.items()},
        "preload_modules": settings.preload_modules,
        "pid": os.getpid(),
    }
