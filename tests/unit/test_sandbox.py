"""Worker guards, each exercised in a child process so this one keeps its limits."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import ROOT


def _child(code: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)


def test_memory_cap_turns_a_bomb_into_memory_error() -> None:
    result = _child("""
        from app import sandbox
        sandbox.limit_address_space(1 << 30)
        try:
            blob = bytearray(4 << 30)
        except MemoryError:
            print("memory-error")
    """)
    assert result.stdout.strip() == "memory-error", result.stderr


def test_cpu_limit_stops_the_process_with_sigxcpu() -> None:
    result = _child("""
        from app import sandbox
        with sandbox.cpu_time_limit(1):
            while True:
                pass
    """)
    assert result.returncode == -signal.SIGXCPU, (result.returncode, result.stderr)


def test_file_size_limit_makes_writes_fail_not_kill(tmp_path: Path) -> None:
    target = tmp_path / "big.bin"
    result = _child(f"""
        from app import sandbox
        with sandbox.file_size_limit(100_000):
            try:
                open({str(target)!r}, "wb").write(b"x" * 1_000_000)
            except OSError as exc:
                print(exc.errno)
        open({str(target)!r}, "wb").write(b"x" * 1_000_000)  # the limit is lifted after
        print("after-ok")
    """)
    assert result.stdout.split() == [str(errno.EFBIG), "after-ok"], result.stderr
    assert target.stat().st_size == 1_000_000


def test_private_tmpdir_and_peak_rss(tmp_path: Path) -> None:
    result = _child(f"""
        import os, tempfile
        from app import sandbox
        sandbox.reset_peak_rss()
        with sandbox.private_tmpdir(__import__("pathlib").Path({str(tmp_path)!r}) / "t"):
            print(tempfile.mkstemp()[1].startswith({str(tmp_path)!r}))
        print(os.environ.get("TMPDIR") != {str(tmp_path / "t")!r})
        before = sandbox.peak_rss_bytes()
        blob = bytearray(200 << 20)
        print(sandbox.peak_rss_bytes() - before > 150 << 20)
    """)
    assert result.stdout.split() == ["True", "True", "True"], result.stderr
