"""Attacks on the job sandbox, run through ``lowering-service sandbox-run``.

Each payload runs exactly as a job's untrusted phase would and tries one thing a
hostile upload that got past the gate would try. Every test has a positive control,
so a payload that silently did nothing cannot pass.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

SECRET = "s3cr3t-do-not-leak"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A service data dir with another job's upload, scratch, artifact, log and the DB."""
    data = tmp_path_factory.mktemp("data")
    for rel in ("uploads/other.pt2", "scratch/slot-9/input.pt2", "artifacts/ab/ab.pt2",
                "logs/other.log", "jobs.db", "inductor/marker"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text(SECRET)
    return data


def sandbox_run(data_dir: Path, code: str, *, env: dict[str, str] | None = None,
                stdin: bytes | None = None, timeout_s: float = 120
                ) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` in the job sandbox of a service using ``data_dir``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LOWERING_")}
    environ.update({"LOWERING_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT),
                    "LOWERING_DATABASE_URL": f"postgresql://lowering:{SECRET}@127.0.0.1/test",
                    "AWS_SECRET_ACCESS_KEY": SECRET, **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "sandbox-run", "--", "python", "-c",
         textwrap.dedent(code)], cwd=ROOT, env=environ, input=stdin,
        capture_output=True, timeout=timeout_s, text=stdin is None)


def payload_result(data_dir: Path, code: str, **kwargs: Any) -> Any:
    """Run a payload that prints one JSON document as its last line; return it."""
    result = sandbox_run(data_dir, "import json, os, sys\n" + textwrap.dedent(code), **kwargs)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_not_root_no_capabilities_no_new_privs_seccomp(data_dir: Path) -> None:
    status = payload_result(data_dir, """
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        print(json.dumps({"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
                          "groups": os.getgroups(),
                          **{k: fields[k].strip() for k in
                             ("CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")}}))
    """)
    assert status["uid"] == status["euid"] == 65534 and status["gid"] == 65534, status
    assert status["groups"] in ([], [65534]), status
    for caps in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, status
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status


def test_cannot_read_other_jobs_files_or_the_db(data_dir: Path) -> None:
    targets = [str(p) for p in data_dir.rglob("*") if p.is_file()]
    assert len(targets) == 6
    seen = payload_result(data_dir, f"""
        found = {{}}
        for path in {targets!r} + [{str(data_dir)!r}]:
            try:
                found[path] = open(path).read() if os.path.isfile(path) else os.listdir(path)
            except OSError as exc:
                found[path] = type(exc).__name__
        print(json.dumps(found))
    """)
    assert all(value == "FileNotFoundError" for value in seen.values()), seen


def test_cannot_write_outside_scratch(data_dir: Path) -> None:
    venv = str(Path(sys.prefix))
    results = payload_result(data_dir, f"""
        out = {{}}
        for path in ["/usr/evil", "/tmp/evil", "/cache/evil", "/evil", "/etc/evil",
                     {venv!r} + "/evil", {str(ROOT / "app")!r} + "/evil",
                     {str(data_dir)!r} + "/evil"]:
            try:
                with open(path, "w") as handle:
                    handle.write("x")
                out[path] = "written"
            except OSError as exc:
                out[path] = type(exc).__name__
        with open("mine.txt", "w") as handle:  # positive control: scratch is writable
            handle.write("x")
        out["scratch"] = os.path.exists("mine.txt") and os.getcwd()
        print(json.dumps(out))
    """)
    assert results.pop("scratch") == "/job"
    assert all(value != "written" for value in results.values()), results
    assert not list(data_dir.rglob("evil")) and not (ROOT / "app" / "evil").exists()


def test_shared_inductor_cache_is_read_only(data_dir: Path) -> None:
    results = payload_result(data_dir, """
        out = {"read": open("/cache/marker").read()}
        for attempt in ("write", "unlink", "mkdir"):
            try:
                {"write": lambda: open("/cache/marker", "w"),
                 "unlink": lambda: os.unlink("/cache/marker"),
                 "mkdir": lambda: os.mkdir("/cache/new")}[attempt]()
                out[attempt] = "done"
            except OSError as exc:
                out[attempt] = type(exc).__name__
        print(json.dumps(out))
    """)
    assert results.pop("read") == SECRET  # it is there to read (the trusted cache) ...
    assert set(results.values()) == {"OSError"}, results  # ... and nothing else (EROFS)
    assert (data_dir / "inductor" / "marker").read_text() == SECRET


@pytest.mark.parametrize("port", [5432, 6379, 5672])
def test_no_network_not_even_loopback(data_dir: Path, port: int) -> None:
    try:  # positive control: the service really listens on the host
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        pytest.skip(f"nothing listens on 127.0.0.1:{port} on this host")
    result = payload_result(data_dir, f"""
        import socket
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=5).close()
            print(json.dumps("connected"))
        except OSError as exc:
            print(json.dumps(type(exc).__name__))
        """)
    assert result != "connected"
    interfaces = payload_result(data_dir, "print(json.dumps(os.listdir('/sys/class/net')"
                                          " if os.path.exists('/sys/class/net') else []))")
    assert interfaces in ([], ["lo"])


def test_cannot_see_or_signal_host_processes(data_dir: Path) -> None:
    seen = payload_result(data_dir, f"""
        import signal
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        try:
            os.kill({os.getpid()}, 0)
            signalled = "alive"
        except OSError as exc:
            signalled = type(exc).__name__
        print(json.dumps({{"pids": pids, "signal": signalled, "me": os.getpid()}}))
    """)
    assert os.getpid() not in seen["pids"]
    assert seen["signal"] == "ProcessLookupError", seen
    assert max(seen["pids"]) < 10, seen  # its own PID namespace: bwrap's init, then us


def test_environment_holds_no_credentials(data_dir: Path) -> None:
    env = payload_result(data_dir, "print(json.dumps(dict(os.environ)))")
    assert "LOWERING_DATABASE_URL" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert not [k for k, v in env.items() if SECRET in v], env
    assert env["HOME"] == "/job" and env["TMPDIR"].startswith("/job")


def test_seccomp_refuses_ptrace_namespaces_and_mounts(data_dir: Path) -> None:
    results = payload_result(data_dir, """
        import ctypes, errno
        libc = ctypes.CDLL(None, use_errno=True)
        out = {}
        calls = {"ptrace": lambda: libc.ptrace(0, 0, 0, 0),  # PTRACE_TRACEME
                 "unshare_user": lambda: libc.unshare(0x10000000),
                 "mount": lambda: libc.mount(b"none", b"/job", b"tmpfs", 0, None),
                 "bpf": lambda: libc.syscall(321, 0, 0, 0)}
        for name, call in calls.items():
            ctypes.set_errno(0)
            rc = call()
            out[name] = [rc, errno.errorcode.get(ctypes.get_errno(), "0")]
        print(json.dumps(out))
    """)
    for name in ("ptrace", "unshare_user", "mount", "bpf"):
        assert results[name] == [-1, "EPERM"], results


def test_limits_are_finite_and_memory_cap_bites(data_dir: Path) -> None:
    limits = payload_result(data_dir, """
        import resource
        names = ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NPROC")
        out = {n: resource.getrlimit(getattr(resource, n))[0] for n in names}
        try:
            blob = bytearray(3 << 30)
            out["bomb"] = "allocated"
        except MemoryError:
            out["bomb"] = "MemoryError"
        print(json.dumps(out))
    """, env={"LOWERING_JOB_MAX_MEMORY_BYTES": str(2 << 30)})
    assert limits.pop("bomb") == "MemoryError"
    assert limits["RLIMIT_AS"] == 2 << 30
    assert all(0 < value < (1 << 62) for value in limits.values()), limits


def test_fresh_scratch_every_run_and_exit_status_passes_through(data_dir: Path) -> None:
    first = sandbox_run(data_dir, "open('left.txt', 'w').write('x'); print('first')")
    assert first.returncode == 0 and first.stdout.strip() == "first", first.stderr
    second = sandbox_run(data_dir, "import os, sys; print(os.listdir('.')); sys.exit(7)")
    assert second.returncode == 7
    assert "left.txt" not in second.stdout
    assert not list((data_dir / "scratch").glob("audit-*")), "scratch dirs left behind"


def test_python_is_the_workers_interpreter_with_torch(data_dir: Path) -> None:
    info = payload_result(data_dir, """
        import torch
        print(json.dumps({"prefix": sys.prefix, "torch": torch.__version__}))
    """)
    assert info["prefix"] == sys.prefix
    assert info["torch"].split("+")[0] == __import__("torch").__version__.split("+")[0]


def test_a_hardlinked_input_is_read_only_to_the_job(tmp_path: Path) -> None:
    """The supervisor hardlinks the rebuilt upload into scratch only when the sandbox
    runs as another uid on the host; then the job can read it but never change it (a
    retry must run what the gate admitted)."""
    from app.sandbox.profile import Limits, Sandbox

    sandbox = Sandbox(mode="required", shared_cache=tmp_path,
                      limits=Limits(memory_bytes=4 << 30, cpu_s=60, file_bytes=1 << 30))
    if not (sandbox.privileged and sandbox.check(tmp_path / "check").available):
        pytest.skip("hardlinking inputs is only done with a root launcher")
    upload = tmp_path / "upload.pt2"
    upload.write_bytes(b"admitted")
    upload.chmod(0o644)
    scratch = tmp_path / "scratch"
    sandbox.prepare_scratch(scratch)
    os.link(upload, scratch / "input.pt2")
    code = ("import json, os\nout = {'read': open('input.pt2').read()}\n"
            "for how in ('a', 'r+'):\n"
            "    try:\n        open('input.pt2', how).write('tampered'); out[how] = 'written'\n"
            "    except OSError as exc:\n        out[how] = type(exc).__name__\n"
            "try:\n    os.chmod('input.pt2', 0o666); out['chmod'] = 'done'\n"
            "except OSError as exc:\n    out['chmod'] = type(exc).__name__\n"
            "print(json.dumps(out))")
    proc = sandbox.popen(["python", "-c", code], scratch=scratch, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    result = json.loads(out)
    assert result == {"read": "admitted", "a": "PermissionError", "r+": "PermissionError",
                      "chmod": "PermissionError"}, err
    assert upload.read_bytes() == b"admitted"
