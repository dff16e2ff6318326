"""lowerctl: submit torch.export programs to the lowering service and fetch the results.

Exit codes:
  0  success
  1  the job failed or was cancelled (or was still running when --timeout ran out)
  2  usage or API error (the server's message is printed)
  3  the service cannot be reached
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from app.client.exceptions import ChecksumMismatch, LoweringAPIError
from app.client.sdk import FORM, RESUMABLE_THRESHOLD_BYTES, Job, LoweringClient
from app.constants import FINAL_STATUSES, JobStatus

EXIT_OK, EXIT_JOB_FAILED, EXIT_ERROR, EXIT_UNREACHABLE = 0, 1, 2, 3
FINAL = frozenset(status.value for status in FINAL_STATUSES)
DEFAULT_URL = "http://127.0.0.1:8000"


def _option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        # Not JSON (e.g. max-autotune): pass it on as the plain string the user typed.
        return key, raw


def _target(text: str) -> dict[str, Any]:
    """DEVICE[:KEY=VALUE[,KEY=VALUE...]], e.g. cpu:cpp.march=x86-64-v3, cuda:0, cuda."""
    device, sep, rest = text.partition(":")
    if sep and "=" not in rest.partition(":")[0]:  # cuda:N, then maybe :KEY=VALUE,...
        index, _, rest = rest.partition(":")
        device = f"{device}:{index}"
    if not device:
        raise argparse.ArgumentTypeError(f"expected DEVICE[:KEY=VALUE,...], got {text!r}")
    target: dict[str, Any] = {"device": device}
    if rest:
        target["options"] = dict(_option(pair) for pair in rest.split(","))
    return target


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; built per call so LOWERING_URL is read when lowerctl runs."""
    parser = argparse.ArgumentParser(prog="lowerctl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("LOWERING_URL", DEFAULT_URL),
                        help="service URL (default: $LOWERING_URL or %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("LOWERING_API_KEY"),
                        help="the API key, sent as `Authorization: Bearer` (default: "
                        "$LOWERING_API_KEY; a service with LOWERING_AUTH=off needs none)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--timeout", type=float, default=None, metavar="S",
                         help="give up waiting after S seconds (exit 1)")
    waiting.add_argument("--poll", type=float, default=0.5, metavar="S",
                         help="seconds between status polls (default %(default)s)")
    waiting.add_argument("--no-events", dest="events", action="store_false",
                         help="poll the job instead of following its progress events")

    submit = commands.add_parser("submit", parents=[waiting], help="upload a .pt2 program")
    submit.add_argument("file", type=Path, metavar="FILE", nargs="?",
                        help="the program (or name an earlier upload with --upload)")
    sending = submit.add_mutually_exclusive_group()
    sending.add_argument("--resumable", action="store_true",
                         help="send FILE in parts, retrying each (always done from "
                         f"{RESUMABLE_THRESHOLD_BYTES // 1024**2} MiB); nothing is sent "
                         "when the service already holds the same bytes")
    sending.add_argument("--upload", metavar="ID", help="lower a ready upload (an upload id "
                         "or sha256:HEX) instead of FILE")
    # One flag per field of the form (app.schemas.LoweringCreate), with its default.
    submit.add_argument("--model-name", required=True, help=FORM["model_name"].description)
    submit.add_argument("--backend-id", default=FORM["backend_id"].default,
                        help="lowering backend (default %(default)s)")
    submit.add_argument("--device", default=FORM["device"].default,
                        help="cpu, cuda or cuda:N (default %(default)s)")
    submit.add_argument("--option", dest="options", type=_option, action="append", default=[],
                        metavar="KEY=VALUE", help="backend option; VALUE is JSON if it parses")
    submit.add_argument("--no-verify", dest="verify", action="store_false",
                        default=FORM["verify"].default,
                        help="skip comparing the lowered program against the eager one")
    submit.add_argument("--rtol", type=float, default=FORM["rtol"].default,
                        help="relative tolerance of verification (default: the server's)")
    submit.add_argument("--atol", type=float, default=FORM["atol"].default,
                        help="absolute tolerance of verification (default: the server's)")
    submit.add_argument("--callback-url", default=FORM["callback_url"].default, metavar="URL",
                        help="tell this URL the job's outcome (a signed webhook delivery)")
    submit.add_argument("--target", dest="targets", type=_target, action="append",
                        default=FORM["targets"].default, metavar="DEVICE[:KEY=VALUE,...]",
                        help="one job per --target, sharing the upload; its options are "
                        "merged over --option (e.g. --target cpu:cpp.march=x86-64-v3 "
                        "--target cuda); prints the list of jobs")
    submit.add_argument("--wait", action="store_true", help="wait until the job ends")
    submit.add_argument("-o", "--output", type=Path, metavar="OUT",
                        help="download the artifact here once it succeeds (implies --wait)")

    for name, text in (("status", "show a job"), ("cancel", "cancel a job"),
                       ("log", "print a job's worker log")):
        commands.add_parser(name, help=text).add_argument("job_id", metavar="ID")
    wait = commands.add_parser("wait", parents=[waiting], help="wait until a job ends")
    wait.add_argument("job_id", metavar="ID")
    upload = commands.add_parser("upload", help="send a program in parts (resumable) and "
                                 "print the ready upload; submit it with --upload ID")
    upload.add_argument("file", type=Path, metavar="FILE")
    download = commands.add_parser("download", help="download a job's artifact")
    download.add_argument("job_id", metavar="ID")
    download.add_argument("-o", "--output", type=Path, required=True, metavar="OUT")

    listing = commands.add_parser("list", help="list jobs, newest first")
    listing.add_argument("--status", choices=[status.value for status in JobStatus])
    listing.add_argument("--model-name")
    listing.add_argument("--limit", type=int)
    listing.add_argument("--cursor", help="continue from an earlier page's next cursor")
    return parser


