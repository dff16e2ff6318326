"""What does a retention sweep cost on a big job table? Info, no target.

Fills a fresh job database (SQLite here, or a fresh PostgreSQL database with --postgresql)
with N succeeded jobs whose archives are shared in pairs (a cache hit each), then times,
in the same run:

- plain:  ``SELECT count(*)`` over the job table (the floor any sweep pays);
- usage:  ``Retention.usage`` (what /v1/info and /metrics show: one grouped query);
- sweep:  one ``Retention.sweep`` that finds nothing to remove (the every-minute case);
- evict:  one sweep over a budget one byte under what is stored: it evicts down to 90% of
          the budget, about a tenth of the archives (and deletes their files); per archive.

and prints each as a ratio to plain. Archives are tiny files: this times the database work.

    .venv/bin/python bench/bench_retention.py [--jobs 100000] [--postgresql]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import func, insert, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.jobs import migrate  # noqa: E402
from app.jobs.models import lowerings  # noqa: E402
from app.jobs.retention import Retention  # noqa: E402
from app.jobs.store import JobStore, utcnow  # noqa: E402
from app.settings import Settings  # noqa: E402
from app.storage.artifacts import LocalArtifactStore  # noqa: E402
from app.storage.files import LocalLogStore, LocalUploadStore  # noqa: E402


@contextlib.contextmanager
def database(postgresql: bool, root: Path) -> Iterator[str]:
    if not postgresql:
        yield f"sqlite:///{root / 'jobs.db'}"
        return
    from tests.integration.conftest import fresh_pg_database

    with fresh_pg_database() as url:
        yield url


def fill(store: JobStore, artifacts: LocalArtifactStore, jobs: int) -> None:
    """``jobs`` succeeded jobs, two per archive, finished over the last 20 days."""
    now = utcnow()
    rows = []
    for n in range(jobs):
        if n % 2 == 0:
            ref = artifacts.put_stream(io.BytesIO(f"archive {n}".encode()))
        finished = now - dt.timedelta(seconds=20 * 86_400 * (jobs - n) / jobs)
        rows.append({"id": uuid.uuid4().hex, "status": "succeeded", "model_name": "m",
                     "backend_id": "aoti", "device": "cpu", "options": {}, "verify": True,
                     "rtol": 1e-4, "atol": 1e-4, "input_sha256": "0" * 64,
                     "input_size_bytes": 1000, "artifact_sha256": ref.sha256,
                     "artifact_size_bytes": ref.size_bytes, "timings": {}, "attempts": 1,
                     "cache_hit": n % 2 == 1, "created_at": finished, "finished_at": finished,
                     "input_removed_at": finished, "tenant": "default"})
        if len(rows) == 5000:
            with store.engine.begin() as conn:
                conn.execute(insert(lowerings), rows)
            rows = []
    if rows:
        with store.engine.begin() as conn:
            conn.execute(insert(lowerings), rows)


def timed(step: Callable[[], object], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--postgresql", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp, database(args.postgresql, Path(temp)) as url:
        root = Path(temp)
        migrate.upgrade(url)
        store = JobStore(url)
        artifacts = LocalArtifactStore(root / "artifacts")
        (root / "logs").mkdir()
        started = time.perf_counter()
        fill(store, artifacts, args.jobs)
        print(f"filled {args.jobs} jobs ({args.jobs // 2} archives) in "
              f"{time.perf_counter() - started:.1f} s on {store.engine.dialect.name}")

        def retention(**overrides: object) -> Retention:
            settings = Settings(data_dir=root / "data", **overrides)  # type: ignore[arg-type]
            return Retention(store, uploads=LocalUploadStore(root / "uploads"),
                             logs=LocalLogStore(root / "logs"), artifacts=artifacts,
                             settings=settings)

        def plain() -> None:
            with store.engine.connect() as conn:
                conn.execute(select(func.count()).select_from(lowerings)).scalar_one()

        quiet = retention(log_ttl_s=None)
        quiet.sweep()  # the hourly listing of archives: once, not timed with the rest
        stored = quiet.usage()
        budget = stored.total_bytes - 1
        evicting = retention(log_ttl_s=None, storage_budget_bytes=budget, evict_grace_s=0)
        evicting.remove_orphans = lambda sweep, *, now: None  # type: ignore[method-assign]
        figures = {"plain": timed(plain, 5), "usage": timed(quiet.usage, 5),
                   "sweep": timed(quiet.sweep, 5)}
        started = time.perf_counter()
        result = evicting.sweep()
        evicted = max(1, result.archives_budget)
        figures["evict"] = (time.perf_counter() - started) / evicted
        store.close()
    for name, seconds in figures.items():
        print(f"{name:6s} {seconds * 1000:9.1f} ms  {seconds / figures['plain']:8.1f}x plain")
    print(f"(evict: per archive; it removed {result.archives_budget} of {args.jobs // 2})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
