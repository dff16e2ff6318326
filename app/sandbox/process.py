"""The supervisor's handle on one sandboxed child: start, talk, kill, reap.

No torch here: this runs in the trusted process. The child's stdout carries JSON
events, read by a thread into a queue with a cap on line length; stderr goes to a log
file the supervisor opened. Killing the bwrap process takes the child's whole PID
namespace with it, so no compiler outlives its job.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from app.sandbox.profile import Sandbox

MAX_EVENT_BYTES = 1 << 20
CHILD_MODULE = "app.sandbox.child"


@dataclass
class Exit:
    """How a sandboxed process ended: exit code or signal, CPU seconds, peak RSS."""

    returncode: int | None
    signal: int | None
    cpu_s: float
    peak_rss_bytes: int


class SandboxedChild:
    """One ``python -m app.sandbox.child`` in the sandbox.

    :param sandbox: the sandbox profile.
    :param scratch: its own fresh scratch dir (mounted at /job).
    :param log_path: where its stderr goes (opened here, outside the sandbox).
    :param args: arguments after the module name (``job MODULES`` or ``prime``).
    """

    def __init__(self, sandbox: Sandbox, *, scratch: Path, log_path: Path,
                 args: list[str]) -> None:
        self.scratch = scratch
        self.log_path = log_path
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        sandbox.prepare_scratch(scratch)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self.proc = sandbox.popen([sandbox.python, "-m", CHILD_MODULE, *args],
                                      scratch=scratch, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=log)
        self.pid = self.proc.pid
        # Run as another uid on the host, the child can read but never modify a file we
        # hardlink into its scratch; mapped onto our own uid (unprivileged bwrap, or
        # sandbox off), it could, so inputs must be copied.
        self.may_hardlink_inputs = sandbox.privileged and sandbox.mode == "required"
        self._exit: Exit | None = None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,),
                                        name=f"sandbox-{self.pid}", daemon=True)
        self._reader.start()

    def _read(self, stream: IO[bytes] | None) -> None:
        assert stream is not None
        with contextlib.suppress(OSError, ValueError):
            while line := stream.readline(MAX_EVENT_BYTES):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # not ours: the child's stdout should carry only events
                if isinstance(event, dict) and isinstance(event.get("event"), str):
                    self.events.put(event)
        self.events.put(None)  # end of stream: the child is gone (or closed stdout)

    def next_event(self, timeout_s: float) -> dict[str, Any] | None:
        """The next event; None at end of stream; raises queue.Empty on timeout."""
        return self.events.get(timeout=max(0.0, timeout_s))

    def expect(self, name: str, timeout_s: float) -> dict[str, Any] | None:
        """The first event if it is ``name``; None if the child says something else,
        dies, or stays silent for ``timeout_s``."""
        try:
            event = self.next_event(timeout_s)
        except queue.Empty:
            return None
        return event if event is not None and event["event"] == name else None

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.close()

    def alive(self) -> bool:
        return self._exit is None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the sandbox: bwrap's PID namespace takes every process in it along."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def finish(self, grace_s: float = 0.0) -> Exit:
        """Give the child ``grace_s`` to exit by itself, kill it, reap it."""
        if self._exit is not None:
            return self._exit
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        deadline = time.monotonic() + grace_s
        # os.wait4, not Popen.poll: the rusage of the reaped tree is the job's CPU time.
        while self.proc.returncode is None and time.monotonic() < deadline:
            try:
                pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                return self._reaped(status, usage)
            time.sleep(0.05)
        self.kill()
        try:
            _, status, usage = os.wait4(self.pid, 0)
        except ChildProcessError:  # Popen.poll() reaped it first
            return self._reaped(None, None)
        return self._reaped(status, usage)

    def _reaped(self, status: int | None, usage: Any) -> Exit:
        if status is not None:
            code = os.waitstatus_to_exitcode(status)
            self.proc.returncode = code
        else:
            code = self.proc.returncode
        sig = -code if code is not None and code < 0 else None
        # bwrap reports a child killed by signal N as exit status 128 + N.
        if code is not None and code > 128:
            sig = code - 128
        self._exit = Exit(
            returncode=code, signal=sig,
            cpu_s=round(usage.ru_utime + usage.ru_stime, 3) if usage else 0.0,
            peak_rss_bytes=int(usage.ru_maxrss) * 1024 if usage else 0)
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        return self._exit
