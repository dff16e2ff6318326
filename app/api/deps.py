"""Dependency aliases: routes get the services ``create_app`` hung on app.state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, cast

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth import ANONYMOUS, KeyStore, Principal, Scope
from app.executors.base import Executor
from app.jobs.lifecycle import JobLifecycle
from app.jobs.retention import Janitor
from app.jobs.store import JobStore
from app.settings import Settings
from app.storage.base import ArtifactStore, LogStore, UploadStore


@dataclass(frozen=True)
class Services:
    """Everything a request may use; built once per app in its lifespan."""

    settings: Settings
    store: JobStore
    lifecycle: JobLifecycle
    uploads: UploadStore
    logs: LogStore
    artifacts: ArtifactStore
    executor: Executor
    keys: KeyStore | None = None
    """The API keys; None when LOWERING_AUTH is off (every request is ANONYMOUS)."""
    janitor: Janitor | None = None
    """Retention: its rules, usage and latest sweep (/v1/info); None in tests without it."""


def _services(request: Request) -> Services:
    return cast(Services, request.app.state.services)


ServicesDep = Annotated[Services, Depends(_services)]


def _settings(services: ServicesDep) -> Settings:
    return services.settings


def _store(services: ServicesDep) -> JobStore:
    return services.store


def _lifecycle(services: ServicesDep) -> JobLifecycle:
    return services.lifecycle


def _uploads(services: ServicesDep) -> UploadStore:
    return services.uploads


def _logs(services: ServicesDep) -> LogStore:
    return services.logs


def _artifacts(services: ServicesDep) -> ArtifactStore:
    return services.artifacts


def _executor(services: ServicesDep) -> Executor:
    return services.executor


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[JobStore, Depends(_store)]
LifecycleDep = Annotated[JobLifecycle, Depends(_lifecycle)]
UploadsDep = Annotated[UploadStore, Depends(_uploads)]
LogsDep = Annotated[LogStore, Depends(_logs)]
ArtifactsDep = Annotated[ArtifactStore, Depends(_artifacts)]
ExecutorDep = Annotated[Executor, Depends(_executor)]


# Only for the OpenAPI document (/docs gets an Authorize button); the header itself is
# read and judged by KeyStore.authenticate, so every refusal is our JSON 401.
_bearer = HTTPBearer(auto_error=False, description="an API key from `lowering-service keys "
                     "create` (needed when LOWERING_AUTH=required)")


def _principal(request: Request, services: ServicesDep,
               _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    # Sync: FastAPI runs it in a worker thread (one indexed read, and the HMAC).
    if services.keys is None:
        return ANONYMOUS
    return services.keys.authenticate(request.headers.get("authorization"))


PrincipalDep = Annotated[Principal, Depends(_principal)]


def _caller(request: Request, services: ServicesDep) -> Principal | None:
    # For routes open to everyone that say more to a known caller (/v1/info): the
    # principal of a sent key (a wrong one is 401 as anywhere), ANONYMOUS while auth is
    # off, None for a request without a key.
    if services.keys is None:
        return ANONYMOUS
    if request.headers.get("authorization") is None:
        return None
    return services.keys.authenticate(request.headers.get("authorization"))


CallerDep = Annotated[Principal | None, Depends(_caller)]


def _read(principal: PrincipalDep) -> Principal:
    return principal.require(Scope.READ)


def _submit(principal: PrincipalDep) -> Principal:
    return principal.require(Scope.SUBMIT)


def _admin(principal: PrincipalDep) -> Principal:
    return principal.require(Scope.ADMIN)


ReadDep = Annotated[Principal, Depends(_read)]
"""The caller, with the read scope: its tenant filters every query."""
SubmitDep = Annotated[Principal, Depends(_submit)]
AdminDep = Annotated[Principal, Depends(_admin)]
