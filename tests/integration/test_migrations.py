"""Migrations on real SQLite and PostgreSQL databases.

A database made the way release 0.1 made it (``create_all`` of the table frozen below, no
alembic_version) is stamped at the baseline and upgraded with every row kept; ``check``
notices models that drift from the migrations; ``lowering-service migrate`` and
``prepare`` say what to run.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    inspect,
    select,
    text,
)

from app.jobs import migrate
from app.jobs.models import lowerings
from app.jobs.store import JobStore
from app.storage.artifacts import LocalArtifactStore
from tests.conftest import ROOT, Server

# Release 0.1's table, frozen: its service ran create_all on exactly this. Never update it.
RELEASE_01 = MetaData()
Table(
    "lowerings", RELEASE_01,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(32), nullable=False, unique=True),
    Column("status", String(16), nullable=False),
    Column("phase", String(16)),
    Column("model_name", String(128), nullable=False),
    Column("backend_id", String(128), nullable=False),
    Column("device", String(16), nullable=False),
    Column("options", JSON, nullable=False),
    Column("verify", Boolean, nullable=False),
    Column("rtol", Float, nullable=False),
    Column("atol", Float, nullable=False),
    Column("input_sha256", String(64), nullable=False),
    Column("input_size_bytes", BigInteger, nullable=False),
    Column("artifact_sha256", String(64)),
    Column("artifact_size_bytes", BigInteger),
    Column("verification", JSON),
    Column("error", JSON),
    Column("timings", JSON, nullable=False),
    Column("toolchain", JSON),
    Column("worker_pid", Integer),
    Column("attempts", Integer, nullable=False, default=0),
    Column("resources", JSON),
    Column("cache_key", String(64)),
    Column("cache_hit", Boolean, nullable=False, default=False),
    Column("parent_id", String(32)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Index("ix_lowerings_status_seq", "status", "seq"),
    Index("ix_lowerings_model_seq", "model_name", "seq"),
    Index("ix_lowerings_cache_key", "cache_key", "status"),
    Index("ix_lowerings_parent", "parent_id"),
)

T0 = dt.datetime(2026, 11, 20, 9, 30, 15, 123456, tzinfo=dt.UTC)
COMMON = {"model_name": "resnet", "backend_id": "aoti", "device": "cpu",
          "options": {"max_autotune": False}, "verify": True, "rtol": 1e-4, "atol": 1e-5,
          "input_sha256": "1" * 64, "input_size_bytes": 3 * 1024**3, "attempts": 0,
          "cache_hit": False, "created_at": T0}
JOBS = [
    {**COMMON, "id": "a" * 32, "status": "succeeded", "timings": {"lower_s": 61.5},
     "artifact_sha256": "b" * 64, "artifact_size_bytes": 5 * 1024**3,  # past 32 bits
     "verification": {"passed": True, "max_abs_err": 1e-7}, "toolchain": {"torch": "2.13.0"},
     "worker_pid": 4242, "attempts": 1, "resources": {"peak_rss_bytes": 123456789},
     "cache_key": "c" * 64, "started_at": T0 + dt.timedelta(seconds=1),
     "finished_at": T0 + dt.timedelta(seconds=63)},
    {**COMMON, "id": "d" * 32, "status": "failed", "phase": "lower", "timings": {},
     "error": {"code": "lowering_failed", "message": "g++ exited 1"}, "attempts": 2,
     "cache_key": "e" * 64, "started_at": T0, "finished_at": T0 + dt.timedelta(minutes=5)},
    {**COMMON, "id": "f" * 32, "status": "queued", "timings": {}, "parent_id": "a" * 32,
     "cache_hit": True},
]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file (LOWERING_DATA_DIR's default) or ``pg_url``."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return str(request.getfixturevalue("pg_url"))


def _release_01_database(url: str, jobs: list[dict[str, Any]] = JOBS) -> list[dict[str, Any]]:
    """Make the database as release 0.1 did, with ``jobs`` in it; returns its raw rows."""
    engine = create_engine(url)
    try:
        RELEASE_01.create_all(engine)
        table = RELEASE_01.tables["lowerings"]
        with engine.begin() as conn:
            for job in jobs:
                conn.execute(insert(table).values(**job))
        return _rows(url)
    finally:
        engine.dispose()


def _rows(url: str) -> list[dict[str, Any]]:
    """Release 0.1's columns of every row, raw (later columns may be added beside them)."""
    table = RELEASE_01.tables["lowerings"]
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(row._mapping)
                    for row in conn.execute(select(table).order_by(table.c.seq))]
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _schema(url: str) -> dict[str, Any]:
    """What a migration must reproduce: columns, types, nullability, indexes, keys."""
    engine = create_engine(url)
    try:
        found = inspect(engine)
        return {
            "columns": [(c["name"], repr(c["type"]), c["nullable"])
                        for c in found.get_columns("lowerings")],
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in found.get_indexes("lowerings")),
            "unique": sorted((u["name"], tuple(u["column_names"]))
                             for u in found.get_unique_constraints("lowerings")),
            "pk": found.get_pk_constraint("lowerings"),
        }
    finally:
        engine.dispose()


