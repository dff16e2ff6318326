"""``lowering-service``: serve (the default), or audit the job sandbox.

``lowering-service sandbox-run -- CMD [ARGS...]`` runs CMD exactly as a job's untrusted
phase runs: same uid, namespaces, mounts, limits, seccomp filter and environment, with
``python`` on PATH being the worker's interpreter and a fresh scratch dir as cwd (and
TMPDIR under it). Output passes through; the exit status is CMD's.

``lowering-service migrate`` brings the job database (LOWERING_DATABASE_URL, or jobs.db
in LOWERING_DATA_DIR) to the schema this release needs; ``migrate --check`` only reports,
exiting 1 when the database is behind or the models and migrations disagree.

``lowering-service keys create --tenant T [--scope submit]`` makes an API key (printed
once, as the last line of stdout; only its HMAC is stored), ``keys list`` shows every key
without secrets, ``keys revoke ID`` revokes one. Same database settings as ``migrate``;
``create`` needs LOWERING_AUTH_PEPPER, the one the service runs with.
``lowering-service tenants set T [--max-active-jobs N] [--max-storage-bytes B]`` gives a
tenant its own quotas (a limit left out: the LOWERING_TENANT_MAX_* default);
``tenants list`` shows them.

``lowering-service worker --name host-a [--queues cpu]`` runs a worker host of the fleet
(LOWERING_EXECUTOR=celery on the API): a Celery worker on LOWERING_BROKER_URL with
LOWERING_WORKERS processes, each running jobs in fresh sandboxes; it consumes the queues
this host can serve (cpu, and cuda.smNN per GPU type) unless --queues says otherwise,
and appears in job JSON as ``worker``: host-a@<hostname>. With ``--metrics-port`` (or
LOWERING_METRICS_PORT) it serves its processes' Prometheus /metrics on that port.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    from app.jobs.store import JobStore
    from app.settings import Settings


def _sandbox_run(cmd: list[str]) -> int:
    from app.sandbox.profile import from_settings
    from app.settings import Settings

    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if not cmd:
        print("usage: lowering-service sandbox-run -- CMD [ARGS...]", file=sys.stderr)
        return 2
    settings = Settings()
    settings.ensure_dirs()
    sandbox = from_settings(settings)
    if settings.sandbox == "required":
        status = sandbox.check(Path(tempfile.mkdtemp(dir=settings.scratch_dir, prefix="check-")))
        if not status.available:
            print(f"lowering-service: {status.missing}", file=sys.stderr)
            return 2
    else:
        print("lowering-service: LOWERING_SANDBOX=off: running UNSANDBOXED", file=sys.stderr)
    scratch = Path(tempfile.mkdtemp(dir=settings.scratch_dir, prefix="audit-"))
    try:
        sandbox.prepare_scratch(scratch)
        (scratch / "tmp").mkdir()
        if sandbox.privileged and settings.sandbox == "required":
            shutil.chown(scratch / "tmp", 65534, 65534)
        proc = sandbox.popen(cmd, scratch=scratch, stdin=None, stdout=None, stderr=None)
        return proc.wait()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _migrate(*, check_only: bool) -> int:
    from sqlalchemy.exc import OperationalError

    from app.jobs import migrate
    from app.settings import Settings

    settings = Settings()
    url = settings.db_url
    try:
        if check_only:
            if not migrate.is_at_head(url):
                migrate.prepare(url, auto_upgrade=False)  # raises, saying what to run
            migrate.check(url)
            print(f"job database at {migrate.head()} (head); models and migrations agree")
            return 0
        if settings.database_url is None:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        before = migrate.current(url)
        migrate.upgrade(url)
    except migrate.MigrationError as exc:
        print(f"lowering-service: {exc}", file=sys.stderr)
        return 1
    except OperationalError as exc:
        print(f"lowering-service: cannot open the job database: {exc.orig}", file=sys.stderr)
        return 1
    print(f"job database: {before or 'unversioned'} -> {migrate.current(url)} (head)")
    return 0


def _when(value: datetime.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _open_store(settings: Settings) -> JobStore | int:
    """The job database, as the service opens it (the embedded SQLite one migrates itself,
    a shared one must be at head), or the exit status after saying why it cannot be."""
    from sqlalchemy.exc import OperationalError

    from app.jobs import migrate
    from app.jobs.store import JobStore

    try:
        if settings.database_url is None:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        migrate.prepare(settings.db_url, auto_upgrade=settings.db_url.startswith("sqlite")
                        or settings.migrate_on_start)
        return JobStore(settings.db_url)
    except migrate.MigrationError as exc:
        print(f"lowering-service: {exc}", file=sys.stderr)
    except OperationalError as exc:
        print(f"lowering-service: cannot open the job database: {exc.orig}", file=sys.stderr)
    return 1


def _keys(args: argparse.Namespace) -> int:
    from app.auth import KeyStore, check_tenant, parse_scopes
    from app.settings import Settings

    settings = Settings()
    pepper = settings.auth_pepper.get_secret_value() if settings.auth_pepper else None
    try:
        if args.keys_command == "create":
            scopes = parse_scopes(args.scope)
            check_tenant(args.tenant)
            if pepper is None:
                print("lowering-service: LOWERING_AUTH_PEPPER is not set: keys are hashed "
                      "with it (set the same one the service runs with)", file=sys.stderr)
                return 1
    except ValueError as exc:
        print(f"lowering-service: {exc}", file=sys.stderr)
        return 2
    store = _open_store(settings)
    if isinstance(store, int):
        return store
    try:
        keys = KeyStore(store.engine, pepper)
        if args.keys_command == "create":
            key, row = keys.create(tenant=args.tenant, scopes=scopes)
            print(f"key {row['id']} for tenant {row['tenant']} (scopes: "
                  f"{', '.join(row['scopes'])}); shown only now, store it:")
            print(key)
            return 0
        if args.keys_command == "revoke":
            if not keys.revoke(args.key_id):
                print(f"lowering-service: no active key {args.key_id!r}", file=sys.stderr)
                return 1
            print(f"key {args.key_id} revoked")
            return 0
        print(f"{'id':<16}  {'tenant':<20}  {'scopes':<18}  {'created':<20}  "
              f"{'last used':<20}  revoked")
        for row in keys.all():
            print(f"{row['id']:<16}  {row['tenant']:<20}  {','.join(row['scopes']):<18}  "
                  f"{_when(row['created_at']):<20}  {_when(row['last_used_at']):<20}  "
                  f"{_when(row['revoked_at'])}")
        return 0
    finally:
        store.close()


def _tenants(args: argparse.Namespace) -> int:
    from app.auth import check_tenant
    from app.settings import Settings

    settings = Settings()
    try:
        if args.tenants_command == "set":
            check_tenant(args.tenant)
    except ValueError as exc:
        print(f"lowering-service: {exc}", file=sys.stderr)
        return 2
    store = _open_store(settings)
    if isinstance(store, int):
        return store
    try:
        if args.tenants_command == "set":
            store.set_tenant_limits(tenant=args.tenant, max_active_jobs=args.max_active_jobs,
                                    max_storage_bytes=args.max_storage_bytes)
        defaults = (settings.tenant_max_active_jobs, settings.tenant_max_storage_bytes)
        print(f"{'tenant':<20}  {'max active jobs':<16}  max storage bytes")
        print(f"{'(default)':<20}  {defaults[0] or '-'!s:<16}  {defaults[1] or '-'}")
        for row in store.all_tenant_limits():
            if args.tenants_command == "set" and row["name"] != args.tenant:
                continue
            active, storage = row["max_active_jobs"], row["max_storage_bytes"]
            print(f"{row['name']:<20}  {active or '(default)'!s:<16}  {storage or '(default)'}")
        return 0
    finally:
        store.close()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (1-65535)")
    return port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowering-service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve HTTP on LOWERING_HOST:LOWERING_PORT (default)")
    audit = commands.add_parser("sandbox-run", help="run CMD as a job's untrusted phase runs")
    audit.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    migrate = commands.add_parser("migrate", help="bring the job database to this release")
    migrate.add_argument("--check", action="store_true",
                         help="change nothing; exit 1 unless at head and matching the models")
    keys = commands.add_parser("keys", help="make, list and revoke API keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", help="make a key; printed once, last line")
    create.add_argument("--tenant", required=True, help="the tenant the key acts for")
    create.add_argument("--scope", default="submit", help="comma-separated among read, "
                        "submit, admin (each implies those before it; default submit)")
    keys_commands.add_parser("list", help="every key, without secrets")
    revoke = keys_commands.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("key_id", metavar="ID", help="the key's id (`keys list`)")
    tenants = commands.add_parser("tenants", help="per-tenant quotas")
    tenants_commands = tenants.add_subparsers(dest="tenants_command", required=True)
    limits = tenants_commands.add_parser("set", help="set a tenant's quotas (left out: "
                                         "the LOWERING_TENANT_MAX_* default)")
    limits.add_argument("tenant")
    limits.add_argument("--max-active-jobs", type=_positive, default=None, metavar="N")
    limits.add_argument("--max-storage-bytes", type=_positive, default=None, metavar="B")
    tenants_commands.add_parser("list", help="the default quotas and every tenant's")
    host = commands.add_parser("worker", help="run jobs from the fleet's broker on this host")
    host.add_argument("--name", required=True, help="this host's name (node host-a@<hostname>)")
    host.add_argument("--queues", default=None,
                      help="comma-separated queues to consume; default what this host serves")
    host.add_argument("--metrics-port", type=_port, default=None,
                      help="serve this host's Prometheus /metrics on LOWERING_HOST:PORT "
                      "(default LOWERING_METRICS_PORT; unset: none)")
    args = parser.parse_args(argv)
    try:
        return _command(args)
    except ValidationError as exc:  # a bad LOWERING_* value: one line each, no traceback
        for error in exc.errors():
            name = "LOWERING_" + "_".join(str(part) for part in error["loc"]).upper()
            print(f"lowering-service: {name}={error.get('input')!r}: {error['msg']}",
                  file=sys.stderr)
        return 2


def _command(args: argparse.Namespace) -> int:
    if args.command == "worker":
        from app.executors.celery_worker import main as worker_main

        queues = [q for q in (args.queues or "").split(",") if q.strip()] or None
        return worker_main(name=args.name, queues=queues, metrics_port=args.metrics_port)
    if args.command == "sandbox-run":
        return _sandbox_run(args.cmd)
    if args.command == "migrate":
        return _migrate(check_only=args.check)
    if args.command == "keys":
        return _keys(args)
    if args.command == "tenants":
        return _tenants(args)
    from app.main import run

    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
