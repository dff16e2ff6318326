"""Dependency aliases: routes get the services ``create_app`` hung on app.state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, cast

from fastapi import Depends, Request

from app.executors.base import Executor
from app.jobs.lifecycle import JobLifecycle
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