def test_release_01_database_is_stamped_and_keeps_every_row(db_url: str) -> None:
    before = _release_01_database(db_url)
    assert migrate.current(db_url) is None and not migrate.is_at_head(db_url)

    migrate.upgrade(db_url)

    assert migrate.current(db_url) == migrate.head() and migrate.is_at_head(db_url)
    assert _rows(db_url) == before
    migrate.check(db_url)
    store = JobStore(db_url)
    try:
        for job in JOBS:
            got = store.get(job["id"])
            assert got is not None
            assert {key: got[key] for key in job} == job
        # The id sequence carries on after the kept rows.
        new = store.create(**{k: v for k, v in COMMON.items() if k != "created_at"})
        assert new["seq"] > max(row["seq"] for row in before)
    finally:
        store.close()
    migrate.upgrade(db_url)  # at head: nothing to do, nothing lost
    assert len(_rows(db_url)) == len(JOBS) + 1


def test_baseline_makes_release_01_schema(db_url: str) -> None:
    _release_01_database(db_url, jobs=[])
    old = _schema(db_url)
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE lowerings"))
    engine.dispose()

    migrate.upgrade(db_url, to=migrate.BASELINE)

    assert _schema(db_url) == old
    assert _tables(db_url) == {"lowerings", "alembic_version"}


@pytest.mark.parametrize("drift", ["added column", "wider type", "dropped index"])
def test_check_reports_models_that_drift_from_migrations(tmp_path: Path, drift: str) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrate.upgrade(url)
    copy = MetaData()
    for model in lowerings.metadata.tables.values():  # every table: uploads too
        model.to_metadata(copy)
    table = copy.tables["lowerings"]
    migrate.check(url, metadata=copy)  # an unchanged copy agrees
    if drift == "added column":
        table.append_column(Column("tenant_id", String(32)))
        needle = "tenant_id"
    elif drift == "wider type":
        table.c.status.type = String(40)
        needle = "modify_type"
    else:
        table.indexes.discard(next(i for i in table.indexes if i.name == "ix_lowerings_parent"))
        needle = "ix_lowerings_parent"
    with pytest.raises(migrate.MigrationError, match=needle) as caught:
        migrate.check(url, metadata=copy)
    assert "write a migration" in str(caught.value)


def test_check_refuses_a_database_behind_head(db_url: str) -> None:
    _release_01_database(db_url)
    with pytest.raises(migrate.MigrationError, match="not up to date"):
        migrate.check(db_url)


def test_prepare_without_auto_upgrade_names_the_command(db_url: str) -> None:
    before = _release_01_database(db_url)
    with pytest.raises(RuntimeError, match="run `lowering-service migrate`"):
        migrate.prepare(db_url, auto_upgrade=False)
    assert "alembic_version" not in _tables(db_url)  # refused, untouched

    migrate.prepare(db_url, auto_upgrade=True)
    migrate.prepare(db_url, auto_upgrade=False)  # at head: starts
    assert _rows(db_url) == before


def test_a_database_from_a_newer_release_is_refused(db_url: str) -> None:
    migrate.upgrade(db_url)
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    for attempt in (migrate.upgrade, lambda url: migrate.prepare(url, auto_upgrade=False)):
        with pytest.raises(migrate.MigrationError, match="9999, which this release does not"):
            attempt(db_url)


def test_a_table_older_than_release_01_is_not_stamped(db_url: str) -> None:
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE lowerings (seq INTEGER PRIMARY KEY, id VARCHAR(32))"))
    engine.dispose()
    with pytest.raises(migrate.MigrationError, match="predates release 0.1.*cache_key"):
        migrate.upgrade(db_url)
    assert "alembic_version" not in _tables(db_url)


def test_two_migrators_at_once_take_turns(db_url: str) -> None:
    before = _release_01_database(db_url)
    errors: list[Exception] = []

    def run() -> None:
        try:
            migrate.upgrade(db_url)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert migrate.is_at_head(db_url)
    assert _rows(db_url) == before


