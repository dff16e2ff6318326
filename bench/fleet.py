"""The fleet figures: ``make fleet`` (app/devfleet.py: RabbitMQ, PostgreSQL, moto S3, worker
hosts, two API replicas) started from here, measured against itself and ``make serve``.

a. scale-out: 8 distinct programs submitted at once, archive in hand, through a fleet with
   two worker hosts vs the same 8 through a fleet with one (each host runs one job at a
   time; each fleet has a fresh database and bucket, and uploads skip the result cache, so
   nothing is a hit). Target <= 0.6x.
b. cache hit: the same upload again, archive in hand, through the fleet (API replica ->
   PostgreSQL -> 307 to a presigned S3 URL -> moto) vs through a local single-process
   service (LOWERING_EXECUTOR=local, as ``make serve``). Interleaved medians. Target <= 2x.

    .venv/bin/python bench/bench_lowering.py --only fleet      # or: python bench/fleet.py
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from figures import Row, _busy_s, _job_cores, _verdict
from harness import JOB_TIMEOUT_S, ROOT, SUBMIT_RETRIES, Server, _why, free_port

sys.path.insert(0, str(ROOT))
from app.devfleet import (  # noqa: E402  (the repository root, as a script)
    Fleet,
    FleetConfig,
    delete_vhost,
    drop_database,
)

PARALLEL = 8
HITS = 15


def lowered(client: httpx.Client, program: Path, *, bypass: bool = False) -> tuple[float, str]:
    """Upload -> archive in hand (following the fleet's redirect to S3): (seconds, job id)."""
    params: dict[str, object] = {"wait": JOB_TIMEOUT_S}
    if bypass:
        params["cache"] = "bypass"
    started = time.perf_counter()
    for _ in range(SUBMIT_RETRIES):
        with program.open("rb") as handle:
            response = client.post("/v1/lowerings", params=params,
                                   data={"model_name": program.stem},
                                   files={"program": (program.name, handle)})
        if response.status_code != 429:
            break
        time.sleep(1.0)
    if response.status_code == 307:  # S3: the archive is one more GET away, as for a client
        archive = httpx.get(response.headers["location"], timeout=JOB_TIMEOUT_S)
        archive.raise_for_status()
        content = archive.content
    elif response.status_code == 200:
        content = response.content
    else:
        raise RuntimeError(f"{program.name}: HTTP {response.status_code}: {_why(response)}")
    elapsed = time.perf_counter() - started
    if content[:2] != b"PK":
        raise RuntimeError(f"{program.name}: expected the archive, got {content[:100]!r}")
    return elapsed, response.headers["x-lowering-id"]


def _config(tmp: Path, hosts: int, inductor_dir: Path) -> FleetConfig:
    tag = uuid.uuid4().hex[:8]
    return FleetConfig(hosts=hosts, api_ports=(free_port(), free_port()), s3_port=free_port(),
                       vhost=f"lowering-bench-{tag}", database=f"bench_fleet_{tag}",
                       run_dir=tmp / f"fleet-{hosts}-{tag}", inductor_cache_dir=inductor_dir,
                       env={"LOWERING_LOG_LEVEL": "warning", "LOWERING_MAX_QUEUED": "64"})


def _at_once(urls: list[str], programs: list[Path]) -> tuple[float, list[str], str]:
    """All programs submitted together, spread over the replicas: wall seconds, the host
    each ran on, and how busy the machine and the jobs were (other load shows here)."""
    clients = [httpx.Client(base_url=url, timeout=JOB_TIMEOUT_S + 60,
                            limits=httpx.Limits(max_connections=len(programs) + 2))
               for url in urls]
    try:
        cpu, started = _busy_s(), time.perf_counter()
        with ThreadPoolExecutor(len(programs)) as pool:
            ids = list(pool.map(lambda i: lowered(clients[i % len(clients)], programs[i],
                                                  bypass=True)[1], range(len(programs))))
        wall = time.perf_counter() - started
        busy = f"machine busy {(_busy_s() - cpu) / wall:.2f} cores on average"
        jobs = [clients[0].get(f"/v1/lowerings/{i}").json() for i in ids]
    finally:
        for client in clients:
            client.close()
    ran_on = [str(job.get("worker") or "?").split("@")[0] for job in jobs]
    return wall, ran_on, f"{busy}, {_job_cores(jobs, wall)}"


def _cache_hits(fleet_url: str, local_url: str, program: Path) -> tuple[float, float]:
    """Median seconds of a cache hit through each, interleaved, after one lowering each."""
    times: dict[str, list[float]] = {fleet_url: [], local_url: []}
    with httpx.Client(base_url=fleet_url, timeout=JOB_TIMEOUT_S + 60) as on_fleet, \
            httpx.Client(base_url=local_url, timeout=JOB_TIMEOUT_S + 60) as on_local:
        for client in (on_fleet, on_local):
            lowered(client, program)  # the lowering that the hits below hit
        for i in range(HITS):
            order = (on_fleet, on_local) if i % 2 == 0 else (on_local, on_fleet)
            for client in order:
                elapsed, job_id = lowered(client, program)
                job = client.get(f"/v1/lowerings/{job_id}").json()
                if not job.get("cache_hit"):
                    raise RuntimeError(f"{client.base_url}: not a cache hit: {job}")
                times[str(client.base_url).rstrip("/")].append(elapsed)
    return statistics.median(times[fleet_url]), statistics.median(times[local_url])


def fleet(local: Server, programs: list[Path], hit_program: Path, tmp: Path,
          inductor_dir: Path) -> list[Row]:
    """Both figures; ``local`` is a running LOWERING_EXECUTOR=local service, and the fleets'
    hosts share ``inductor_dir`` (the local service's, primed: hosts then skip priming)."""
    walls: dict[int, float] = {}
    rows: list[Row] = []
    for hosts in (1, 2):
        config = _config(tmp, hosts, inductor_dir)
        try:
            with Fleet(config) as running:
                print(f"  fleet with {hosts} worker host(s) ready in {running.ready_s:.0f} s",
                      flush=True)
                time.sleep(5)  # each host's sandbox warms up after it joins, as on a live fleet
                walls[hosts], ran_on, load = _at_once(running.config.api_urls, programs)
                print(f"  {len(programs)} at once on {hosts} host(s): {walls[hosts]:.1f} s (ran on "
                      f"{', '.join(f'{h} {ran_on.count(h)}' for h in sorted(set(ran_on)))}; "
                      f"{load})", flush=True)
                if hosts == 2:
                    ratio = walls[2] / walls[1]
                    rows.append(Row(f"fleet: {len(programs)} distinct on 2 hosts / on 1 host "
                                    "(wall)", f"{ratio:.2f} ({walls[2]:.0f} s / {walls[1]:.0f} s)",
                                    "<= 0.6", _verdict(ratio <= 0.6)))
                    rows.append(_hit_row(running.config.api_urls[0], local.url, hit_program))
        finally:  # the vhost and database, also when a figure failed
            delete_vhost(config.vhost)
            drop_database(config.pg_admin_url, config.database)
    return rows


def _hit_row(fleet_url: str, local_url: str, program: Path) -> Row:
    figure = "fleet cache hit / local service cache hit"
    try:
        fleet_s, local_s = _cache_hits(fleet_url, local_url, program)
    except Exception as exc:  # the scale-out row above stays
        print(f"  cache hit failed: {type(exc).__name__}: {exc}", flush=True)
        return Row(figure, f"error: {type(exc).__name__}", "<= 2", "n/a")
    print(f"  cache hit: fleet {fleet_s * 1000:.1f} ms, local service {local_s * 1000:.1f} ms "
          f"(medians of {HITS})", flush=True)
    ratio = fleet_s / local_s
    return Row(figure, f"{ratio:.2f} ({fleet_s * 1000:.0f} ms / {local_s * 1000:.0f} ms)",
               "<= 2", _verdict(ratio <= 2))


if __name__ == "__main__":  # a stand-alone run: python bench/fleet.py
    import tempfile

    from harness import generate, serve

    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp_name:
        tmp = Path(tmp_name)
        seed = int(time.time()) % 100_000 * 1000
        kinds = ("mlp", "conv", "dynamic")
        specs = [f"{kinds[i % 3]}:{seed + i}" for i in range(PARALLEL + 1)]
        generate(tmp / "programs", specs)
        made = [tmp / "programs" / f"{spec.replace(':', '_s')}.pt2" for spec in specs]
        extra = {"LOWERING_INDUCTOR_CACHE_DIR": str(tmp / "inductor")}
        with serve(tmp / "data", workers=1, extra_env=extra) as running:
            for row in fleet(running, made[:PARALLEL], made[PARALLEL], tmp, tmp / "inductor"):
                print(f"{row.figure}: {row.measured} (target {row.target}) {row.verdict}")
