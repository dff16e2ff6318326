"""The figures. Each takes a running server (or two) and returns rows for the final table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from harness import (
    JOB_TIMEOUT_S,
    RssSampler,
    Server,
    plain_measured,
    plain_once,
    submit,
    wait_final,
)

WAIT_S = JOB_TIMEOUT_S
MiB = 1 << 20
MB = 1_000_000


@dataclass
class Row:
    figure: str
    measured: str
    target: str
    verdict: str  # "pass", "FAIL" or "n/a"


@dataclass
class Distinct:
    """What the distinct-model figure leaves behind for the identical-request one."""

    plain_s: list[float] = field(default_factory=list)
    service_s: list[float] = field(default_factory=list)
    done: list[tuple[Path, str]] = field(default_factory=list)  # (program, job id)
    jobs: list[dict[str, Any]] = field(default_factory=list)


def _verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def _timed_submit(client: httpx.Client, program: Path, bypass: bool = False
                  ) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = submit(client, program, wait_s=WAIT_S, bypass=bypass)
    elapsed = time.perf_counter() - started  # the whole archive has been read by now
    if response.headers.get("content-type") != "application/zip":
        raise RuntimeError(f"{program.name}: expected the archive, got {response.text[:300]}")
    return elapsed, response


def distinct(server: Server, programs: list[Path], plain_cache: Path, out_dir: Path,
             state: Distinct) -> list[Row]:
    """Upload -> archive in hand vs a fresh python (warm disk cache), same program each."""
    with server.client() as client:
        for i, program in enumerate(programs):
            # Alternate who goes first so drift on the machine hits both sides alike.
            sides = ("plain", "service") if i % 2 == 0 else ("service", "plain")
            for side in sides:
                if side == "plain":
                    state.plain_s.append(plain_once(program, out_dir / program.name, plain_cache))
                else:
                    elapsed, response = _timed_submit(client, program)
                    state.service_s.append(elapsed)
                    job_id = response.headers["x-lowering-id"]
                    state.done.append((program, job_id))
                    state.jobs.append(client.get(f"/v1/lowerings/{job_id}").json())
            print(f"  distinct {program.stem:18s} plain {state.plain_s[-1]:6.2f} s   "
                  f"service {state.service_s[-1]:6.2f} s", flush=True)
    plain, service = statistics.median(state.plain_s), statistics.median(state.service_s)
    ratio = service / plain
    print(f"  plain median {plain:.2f} s (n={len(state.plain_s)}), service median "
          f"{service:.2f} s (n={len(state.service_s)})")
    hits = sum(bool(job.get("cache_hit")) for job in state.jobs)
    if hits:
        print(f"  WARNING: {hits} distinct submissions were cache hits")
    return [Row("distinct model: service / plain (median)",
                f"{ratio:.2f} ({service:.1f} s / {plain:.1f} s)", "<= 0.75",
                _verdict(ratio <= 0.75 and not hits))]


def identical(server: Server, state: Distinct) -> list[Row]:
    """The same bytes and parameters again: should come straight from the result cache."""
    times, hits = [], []
    with server.client() as client:
        for program, _ in state.done:
            elapsed, response = _timed_submit(client, program)
            times.append(elapsed)
            job = client.get(f"/v1/lowerings/{response.headers['x-lowering-id']}").json()
            hits.append(job.get("cache_hit"))
            print(f"  identical {program.stem:18s} {elapsed * 1000:8.1f} ms  "
                  f"cache_hit={job.get('cache_hit', 'n/a')}", flush=True)
    service, plain = statistics.median(times), statistics.median(state.plain_s)
    ratio = service / plain
    measured = f"1/{plain / service:.0f} ({service * 1000:.0f} ms / {plain:.1f} s)"
    verdict = _verdict(ratio <= 0.01)
    if not any(hits):
        verdict, measured = "n/a", measured + " no cache_hit"
    return [Row("identical request: service / plain", measured, "<= 1/100", verdict)]


def _busy_s() -> float:
    # Whole-machine non-idle CPU seconds, other load on the host included: shows contention.
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def _job_cores(jobs: list[dict[str, Any]], wall_s: float) -> str:
    # Worker + g++ CPU seconds per wall second: near the core count, parallelism can't help.
    used = [(job.get("resources") or {}) for job in jobs]
    cpu_s = sum(r.get("cpu_s", 0.0) + r.get("children_cpu_s", 0.0) for r in used)
    return f"the jobs' own CPU {cpu_s / wall_s:.2f} cores" if cpu_s else "jobs' CPU n/a"


def parallel(server: Server, one_by_one: list[Path], at_once: list[Path]) -> list[Row]:
    """N distinct models submitted together vs N others one after another, same server."""
    with server.client() as client:
        cpu, started = _busy_s(), time.perf_counter()
        ids = [_timed_submit(client, program, bypass=True)[1].headers["x-lowering-id"]
               for program in one_by_one]
        sequential = time.perf_counter() - started
        busy = (_busy_s() - cpu) / sequential
        jobs = [client.get(f"/v1/lowerings/{job_id}").json() for job_id in ids]
    print(f"  {len(one_by_one)} one after another: {sequential:.1f} s, machine busy "
          f"{busy:.2f} cores on average, {_job_cores(jobs, sequential)}", flush=True)
    limits = httpx.Limits(max_connections=len(at_once) + 2)
    with httpx.Client(base_url=server.url, timeout=WAIT_S + 60, limits=limits) as client:
        cpu, started = _busy_s(), time.perf_counter()
        with ThreadPoolExecutor(len(at_once)) as pool:
            list(pool.map(lambda p: _timed_submit(client, p, bypass=True), at_once))
        together = time.perf_counter() - started
    print(f"  {len(at_once)} at once:           {together:.1f} s, machine busy "
          f"{(_busy_s() - cpu) / together:.2f} cores on average", flush=True)
    ratio = together / sequential
    return [Row(f"{len(at_once)} at once / one by one (wall)",
                f"{ratio:.2f} ({together:.0f} s / {sequential:.0f} s)", "<= 0.65",
                _verdict(ratio <= 0.65))]


def latency(server: Server, programs: list[Path], workers: int, requests: int) -> list[Row]:
    """GET /v1/lowerings/{id} round trips while every worker is compiling."""
    with server.client() as client:
        ids = [submit(client, program, bypass=True).json()["id"] for program in programs]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait until every worker has a job
            running = [client.get(f"/v1/lowerings/{i}").json()["status"] for i in ids]
            if running.count("running") >= min(workers, len(ids)):
                break
            time.sleep(0.05)
        samples_ms, busy = [], 0
        for n in range(requests):
            job_id = ids[n % len(ids)]
            started = time.perf_counter()
            response = client.get(f"/v1/lowerings/{job_id}")
            samples_ms.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
            busy += response.json()["status"] == "running"
        for job_id in ids:
            wait_final(client, job_id)
    samples_ms.sort()
    p50 = samples_ms[len(samples_ms) // 2]
    p99 = samples_ms[min(len(samples_ms) - 1, int(len(samples_ms) * 0.99))]
    print(f"  {len(samples_ms)} GETs ({busy} answered 'running'): p50 {p50:.1f} ms, "
          f"p99 {p99:.1f} ms, max {samples_ms[-1]:.1f} ms", flush=True)
    return [Row(f"GET job while {workers} workers compile, p50", f"{p50:.1f} ms", "info", "-"),
            Row(f"GET job while {workers} workers compile, p99", f"{p99:.1f} ms", "< 50 ms",
                _verdict(p99 < 50))]


def _zeros_body(boundary: str, size_bytes: int, chunk_bytes: int = MiB) -> Iterator[bytes]:
    # Looks like the start of a zip, then zeros; one reused chunk, so the client holds ~1 MiB.
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model_name\"\r\n\r\nbig\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"program\"; "
           f"filename=\"big.pt2\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    yield b"PK\x03\x04"
    chunk, left = bytes(chunk_bytes), size_bytes - 4
    while left > 0:
        yield chunk[:left] if left < chunk_bytes else chunk
        left -= chunk_bytes
    yield f"\r\n--{boundary}--\r\n".encode()


def upload(server: Server, size_bytes: int) -> list[Row]:
    """RSS of the API process (not its workers) before and at peak during a big upload."""
    boundary = "lowering-bench-boundary-7f3a"
    length = sum(len(part) for part in _zeros_body(boundary, size_bytes, chunk_bytes=64 * MiB))
    headers = {"content-type": f"multipart/form-data; boundary={boundary}",
               "content-length": str(length)}
    with RssSampler(server.pid) as before:
        time.sleep(1.0)
    with httpx.Client(base_url=server.url, timeout=600) as client, \
            RssSampler(server.pid) as sampler:
        started = time.perf_counter()
        response = client.post("/v1/lowerings", content=_zeros_body(boundary, size_bytes),
                               headers=headers)
        elapsed = time.perf_counter() - started
    rise = sampler.peak - before.peak
    print(f"  {size_bytes / MiB:.0f} MiB in {elapsed:.1f} s -> HTTP {response.status_code} "
          f"{response.text[:160]}", flush=True)
    print(f"  API RSS before {before.peak / MB:.0f} MB, peak {sampler.peak / MB:.0f} MB "
          f"({sampler.samples} samples)", flush=True)
    return [Row(f"API RSS rise, {size_bytes / 2**30:.0f} GiB upload",
                f"{rise / MB:.1f} MB (HTTP {response.status_code})", "< 64 MB",
                _verdict(rise < 64 * MB))]


def sandbox_cost(sandboxed: Server, unsandboxed: Server, programs: list[Path]) -> list[Row]:
    """The same distinct programs through LOWERING_SANDBOX=required and =off servers."""
    on_s: list[float] = []
    off_s: list[float] = []
    with sandboxed.client() as on, unsandboxed.client() as off:
        for i, program in enumerate(programs):
            # Alternate who goes first so drift on the machine hits both sides alike.
            sides = ((on, on_s), (off, off_s)) if i % 2 == 0 else ((off, off_s), (on, on_s))
            for client, times in sides:
                times.append(_timed_submit(client, program)[0])
            print(f"  sandbox {program.stem:18s} required {on_s[-1]:6.2f} s   "
                  f"off {off_s[-1]:6.2f} s", flush=True)
    on_med, off_med = statistics.median(on_s), statistics.median(off_s)
    return [Row("sandbox: required / off, distinct model (median)",
                f"{on_med / off_med:.2f} ({on_med:.1f} s / {off_med:.1f} s)", "info", "-"),
            Row("sandbox cost per job (median difference)",
                f"{statistics.median(a - b for a, b in zip(on_s, off_s, strict=True)):+.2f} s",
                "info", "-")]


def weights(server: Server, programs: list[Path], plain_cache: Path, out_dir: Path
            ) -> list[Row]:
    """Cost as the weights grow: each program through the plain way and the service, with
    end-to-end time, the worker's and the API's peak RSS, and the archive's size."""
    rows: list[Row] = []
    with server.client() as client:
        for program in programs:
            name = program.stem.split("_")[0]  # w10, w100, w1000
            upload = program.stat().st_size
            plain_out = out_dir / f"{program.stem}.pt2"
            plain_s, plain_rss = plain_measured(program, plain_out, plain_cache)
            plain_size = plain_out.stat().st_size
            plain_out.unlink()
            api = psutil.Process(server.pid)
            before = api.memory_info().rss
            with RssSampler(server.pid) as rss:
                service_s, response = _timed_submit(client, program, bypass=True)
            job = client.get(f"/v1/lowerings/{response.headers['x-lowering-id']}").json()
            worker_rss = (job.get("resources") or {}).get("peak_rss_bytes") or 0
            archive = len(response.content)
            print(f"  {program.name}: upload {upload / MB:.0f} MB; plain {plain_s:.1f} s, "
                  f"peak RSS {plain_rss / MB:.0f} MB, archive {plain_size / MB:.0f} MB; service "
                  f"{service_s:.1f} s, worker peak RSS {worker_rss / MB:.0f} MB, API rise "
                  f"{(rss.peak - before) / MB:.1f} MB, archive {archive / MB:.0f} MB", flush=True)
            print(f"    where the service's time went: {_breakdown(job, service_s)}", flush=True)
            rows += [
                Row(f"{name}: end to end, service / plain",
                    f"{service_s / plain_s:.2f} ({service_s:.1f} s / {plain_s:.1f} s)", "info",
                    "-"),
                Row(f"{name}: worker peak RSS / weights (plain)",
                    f"{worker_rss / upload:.2f}x ({plain_rss / upload:.2f}x)", "<= 2.5x",
                    _verdict(0 < worker_rss <= 2.5 * upload)),
                Row(f"{name}: API RSS rise", f"{(rss.peak - before) / MB:.1f} MB", "< 64 MB",
                    _verdict(rss.peak - before < 64 * MB)),
                Row(f"{name}: archive / upload (plain)",
                    f"{archive / upload:.2f}x ({plain_size / upload:.2f}x)", "<= 1.10x",
                    _verdict(archive <= 1.10 * upload)),
            ]
    return rows


def _breakdown(job: dict[str, Any], service_s: float) -> str:
    """The job's phases, its time queued and stored, and the rest of ``service_s``
    (upload, gate, hand-over, download), from the job's timings and timestamps."""
    def stamp(key: str) -> datetime | None:
        value = job.get(key)
        return datetime.fromisoformat(value) if isinstance(value, str) else None

    created, started, finished = (stamp(k) for k in ("created_at", "started_at",
                                                     "finished_at"))
    timings = {k: float(v) for k, v in (job.get("timings") or {}).items()}
    validate = timings.pop("validate", 0.0)  # the gate, in the API before the job exists
    phases = sum(timings.values())
    parts = [f"gate (validate) {validate:.1f} s",
             ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + f" (phases {phases:.1f} s)"]
    if created and started and finished:
        queued = (started - created).total_seconds()
        ran = (finished - started).total_seconds()
        parts += [f"created->started {queued:.1f} s",
                  f"started->finished {ran:.1f} s (of which not in a phase: "
                  f"{ran - phases:.1f} s: hand-over to the child, its exit, archive check "
                  "and store)",
                  f"the rest {service_s - queued - ran - validate:.1f} s (upload, download)"]
    return "; ".join(parts)