def describe(job: Job) -> str:
    """Where a job is, in words: "queued, 3 ahead", "running: lower", "succeeded".
    Events carry ``queue_position`` (and ``leader`` for a coalesced job); a polled job
    has neither."""
    status = str(job.get("status") or "waiting")
    phase = job.get("phase")
    if status == JobStatus.RUNNING.value:
        return f"running: {phase or 'starting'}"
    if status != JobStatus.QUEUED.value:
        return status
    text = "queued"
    position = job.get("queue_position")
    if isinstance(position, int):
        text += ", next" if position == 0 else f", {position} ahead"
    if phase == "waiting_for_host":
        text += ", waiting for a worker host that serves its target"
    leader = job.get("leader")
    if isinstance(leader, dict):
        text += f", coalesced with {leader.get('id')}"
        if leader.get("status") == JobStatus.RUNNING.value:
            text += f" (running: {leader.get('phase') or 'starting'})"
    elif job.get("coalesced_with"):
        text += f", coalesced with {job['coalesced_with']}"
    return text


class _Progress:
    """The live status line. Rich re-renders it on its own clock, so elapsed time
    keeps ticking between updates."""

    def __init__(self, job_id: str) -> None:
        self.job: Job = {"id": job_id}
        self.started = time.monotonic()
        self.spinner = Spinner("dots")

    def update(self, job: Job) -> None:
        self.job = job

    def __rich__(self) -> Spinner:
        self.spinner.text = Text.assemble(
            (f"{self.job['id']}  ", "dim"),
            (describe(self.job), "bold"),
            f"  {time.monotonic() - self.started:5.1f}s",
        )
        return self.spinner


def _say(err: Console, message: str, style: str | None = None) -> None:
    # markup/highlight off: server messages may contain "[...]" that rich would eat.
    err.print(message, style=style, markup=False, highlight=False, soft_wrap=True)


def _print_job(job: Job) -> None:
    print(json.dumps(job, indent=2))


def _wait(client: LoweringClient, job_id: str, args: argparse.Namespace, err: Console) -> Job:
    progress = _Progress(job_id)
    said: list[str] = []

    def update(job: Job) -> None:
        # A line per change of state, above the live line (and all there is when piped).
        state = describe(job)
        if job.get("status") not in FINAL and state not in said[-1:]:
            said.append(state)
            _say(err, f"{job_id}  {state}  {time.monotonic() - progress.started:.1f}s", "dim")
        progress.update(job)

    with Live(progress, console=err, refresh_per_second=8, transient=True):
        job = client.wait(job_id, timeout_s=args.timeout, poll_s=args.poll,
                          on_update=update, events=args.events)
    _say(err, f"job {job_id} {job['status']} after {time.monotonic() - progress.started:.1f}s")
    return job


def _verdict(job: Job, err: Console) -> int:
    """Print the final job; exit 1 unless it succeeded."""
    _print_job(job)
    if job.get("status") == JobStatus.SUCCEEDED.value:
        profile = job.get("profile")
        if profile:
            _say(err, f"speedup {profile['speedup']}x: compiled {profile['compiled_ms']} ms, "
                 f"eager {profile['eager_ms']} ms (median of {profile['runs']} runs on the "
                 "example inputs)", "green")
        if job.get("code_reused_from"):
            _say(err, "compiled code reused from job "
                 f"{job['code_reused_from']} (same structure, other weights; verified "
                 "with these weights)", "green")
        return EXIT_OK
    error = job.get("error") or {}
    _say(err, f"job {job.get('id')} {job.get('status')}: "
         f"{error.get('code', 'unknown')}: {error.get('message', '')}", "red")
    return EXIT_JOB_FAILED


