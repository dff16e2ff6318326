"""Dependency aliases: routes get the stores and executor hung on app.state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.executors.base import Executor
from app.jobs.store import JobStore
from app.settings import Settings
from app.storage.artifacts import ArtifactStore


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _store(request: Request) -> JobStore:
    return request.app.state.store  # type: ignore[no-any-return]


def _artifacts(request: Request) -> ArtifactStore:
    return request.app.state.artifacts  # type: ignore[no-any-return]


def _executor(request: Request) -> Executor:
    return request.app.state.executor  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[JobStore, Depends(_store)]
ArtifactsDep = Annotated[ArtifactStore, Depends(_artifacts)]
ExecutorDep = Annotated[Executor, Depends(_executor)]
