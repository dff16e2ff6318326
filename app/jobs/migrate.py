"""Schema migrations: the job database is brought to the code's revision, never create_all'd.

``create_all`` adds missing tables but never a column, so every schema change is an
Alembic revision under app/jobs/migrations/versions/, shipped inside the package. Alembic
is configured here in code (no ini file needed at run time). The service calls
``prepare`` before opening its store: it upgrades, or refuses to start with the command
to run (``lowering-service migrate``). Databases made by release 0.1 (tables but no
alembic_version) are stamped at the baseline, not recreated: their rows are kept.

Writing a new migration::

    lowering-service migrate      # your dev database (LOWERING_DATABASE_URL or
                                  # LOWERING_DATA_DIR/jobs.db) at head first
    # change app/jobs/models.py, then, from the repository root (alembic.ini):
    .venv/bin/alembic revision --autogenerate --rev-id 0002 -m "add tenant id"
    # read and fix app/jobs/migrations/versions/0002_add_tenant_id.py (autogenerate
    # misses renames, server defaults and data moves), then
    make migrations-check         # models and migrations agree

Never edit a released revision; SQLite runs migrations in batch mode (table copies).
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, MetaData, create_engine, event, inspect, make_url, text

from app.jobs.store import make_engine, retry_busy

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
BASELINE = "0001"
# What release 0.1's create_all made; an unversioned table missing any of these is older
# still and is refused rather than stamped as if it were the baseline.
BASELINE_COLUMNS = frozenset(
    "seq id status phase model_name backend_id device options verify rtol atol input_sha256 "
    "input_size_bytes artifact_sha256 artifact_size_bytes verification error timings toolchain "
    "worker_pid attempts resources cache_key cache_hit parent_id created_at started_at "
    "finished_at".split())
# pg_advisory_xact_lock key: processes starting together migrate one after another.
PG_LOCK_KEY = 0x6C6F776D6967  # "lowmig"
MIGRATE_COMMAND = "lowering-service migrate"


class MigrationError(RuntimeError):
    """The job database cannot be used by this release as it is; the message says why."""


def _config(connection: Connection | None = None, metadata: MetaData | None = None) -> Config:
    config = Config(stdout=io.StringIO())  # alembic's chatter is not ours to print
    # The ini-style options interpolate "%": an install path may hold one.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    if metadata is not None:
        config.attributes["target_metadata"] = metadata
    return config


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def head() -> str:
    """The revision this code needs."""
    found = ScriptDirectory.from_config(_config()).get_current_head()
    assert found is not None, "no migrations found"
    return found


def _current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def current(url: str) -> str | None:
    """The database's revision; None when unversioned (empty, or made by release 0.1)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return _current(conn)
    finally:
        engine.dispose()


def is_at_head(url: str) -> bool:
    return current(url) == head()


def _stamp_legacy(conn: Connection, config: Config, url: str) -> None:
    tables = set(inspect(conn).get_table_names())
    if "alembic_version" in tables or "lowerings" not in tables:
        return
    columns = {column["name"] for column in inspect(conn).get_columns("lowerings")}
    if missing := sorted(BASELINE_COLUMNS - columns):
        raise MigrationError(
            f"job database {_shown(url)} predates release 0.1 (lowerings lacks "
            f"{', '.join(missing)}) and cannot be upgraded: export its jobs and start anew")
    command.stamp(config, BASELINE)


def _locking_engine(url: str) -> Engine:
    """An engine whose transactions are one-migrator-at-a-time and include the DDL."""
    if not url.startswith("sqlite"):
        return make_engine(url)
    # Not make_engine's: its connect hook switches the database to WAL, and that switch,
    # run by several migrators at once on a database still in rollback-journal mode, can
    # answer "database is locked" at once instead of waiting (seen under load in CI).
    # The service's own engine makes the switch later, alone.
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})
    if engine.dialect.name == "sqlite":
        # pysqlite opens transactions lazily and runs DDL outside them; take the
        # database's write lock up front instead, so the migration is atomic and a second
        # migrator waits (busy_timeout) rather than racing it.
        @event.listens_for(engine, "connect")
        def _manual(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _immediate(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


@retry_busy  # a lock SQLite refuses at once (not after its busy timeout) is tried again
def upgrade(url: str, *, to: str = "head") -> None:
    """Bring the database to ``to`` (the newest revision unless a test asks for an older
    one) in one transaction, one migrator at a time."""
    engine = _locking_engine(url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
            config = _config(conn)
            _stamp_legacy(conn, config, url)
            found = _current(conn)
            if found is not None and not _known(found):
                raise MigrationError(_unknown(url, found))
            command.upgrade(config, to)
    except CommandError as exc:
        raise MigrationError(f"migrating job database {_shown(url)} failed: {exc}") from exc
    finally:
        engine.dispose()


def _known(revision: str) -> bool:
    try:
        ScriptDirectory.from_config(_config()).get_revision(revision)
    except CommandError:
        return False
    return True


def _unknown(url: str, found: str) -> str:
    return (f"job database {_shown(url)} is at revision {found}, which this release does "
            f"not know (a newer release migrated it): run that release, or restore a backup")


def check(url: str, *, metadata: MetaData | None = None) -> None:
    """Raise MigrationError unless the database is at head and matches the models."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            command.check(_config(conn, metadata))
    except CommandError as exc:  # includes AutogenerateDiffsDetected
        raise MigrationError(
            f"job database {_shown(url)}: {exc} (models and migrations must agree: write a "
            f"migration, see app/jobs/migrate.py)") from exc
    finally:
        engine.dispose()


def check_models() -> None:
    """Migrations applied to an empty SQLite database give exactly the models (make test)."""
    with tempfile.TemporaryDirectory(prefix="migrations-check-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'jobs.db'}"
        upgrade(url)
        check(url)


def prepare(url: str, *, auto_upgrade: bool) -> None:
    """Called before the service opens its store: upgrade, or refuse unless at head."""
    if auto_upgrade:
        upgrade(url)
        return
    found, needed = current(url), head()
    if found == needed:
        return
    if found is not None and not _known(found):
        raise MigrationError(_unknown(url, found))
    raise MigrationError(
        f"job database {_shown(url)} is at revision {found or 'none (unversioned)'}, this "
        f"release needs {needed}: run `{MIGRATE_COMMAND}` (one process, same settings), or "
        f"set LOWERING_MIGRATE_ON_START=true to migrate at start")