def _submit(client: LoweringClient, args: argparse.Namespace, err: Console) -> int:
    if (args.file is None) == (args.upload is None):
        _say(err, "error: give FILE or --upload ID (one of them)", "red")
        return EXIT_ERROR
    form = {"model_name": args.model_name, "backend_id": args.backend_id,
            "device": args.device, "options": dict(args.options), "verify": args.verify,
            "rtol": args.rtol, "atol": args.atol, "callback_url": args.callback_url}
    if args.targets is not None:
        return _submit_targets(client, args, form, err)
    if args.upload is not None:
        job = client.submit_upload(args.upload, **form)
    else:
        if args.resumable:
            client.resumable_threshold_bytes = 0
        job = client.submit(args.file, **form)
    if not (args.wait or args.output):
        _print_job(job)
        return EXIT_OK
    job = _wait(client, job["id"], args, err)
    if job.get("status") == JobStatus.SUCCEEDED.value and args.output is not None:
        _say(err, f"saved {client.download(job['id'], args.output)}")
    return _verdict(job, err)


def _submit_targets(client: LoweringClient, args: argparse.Namespace, form: dict[str, Any],
                    err: Console) -> int:
    if args.wait or args.output:
        _say(err, "error: --wait and -o take one target; follow each job with "
             "lowerctl wait ID", "red")
        return EXIT_ERROR
    if args.upload is not None:
        jobs = client.submit_upload(args.upload, **form, targets=args.targets)
    else:
        if args.resumable:
            client.resumable_threshold_bytes = 0
        jobs = client.submit(args.file, **form, targets=args.targets)
    print(json.dumps(jobs, indent=2))
    return EXIT_OK


def _upload(client: LoweringClient, args: argparse.Namespace, err: Console) -> int:
    def progress(sent: int, count: int) -> None:
        _say(err, f"part {sent}/{count} sent", "dim")

    ready = client.upload(args.file, on_part=progress)
    if ready is None:
        _say(err, f"error: {args.url} has no resumable uploads (an older release); "
             "use lowerctl submit FILE", "red")
        return EXIT_ERROR
    _print_job(ready)
    _say(err, f"ready: lowerctl submit --upload {ready['id']} --model-name NAME")
    return EXIT_OK


def _status(client: LoweringClient, args: argparse.Namespace, err: Console) -> int:
    _print_job(client.get(args.job_id))
    return EXIT_OK


def _wait_cmd(client: LoweringClient, args: argparse.Namespace, err: Console) -> int:
    return _verdict(_wait(client, args.job_id, args, err), err)


def _download(client: LoweringClient, args: argparse.Namespace, err: Console) -> int:
    print(client.download(args.job_id, args.output))
    return EXIT_OK


def _cancel(client: LoweringClient, args: argparse.Namespace, err: Console) -> int:
    _print_job(client.cancel(args.job_id))
    return EXIT_OK


def _log(client: LoweringClient, args: argparse.Namespace, err: Console) -> int:
    sys.stdout.write(client.log(args.job_id))
    return EXIT_OK


def _list(client: LoweringClient, args: argparse.Namespace, err: Console) -> int:
    page = client.list(status=args.status, model_name=args.model_name, limit=args.limit,
                       cursor=args.cursor)
    header = ("ID", "STATUS", "PHASE", "MODEL", "BACKEND", "DEVICE", "CREATED")
    rows = [header] + [
        tuple(str(job.get(key) or "-") for key in
              ("id", "status", "phase", "model_name", "backend_id", "device", "created_at"))
        for job in page.get("items", [])
    ]
    # Plain aligned columns rather than a rich table: stays whole and greppable when piped.
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    if page.get("next_cursor"):
        _say(err, f"more: lowerctl list --cursor {page['next_cursor']}", "dim")
    return EXIT_OK


_COMMANDS: dict[str, Callable[[LoweringClient, argparse.Namespace, Console], int]] = {
    "submit": _submit, "status": _status, "wait": _wait_cmd, "download": _download,
    "list": _list, "cancel": _cancel, "log": _log, "upload": _upload,
}


def main(argv: Sequence[str] | None = None, *, transport: httpx.BaseTransport | None = None) -> int:
    """Run lowerctl and return its exit code.

    :param argv: arguments without the program name (default: ``sys.argv[1:]``).
    :param transport: httpx transport for the client; tests pass ``httpx.MockTransport``.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    err = Console(stderr=True)
    try:
        with LoweringClient(args.url, transport=transport, api_key=args.api_key or "") as client:
            return _COMMANDS[args.command](client, args, err)
    except LoweringAPIError as exc:
        _say(err, f"error: {exc.message} (HTTP {exc.status}, {exc.code})", "red")
        return EXIT_ERROR
    except ChecksumMismatch as exc:
        _say(err, f"error: {exc}; nothing was saved", "red")
        return EXIT_ERROR
    except httpx.TransportError as exc:
        _say(err, f"error: cannot reach {args.url}: {str(exc) or type(exc).__name__}", "red")
        return EXIT_UNREACHABLE
    except TimeoutError as exc:  # before OSError: TimeoutError is one
        _say(err, f"error: {exc}", "red")
        return EXIT_JOB_FAILED
    except OSError as exc:
        detail = f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc)
        _say(err, f"error: {detail}", "red")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _say(err, "interrupted (a submitted job keeps running on the server)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
