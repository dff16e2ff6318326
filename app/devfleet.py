"""``make fleet``: the whole fleet on this machine, every part real.

This machine's RabbitMQ and PostgreSQL (started if they are down), each with a vhost and a
database of the fleet's own, recreated empty at every start because the S3 server, moto in
server mode, keeps its bucket in memory; the migrations; worker hosts ``host-a``,
``host-b``... (``lowering-service worker --name host-a``, each with its own data dir for
scratch and caches); API replicas on 127.0.0.1:8000 and :8001 with LOWERING_EXECUTOR=celery.
Once both APIs are ready and list every host, it prints where everything is and supervises:
Ctrl-C or SIGTERM stops it all (each child is its own process group: SIGTERM, then SIGKILL
after a grace period, then anything left of its process tree); a child that dies on its own
is named and the rest are stopped, exit status 1.

    .venv/bin/python -m app.devfleet [--hosts 2] [--api-ports 8000,8001] [--s3-port 9000]
        [--vhost lowering-fleet] [--database lowering_fleet] [--run-dir data/fleet]

Torch is never imported here (the hosts' sandboxes import it). ``Fleet`` is the same thing
for programs (bench/fleet.py, tests/fleet/test_make_fleet.py).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 20.0  # a host's SIGTERM puts its running job back in the queue first
BOOT_TIMEOUT_S = 900.0  # a host with a cold inductor cache primes it first (minutes)
# moto accepts any key; set ones, so no developer's real AWS credentials reach it.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


class FleetError(Exception):
    """The fleet cannot start or a part of it died; the message says which and why."""


# -- this machine's services -------------------------------------------------------------


def _run(*argv: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except FileNotFoundError:
        raise FleetError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise FleetError(f"{' '.join(argv)} did not finish in {timeout_s:.0f} s") from None


def ensure_rabbitmq() -> None:
    """Start this machine's RabbitMQ if it is down (as .ci/run does)."""
    if _run("rabbitmqctl", "-q", "status").returncode == 0:
        return
    if _run("service", "rabbitmq-server", "start", timeout_s=120).returncode != 0:
        _run("rabbitmq-server", "-detached")
    if _run("rabbitmqctl", "-q", "await_startup", timeout_s=120).returncode != 0:
        raise FleetError("RabbitMQ is down and did not start (service rabbitmq-server start)")


def consumer_timeout_s() -> float | None:
    """The broker's consumer (ack) timeout in seconds; None when unset or unknown."""
    out = _run("rabbitmqctl", "-q", "eval", "application:get_env(rabbit, consumer_timeout).")
    found = re.search(r"\{ok,\s*([0-9]+)\}", out.stdout)
    return int(found.group(1)) / 1000 if found else None


def fit_job_timeout(env: dict[str, str], broker_timeout_s: float | None) -> str | None:
    """RabbitMQ closes the channel of a worker holding a message past its consumer timeout
    (the job runs again, forever): the job's hard time limit must stay under it. A job
    timeout the caller did not set is lowered to fit; one they set is only warned about.
    Returns what to tell the user, None when it fits."""
    if broker_timeout_s is None:
        return None
    from app.executors.celery_app import time_limits  # celery: no torch
    from app.settings import Settings

    try:
        settings = (Settings(job_timeout_s=float(env["LOWERING_JOB_TIMEOUT_S"]))
                    if "LOWERING_JOB_TIMEOUT_S" in env else Settings())
    except ValueError as exc:
        raise FleetError(f"LOWERING_JOB_TIMEOUT_S: {exc}") from None
    _, hard = time_limits(settings)
    if hard < broker_timeout_s:
        return None
    raise_it = ("rabbitmqctl eval 'application:set_env(rabbit, consumer_timeout, "
                f"{int((hard + 600) * 1000)}).'")
    if "LOWERING_JOB_TIMEOUT_S" in env:
        return (f"warning: LOWERING_JOB_TIMEOUT_S={settings.job_timeout_s:g} gives a hard time "
                f"limit of {hard:g} s, over RabbitMQ's consumer_timeout "
                f"({broker_timeout_s:g} s): a job that long is delivered again forever. "
                f"Raise the broker's: {raise_it}")
    fitted = int(broker_timeout_s - (hard - settings.job_timeout_s) - 60)
    env["LOWERING_JOB_TIMEOUT_S"] = str(fitted)
    return (f"note: LOWERING_JOB_TIMEOUT_S={fitted} for this fleet (the default's hard time "
            f"limit, {hard:g} s, is over RabbitMQ's consumer_timeout, {broker_timeout_s:g} s); "
            f"for the default, raise the broker's: {raise_it}")


