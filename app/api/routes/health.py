"""Liveness, readiness and what this service offers."""

from __future__ import annotations

import os
import uuid
from typing import Any

from anyio import to_thread
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app import __version__
from app.api.deps import CallerDep, ExecutorDep, Services, ServicesDep, SettingsDep, StoreDep
from app.auth import Principal, Scope
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
async def info(settings: SettingsDep, executor: ExecutorDep, services: ServicesDep,
               caller: CallerDep) -> dict[str, Any]:
    """Versions, devices, workers, limits, retention, the allowed AOTInductor options;
    and what is stored: the caller's tenant's usage and quota (with a key, or while auth
    is off), the whole service's (with the admin scope, or while auth is off)."""
    usage = await to_thread.run_sync(_usage, services, caller)
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
        "retention": services.janitor.retention.describe() if services.janitor else None,
        "usage": usage,
    }


def _usage(services: Services, caller: Principal | None) -> dict[str, Any] | None:
    if caller is None:
        return None
    quota = services.lifecycle.quota_for(caller.tenant)
    usage: dict[str, Any] = {"tenant": {
        "name": caller.tenant,
        "stored_bytes": services.store.stored_bytes(tenant=caller.tenant),
        "max_storage_bytes": quota.max_storage_bytes,
        "active_jobs": services.store.count_active(tenant=caller.tenant),
        "max_active_jobs": quota.max_active_jobs,
    }}
    janitor = services.janitor
    if Scope.ADMIN in caller.scopes and janitor is not None:
        stored = janitor.retention.usage()
        budget = services.settings.storage_budget_bytes
        usage["service"] = {
            "archives": {"count": stored.archives, "bytes": stored.archive_bytes},
            "inputs": {"count": stored.inputs, "bytes": stored.input_bytes},
            "uploads": {"count": stored.uploads, "bytes": stored.upload_bytes},
            "total_bytes": stored.total_bytes,
            "budget_bytes": budget,
            "budget_used": round(stored.total_bytes / budget, 4) if budget else None,
            "last_sweep": janitor.last.as_dict() if janitor.last else None,
        }
    return usage