def _cli(*args: str, url: str, data_dir: Path,
         code: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOWERING_")}
    env["LOWERING_DATA_DIR"] = str(data_dir)
    if not url.startswith("sqlite"):
        env["LOWERING_DATABASE_URL"] = url
    command = [sys.executable, "-c", code, *args] if code else [
        sys.executable, "-m", "app.cli", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_cli_migrate_upgrades_a_release_01_database(db_url: str, tmp_path: Path) -> None:
    # SQLite: the service's default database, jobs.db in LOWERING_DATA_DIR.
    before = _release_01_database(db_url)

    behind = _cli("migrate", "--check", url=db_url, data_dir=tmp_path)
    assert behind.returncode == 1, behind
    assert "lowering-service migrate" in behind.stderr

    done = _cli("migrate", url=db_url, data_dir=tmp_path)
    assert done.returncode == 0, done
    assert f"unversioned -> {migrate.head()}" in done.stdout

    ok = _cli("migrate", "--check", url=db_url, data_dir=tmp_path)
    assert ok.returncode == 0, ok
    assert "agree" in ok.stdout
    assert _rows(db_url) == before


def test_cli_migrate_says_when_the_database_cannot_be_opened(tmp_path: Path) -> None:
    url = "postgresql+psycopg://postgres:hunter2@127.0.0.1:1/jobs"  # nothing listens
    for args in (["migrate"], ["migrate", "--check"]):
        result = _cli(*args, url=url, data_dir=tmp_path)
        assert result.returncode == 1, result
        assert "cannot open the job database" in result.stderr
        assert "Traceback" not in result.stderr and "hunter2" not in result.stderr


def test_cli_migrate_imports_no_torch(tmp_path: Path) -> None:
    code = ("import sys; from app.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    for args in (["migrate"], ["migrate", "--check"]):
        result = _cli(*args, url=url, data_dir=tmp_path, code=code)
        assert result.returncode == 0, result


def test_check_models_passes_on_this_tree() -> None:
    migrate.check_models()


def test_service_serves_a_release_01_data_dir_after_migrating_itself(
    tmp_path: Path, start_server: Callable[..., Server],
) -> None:
    """The embedded SQLite database of a release 0.1 data dir migrates at start; its
    jobs and artifact are served as before."""
    data_dir = tmp_path / "data"
    payload = b"pt2 archive bytes " * 1000
    ref = LocalArtifactStore(data_dir / "artifacts").put_stream(io.BytesIO(payload))
    done = {**JOBS[0], "artifact_sha256": ref.sha256, "artifact_size_bytes": ref.size_bytes}
    url = f"sqlite:///{data_dir / 'jobs.db'}"
    _release_01_database(url, jobs=[done, JOBS[1]])

    server = start_server(data_dir, workers=1, prime_workers=False)
    client = server.client()

    assert migrate.current(url) == migrate.head()
    job = client.get(f"/v1/lowerings/{done['id']}").json()
    assert job["status"] == "succeeded", job
    assert job["artifact"]["sha256"] == ref.sha256
    assert job["artifact"]["size_bytes"] == len(payload)
    artifact = client.get(f"/v1/lowerings/{done['id']}/artifact")
    assert artifact.status_code == 200 and artifact.content == payload
    failed = client.get(f"/v1/lowerings/{JOBS[1]['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "lowering_failed"
    listed = {item["id"] for item in client.get("/v1/lowerings").json()["items"]}
    assert listed == {done["id"], JOBS[1]["id"]}


def test_service_refuses_a_shared_database_behind_head(
    pg_url: str, start_server: Callable[..., Server],
) -> None:
    _release_01_database(pg_url)
    server = start_server(ready=False, database_url=pg_url, prime_workers=False)
    assert server.proc.wait(timeout=120) != 0
    assert "lowering-service migrate" in server.log()
    assert "alembic_version" not in _tables(pg_url)


def test_0002_adds_the_profile_to_every_kept_job(db_url: str) -> None:
    """The first real schema change: release 0.1's jobs come through with no profile, and
    new jobs can carry one."""
    before = _release_01_database(db_url)
    migrate.upgrade(db_url)
    columns = {c[0]: c for c in _schema(db_url)["columns"]}
    assert columns["profile"][2] is True  # nullable
    assert len(_rows(db_url)) == len(before)
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            profiles = conn.execute(text("SELECT profile FROM lowerings")).scalars().all()
    finally:
        engine.dispose()
    assert len(profiles) == len(before) and set(profiles) == {None}
    migrate.check(db_url)


def test_0007_puts_every_kept_row_in_tenant_default(db_url: str) -> None:
    """Jobs, uploads and webhooks from before keys belong to tenant 'default' (what every
    request is while LOWERING_AUTH=off), and api_keys and tenants start empty."""
    before = _release_01_database(db_url)
    migrate.upgrade(db_url, to="0006")
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO uploads (id, status, size_bytes, part_size_bytes, parts, "
                "created_at, expires_at) VALUES ('u', 'ready', 1, 1, 1, :t, :t)"), {"t": T0})
            conn.execute(text(
                "INSERT INTO webhooks (id, url, events, secret, enabled, created_at) VALUES "
                "('w', 'https://example.com', '[]', 's', true, :t)"), {"t": T0})
        migrate.upgrade(db_url)
        with engine.connect() as conn:
            tenants = {table: set(conn.execute(text(f"SELECT tenant FROM {table}")).scalars())
                       for table in ("lowerings", "uploads", "webhooks")}
            keys = conn.execute(text("SELECT count(*) FROM api_keys")).scalar_one()
            keys += conn.execute(text("SELECT count(*) FROM tenants")).scalar_one()
    finally:
        engine.dispose()
    assert tenants == {"lowerings": {"default"}, "uploads": {"default"},
                       "webhooks": {"default"}}
    assert keys == 0 and len(_rows(db_url)) == len(before)
    migrate.check(db_url)