def ensure_vhost(vhost: str, *, fresh: bool) -> None:
    """The vhost, empty when ``fresh``, with every permission for guest."""
    if fresh:
        _run("rabbitmqctl", "-q", "delete_vhost", vhost)  # absent: an error we ignore
    listed = _run("rabbitmqctl", "-q", "list_vhosts", "name").stdout.split()
    if vhost not in listed:
        added = _run("rabbitmqctl", "-q", "add_vhost", vhost)
        if added.returncode != 0:
            raise FleetError(f"cannot add the RabbitMQ vhost {vhost}: {added.stderr.strip()}")
    perms = _run("rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    if perms.returncode != 0:
        raise FleetError(f"cannot give guest the vhost {vhost}: {perms.stderr.strip()}")


def delete_vhost(vhost: str) -> None:
    _run("rabbitmqctl", "-q", "delete_vhost", vhost)


def _pg_connect(admin_url: str) -> Any:
    import psycopg

    try:
        return psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError:
        pass
    clusters = sorted(Path("/etc/postgresql").glob("*/main"))
    if clusters:  # down: start it as .ci/run does
        _run("pg_ctlcluster", "--skip-systemctl-redirect", clusters[-1].parent.name, "main",
             "start", timeout_s=120)
    for _ in range(40):
        try:
            return psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            error = exc
            time.sleep(0.5)
    raise FleetError(f"PostgreSQL is not reachable at {admin_url}: {error}")


def ensure_database(admin_url: str, name: str, *, fresh: bool) -> None:
    """The database ``name``, empty when ``fresh`` (dropped first, connections closed)."""
    from psycopg import sql

    with _pg_connect(admin_url) as conn:
        if fresh:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(admin_url: str, name: str) -> None:
    from psycopg import sql

    with _pg_connect(admin_url) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class FleetConfig:
    """What to start. ``hosts``: worker hosts (host-a, host-b, ...); ``api_ports``: one API
    replica each; ``vhost``/``database``: the fleet's own, dropped and recreated at start;
    ``inductor_cache_dir``: one inductor cache for every host (default: each its own, in its
    data dir); ``env``: extra variables for every child (LOWERING_* settings)."""

    hosts: int = 2
    api_ports: tuple[int, ...] = (8000, 8001)
    s3_port: int = 9000
    vhost: str = "lowering-fleet"
    database: str = "lowering_fleet"
    run_dir: Path = Path("data/fleet")
    workers_per_host: int = 1
    inductor_cache_dir: Path | None = None
    pg_admin_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    amqp: str = "guest:guest@127.0.0.1:5672"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def host_names(self) -> list[str]:
        return [f"host-{chr(ord('a') + i)}" for i in range(self.hosts)]

    @property
    def api_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.api_ports]

    @property
    def broker_url(self) -> str:
        return f"amqp://{self.amqp}/{self.vhost}"

    @property
    def database_url(self) -> str:
        server = self.pg_admin_url.split("://", 1)[1].rsplit("/", 1)[0]
        return f"postgresql+psycopg://{server}/{self.database}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"


