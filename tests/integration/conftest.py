"""Fixtures of the integration tests: a fresh PostgreSQL database per test."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _postgres_reachable() -> bool:
    engine = create_engine(PG_ADMIN_URL)
    try:
        with engine.connect():
            return True
    except OperationalError:
        return False
    finally:
        engine.dispose()


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards (a skip when PostgreSQL is down)."""
    if not _postgres_reachable():
        pytest.skip("PostgreSQL at 127.0.0.1:5432 is not reachable")
    name = f"mig_{uuid.uuid4().hex}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    with fresh_pg_database() as url:
        yield url
