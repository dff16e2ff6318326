"""``lowering-service``: serve (the default), or audit the job sandbox.

``lowering-service sandbox-run -- CMD [ARGS...]`` runs CMD exactly as a job's untrusted
phase runs: same uid, namespaces, mounts, limits, seccomp filter and environment, with
``python`` on PATH being the worker's interpreter and a fresh scratch dir as cwd (and
TMPDIR under it). Output passes through; the exit status is CMD's.

``lowering-service migrate`` brings the job database (LOWERING_DATABASE_URL, or jobs.db
in LOWERING_DATA_DIR) to the schema this release needs; ``migrate --check`` only reports,
exiting 1 when the database is behind or the models and migrations disagree.

``lowering-service worker --name host-a [--queues cpu]`` runs a worker host of the fleet
(LOWERING_EXECUTOR=celery on the API): a Celery worker on LOWERING_BROKER_URL with
LOWERING_WORKERS processes, each running jobs in fresh sandboxes; it consumes the queues
this host can serve (cpu, and cuda.smNN per GPU type) unless --queues says otherwise,
and appears in job JSON as ``worker``: host-a@<hostname>. With ``--metrics-port`` (or
LOWERING_METRICS_PORT) it serves its processes' Prometheus /metrics on that port.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path


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
    host = commands.add_parser("worker", help="run jobs from the fleet's broker on this host")
    host.add_argument("--name", required=True, help="this host's name (node host-a@<hostname>)")
    host.add_argument("--queues", default=None,
                      help="comma-separated queues to consume; default what this host serves")
    host.add_argument("--metrics-port", type=_port, default=None,
                      help="serve this host's Prometheus /metrics on LOWERING_HOST:PORT "
                      "(default LOWERING_METRICS_PORT; unset: none)")
    args = parser.parse_args(argv)
    if args.command == "worker":
        from app.executors.celery_worker import main as worker_main

        queues = [q for q in (args.queues or "").split(",") if q.strip()] or None
        return worker_main(name=args.name, queues=queues, metrics_port=args.metrics_port)
    if args.command == "sandbox-run":
        return _sandbox_run(args.cmd)
    if args.command == "migrate":
        return _migrate(check_only=args.check)
    from app.main import run

    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