@dataclass
class Child:
    """One process the fleet started, in its own process group, logging to ``log_path``."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    tree: set[psutil.Process] = field(default_factory=set)

    def tail(self, chars: int = 1500) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def remember_tree(self) -> None:
        """Note its descendants now: a sandbox that left the process group is still found."""
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(self.proc.pid)
            self.tree |= {parent, *parent.children(recursive=True)}

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


class Fleet:
    """The fleet of ``config``: ``start()`` returns once it is ready, ``stop()`` ends every
    process it started. A context manager; ``watch()`` supervises until a signal or a death."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.run_dir = config.run_dir.expanduser().resolve()
        self.logs_dir = self.run_dir / "logs"
        self.children: list[Child] = []
        self.ready_s: float | None = None
        self.timeout_note: str | None = None
        self._stopping = threading.Event()

    # -- start -----------------------------------------------------------------------------

    def start(self) -> None:
        """Everything, in order; on any failure what was started is stopped, then raised."""
        started = time.monotonic()
        try:
            self._preflight()
            self._services()
            self._start_moto()
            self._migrate()
            self._start_hosts()
            for port in self.config.api_ports:
                self._spawn(f"api-{port}", [sys.executable, "-m", "app.main"], self._api_env(port))
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.monotonic() - started

    def _preflight(self) -> None:
        cfg = self.config
        if not 1 <= cfg.hosts <= 26:
            raise FleetError("--hosts: 1 to 26 worker hosts")
        if not cfg.api_ports or len(set(cfg.api_ports)) != len(cfg.api_ports):
            raise FleetError("--api-ports: one or more distinct ports")
        if _moto_server() is None:
            raise FleetError("moto_server is not installed: .venv/bin/pip install 'moto[server]'")
        for port, what in [(p, "API") for p in cfg.api_ports] + [(cfg.s3_port, "S3")]:
            if not port_free(port):
                raise FleetError(f"port {port} ({what}) is already in use on 127.0.0.1: stop "
                                 "what listens there (another `make fleet` or `make serve`?) "
                                 "or pick other ports (--api-ports, --s3-port)")
        self.logs_dir.mkdir(parents=True, exist_ok=True)

    def _services(self) -> None:
        ensure_rabbitmq()
        chosen = {k: v for k, v in {**os.environ, **self.config.env}.items()
                  if k == "LOWERING_JOB_TIMEOUT_S"}
        self.timeout_note = fit_job_timeout(chosen, consumer_timeout_s())
        self.config.env.update(chosen)
        ensure_vhost(self.config.vhost, fresh=True)
        ensure_database(self.config.pg_admin_url, self.config.database, fresh=True)

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN")}
        cfg = self.config
        env.update(CREDENTIALS)
        env.update({
            "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
            "LOWERING_DATABASE_URL": cfg.database_url, "LOWERING_BROKER_URL": cfg.broker_url,
            "LOWERING_STORAGE": "s3", "LOWERING_S3_ENDPOINT_URL": cfg.s3_endpoint,
            "LOWERING_S3_BUCKET": "lowering", "LOWERING_LOG_LEVEL": "info",
        })
        if cfg.inductor_cache_dir is not None:
            env["LOWERING_INDUCTOR_CACHE_DIR"] = str(cfg.inductor_cache_dir)
        env.update(cfg.env)
        return env

    def _api_env(self, port: int) -> dict[str, str]:
        return {**self._base_env(), "LOWERING_EXECUTOR": "celery", "LOWERING_HOST": "127.0.0.1",
                "LOWERING_PORT": str(port), "LOWERING_DATA_DIR": str(self.run_dir / f"api-{port}")}

    def _host_env(self) -> dict[str, str]:
        return {**self._base_env(), "LOWERING_WORKERS": str(self.config.workers_per_host)}

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        log_path = self.logs_dir / f"{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_die_with_launcher)
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def _start_moto(self) -> None:
        self._spawn("moto", [str(_moto_server()), "-H", "127.0.0.1", "-p",
                             str(self.config.s3_port)], self._base_env())
        self._until(lambda: _answers(f"{self.config.s3_endpoint}/moto-api/"), 30,
                    "the S3 server (moto) answering")
        import boto3  # only the launcher needs it here; the services have their own client

        s3 = boto3.client("s3", endpoint_url=self.config.s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
        s3.create_bucket(Bucket="lowering")

    def _migrate(self) -> None:
        done = subprocess.run([sys.executable, "-m", "app.cli", "migrate"], cwd=ROOT,
                              env=self._base_env(), capture_output=True, text=True,
                              timeout=120, check=False)
        if done.returncode != 0:
            raise FleetError(f"migrations failed: {(done.stderr or done.stdout).strip()[-800:]}")

    def _start_hosts(self) -> None:
        """Every host; with one shared inductor cache that is not primed yet, host-a primes it
        alone first (two priming runs at once would only compete for the cores)."""
        names = self.config.host_names
        shared = self.config.inductor_cache_dir
        for i, name in enumerate(names):
            data_dir = self.run_dir / name
            env = {**self._host_env(), "LOWERING_DATA_DIR": str(data_dir)}
            self._spawn(name, [sys.executable, "-m", "app.cli", "worker", "--name", name], env)
            if i == 0 and shared is not None and len(names) > 1 and not _primed(shared):
                self._until(lambda: _primed(shared), BOOT_TIMEOUT_S,
                            f"{name} priming the shared inductor cache {shared}")

    def _wait_ready(self) -> None:
        names = set(self.config.host_names)

        def ready() -> bool:
            for url in self.config.api_urls:
                try:
                    if httpx.get(f"{url}/readyz", timeout=5).status_code != 200:
                        return False
                    hosts = httpx.get(f"{url}/v1/info", timeout=5).json()["executor"]["hosts"]
                except (httpx.HTTPError, ValueError, KeyError, TypeError):
                    return False
                if not names <= {str(h.get("name", "")).split("@")[0] for h in hosts}:
                    return False
            return True

        self._until(ready, BOOT_TIMEOUT_S, "every API ready and listing every worker host")

    def _until(self, predicate: object, timeout_s: float, what: str) -> None:
        """Poll ``predicate`` until true; a dead child or a stop request ends the wait."""
        assert callable(predicate)
        deadline = time.monotonic() + timeout_s
        while not predicate():
            self._check_children()
            if self._stopping.is_set():
                raise FleetError("stopped before the fleet was ready")
            if time.monotonic() > deadline:
                raise FleetError(f"not {what} after {timeout_s:.0f} s; logs in {self.logs_dir}")
            self._stopping.wait(0.25)

    def _check_children(self) -> None:
        for child in self.children:
            child.remember_tree()
            code = child.proc.poll()
            if code is not None:
                raise FleetError(f"{child.name} exited with status {code} "
                                 f"(log {child.log_path}):\n{child.tail()}")

    # -- run, stop -------------------------------------------------------------------------

    def watch(self) -> int:
        """Until SIGINT/SIGTERM (0) or a child's death (1); everything is stopped after."""
        code = 0
        try:
            while not self._stopping.wait(0.5):
                self._check_children()
        except FleetError as exc:
            print(f"\nfleet: {exc}\nstopping the rest", file=sys.stderr, flush=True)
            code = 1
        finally:
            self.stop()
        return code

    def request_stop(self, *_: object) -> None:
        self._stopping.set()

    def stop(self, grace_s: float = GRACE_S) -> None:
        """APIs and hosts get SIGTERM together, then the S3 server; SIGKILL after ``grace_s``;
        last, anything left of each child's process tree (sandboxes included)."""
        for child in self.children:
            child.remember_tree()
        front = [c for c in self.children if c.name != "moto"]
        for group in (front, [c for c in self.children if c.name == "moto"]):
            for child in group:
                child.signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for child in group:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            for child in group:
                if child.proc.poll() is None:
                    child.signal(signal.SIGKILL)
                    child.proc.wait(timeout=30)
        for child in self.children:
            for proc in child.tree:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        self.children = []

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def banner(self) -> str:
        cfg = self.config
        logs = ", ".join(c.log_path.name for c in self.children)
        apis = "  ".join(cfg.api_urls)
        return "\n".join([
            f"fleet ready in {self.ready_s or 0:.0f} s: {len(cfg.api_ports)} API replicas "
            f"(LOWERING_EXECUTOR=celery), worker hosts {', '.join(cfg.host_names)} "
            f"({cfg.workers_per_host} job(s) at a time each)",
            f"  API       {apis}",
            f"  broker    {cfg.broker_url}",
            f"  database  {cfg.database_url}",
            f"  S3        {cfg.s3_endpoint} bucket lowering (moto, in memory; key test/test)",
            f"  run dir   {self.run_dir} (a data dir per host and API)",
            f"  logs      {self.logs_dir}/ {logs}",
            "try:",
            f"  curl -s {cfg.api_urls[0]}/v1/info | python3 -m json.tool",
            f"  curl -s -D - -o /dev/null -F program=@model.pt2 "
            f"'{cfg.api_urls[-1]}/v1/lowerings?wait=600'   # x-lowering-id: <id>",
            f"  curl -s {cfg.api_urls[0]}/v1/lowerings/<id>   # any replica; 'worker' names "
            "the host",
            f"  curl -sL -o model.aoti.pt2 {cfg.api_urls[0]}/v1/lowerings/<id>/artifact   "
            "# 307 to S3",
            "Ctrl-C (or SIGTERM) stops everything.",
            *([self.timeout_note] if self.timeout_note else []),
        ])


def _die_with_launcher() -> None:
    """In the child before exec: SIGTERM when the launcher dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _moto_server() -> str | None:
    """The moto_server beside this interpreter (the venv's), else one on PATH."""
    return shutil.which("moto_server", path=f"{Path(sys.executable).parent}{os.pathsep}"
                        f"{os.environ.get('PATH', '')}")


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
    except httpx.TransportError:
        return False
    return True


def _primed(inductor_dir: Path) -> bool:
    from app.sandbox.cache import toolchain_stamp

    return (inductor_dir / f"primed-{toolchain_stamp()}.json").is_file()


def _ports(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(",") if p.strip())


def main(argv: list[str] | None = None) -> int:
    defaults = FleetConfig()
    parser = argparse.ArgumentParser(prog="python -m app.devfleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=defaults.hosts, help="worker hosts")
    parser.add_argument("--workers-per-host", type=int, default=defaults.workers_per_host,
                        help="jobs one host runs at a time (its LOWERING_WORKERS)")
    parser.add_argument("--api-ports", type=_ports, default=defaults.api_ports,
                        help="one API replica per port (comma-separated)")
    parser.add_argument("--s3-port", type=int, default=defaults.s3_port)
    parser.add_argument("--vhost", default=defaults.vhost, help="RabbitMQ vhost (recreated)")
    parser.add_argument("--database", default=defaults.database,
                        help="PostgreSQL database (recreated)")
    parser.add_argument("--pg-admin-url", default=defaults.pg_admin_url,
                        help="a PostgreSQL URL that may create databases")
    parser.add_argument("--run-dir", type=Path, default=defaults.run_dir,
                        help="data dirs and logs of every process")
    parser.add_argument("--inductor-cache-dir", type=Path, default=None,
                        help="one inductor cache for every host (default: each its own)")
    args = parser.parse_args(argv)
    fleet = Fleet(FleetConfig(
        hosts=args.hosts, api_ports=args.api_ports, s3_port=args.s3_port, vhost=args.vhost,
        database=args.database, run_dir=args.run_dir, workers_per_host=args.workers_per_host,
        inductor_cache_dir=args.inductor_cache_dir, pg_admin_url=args.pg_admin_url))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, fleet.request_stop)
    print(f"fleet: starting {args.hosts} worker host(s) and {len(args.api_ports)} API(s); "
          f"logs in {fleet.logs_dir}", flush=True)
    try:
        fleet.start()
    except FleetError as exc:
        print(f"fleet: cannot start: {exc}", file=sys.stderr, flush=True)
        return 1
    print(fleet.banner(), flush=True)
    code = fleet.watch()
    print("fleet: stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
