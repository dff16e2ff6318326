"""The sandbox a job's untrusted phase runs in: bubblewrap, setpriv, seccomp and rlimits.

Two ways to become nobody, chosen by who runs the service:

- as root (``privileged``): bwrap needs no user namespace; it builds the mount, PID,
  network, IPC and UTS namespaces, then ``setpriv`` drops to uid/gid 65534 with no
  groups, no capabilities (bounding set emptied) and no_new_privs before Python starts.
  The sandbox's files are owned by a real unprivileged uid on the host.
- as any other user: bwrap makes an unprivileged user namespace, maps that user to
  65534 inside, drops every capability and forbids further user namespaces.

In both, the seccomp filter (``seccomp.py``) refuses the syscalls a sandbox has no use
for (ptrace, mount, unshare, bpf, keyctl, ...), the root is a read-only tmpfs holding
only the system dirs, the interpreter and our code (all read-only), ``/job`` (the
scratch dir, the only writable path) and ``/cache`` (the shared inductor cache,
read-only to jobs), and the environment is built from scratch.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

SANDBOX_UID = SANDBOX_GID = 65534
# CPU seconds a sandbox may spend warming up (imports, ISA probes) before its job's budget.
WARM_CPU_S = 300
JOB_DIR = "/job"
CACHE_DIR = "/cache"
SYSTEM_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# Host files a compiler and the dynamic loader read; nothing with secrets.
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime")
# Environment passed through when set: CPU tuning and device selection, no credentials.
PASS_ENV_PREFIXES = ("OPENBLAS_", "OMP_", "MKL_", "TORCHINDUCTOR_CPP_", "CUDA_VISIBLE_DEVICES")
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; the Dockerfile "
                "does); in a container, run with --security-opt seccomp=unconfined and "
                "apparmor=unconfined, since Docker's default profiles block the namespaces "
                "bwrap needs; or set LOWERING_SANDBOX=off for a trusted-only deployment")

Mode = Literal["required", "off"]


@dataclass(frozen=True)
class Limits:
    """rlimits of every sandboxed process (each g++ gets its own, as the kernel counts).

    ``processes`` counts all processes of uid 65534 together (RLIMIT_NPROC is per user).
    """

    memory_bytes: int
    cpu_s: int
    file_bytes: int
    processes: int = 512
    open_files: int = 4096

    def apply(self) -> None:
        """Set the limits on this process; runs between fork and exec of bwrap."""
        for which, value in ((resource.RLIMIT_AS, self.memory_bytes),
                             (resource.RLIMIT_CPU, self.cpu_s),
                             (resource.RLIMIT_FSIZE, self.file_bytes),
                             (resource.RLIMIT_NPROC, self.processes),
                             (resource.RLIMIT_NOFILE, self.open_files),
                             (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(which, (value, value))
        # A write past RLIMIT_FSIZE fails with EFBIG instead of killing the writer.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def as_dict(self) -> dict[str, int]:
        return {"memory_bytes": self.memory_bytes, "cpu_s": self.cpu_s,
                "file_bytes": self.file_bytes, "processes": self.processes,
                "open_files": self.open_files}


@dataclass
class SandboxStatus:
    """What /v1/info and /readyz say about the sandbox."""

    mode: Mode
    available: bool
    tool: str | None = None
    privileged: bool = False
    seccomp: bool = False
    missing: str | None = None
    isolation: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "available": self.available, "tool": self.tool,
                "privileged_launcher": self.privileged, "seccomp": self.seccomp,
                "missing": self.missing, "isolation": self.isolation}


def _which(name: str) -> str | None:
    """Found on the service's PATH: an operator can point it at another bwrap."""
    return shutil.which(name)


def _nested(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _preload_roots(modules: Sequence[str]) -> list[Path]:
    """Host dirs/files holding the top-level packages of LOWERING_PRELOAD_MODULES."""
    roots: list[Path] = []
    for name in modules:
        try:
            spec = importlib.util.find_spec(name.split(".")[0])
        except (ImportError, ValueError):
            continue  # the worker reports the failed preload
        if spec is None:
            continue
        if spec.submodule_search_locations:
            roots.extend(Path(p).resolve() for p in spec.submodule_search_locations)
        elif spec.origin and spec.has_location:
            roots.append(Path(spec.origin).resolve())
    return roots


class Sandbox:
    """Builds and starts sandboxed commands.

    :param mode: ``required`` runs commands in bwrap; ``off`` runs them as plain
        processes (same environment and limits, no isolation): trusted uploads only.
    :param limits: rlimits of each sandboxed process.
    :param shared_cache: host dir mounted read-only at /cache.
    :param preload_modules: modules jobs import; their packages are mounted read-only.
    """

    def __init__(self, *, mode: Mode, limits: Limits, shared_cache: Path,
                 preload_modules: Sequence[str] = ()) -> None:
        self.mode = mode
        self.limits = limits
        self.shared_cache = shared_cache
        self.privileged = os.geteuid() == 0
        self.python = sys.executable
        app_dir = Path(__file__).resolve().parents[1]
        ro = [Path(sys.base_prefix), Path(sys.prefix), app_dir, *_preload_roots(preload_modules)]
        self._ro_paths = _dedupe([p for p in ro if p.exists()], covered=[Path("/usr")])
        # Preloaded packages outside site-packages are importable through PYTHONPATH.
        site = [Path(p).resolve() for p in sys.path if p.endswith("site-packages")]
        self._pythonpath = sorted({str(p.parent) for p in ro[3:] if not _nested(p, site)})
        self._pythonpath.insert(0, str(app_dir.parent))

    # -- environment ------------------------------------------------------------------

    def environment(self, job_dir: str, cache_dir: str) -> dict[str, str]:
        """The whole environment of a sandboxed process: built, not inherited."""
        env = {
            "PATH": f"{Path(self.python).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": job_dir, "TMPDIR": f"{job_dir}/tmp", "USER": "sandbox",
            "LOGNAME": "sandbox", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONPATH": ":".join(self._pythonpath), "PYTHONNOUSERSITE": "1",
            "LOWERING_JOB_DIR": job_dir, "LOWERING_SHARED_CACHE": cache_dir,
            "TORCHINDUCTOR_CACHE_DIR": f"{job_dir}/inductor",
            # Defence in depth: any torch.load torch does for us refuses pickled code.
            "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1",
            # One compile at a time: no inductor subprocess pool inside the sandbox.
            "TORCHINDUCTOR_COMPILE_THREADS": "1",
        }
        for key, value in os.environ.items():
            if key.startswith(PASS_ENV_PREFIXES):
                env[key] = value
        return env

    # -- command line -------------------------------------------------------------------

    def command(self, argv: Sequence[str], *, scratch: Path,
                seccomp_fd: int | None = None) -> list[str]:
        """The argv that runs ``argv`` sandboxed with ``scratch`` as /job."""
        if self.mode == "off":
            return list(argv)
        args = [_which("bwrap") or "bwrap", "--die-with-parent", "--new-session", "--unshare-pid",
                "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--hostname", "sandbox"]
        if not self.privileged:
            args += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID),
                     "--disable-userns", "--cap-drop", "ALL"]
        args += ["--ro-bind", "/usr", "/usr"]
        for name in SYSTEM_LINKS:
            path = Path("/") / name
            if path.is_symlink():
                args += ["--symlink", os.readlink(path), str(path)]
            elif path.is_dir():
                args += ["--ro-bind", str(path), str(path)]
        for name in ETC_FILES:
            args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        args += ["--ro-bind-try", "/sys/devices/system/cpu", "/sys/devices/system/cpu"]
        for dev in sorted(Path("/dev").glob("nvidia*")):
            args += ["--dev-bind-try", str(dev), str(dev)]
        made: set[Path] = {Path("/")}
        for path in self._ro_paths:
            args += _parents(path, made)
            args += ["--ro-bind", str(path), str(path)]
        args += ["--proc", "/proc", "--dev", "/dev", "--perms", "0755", "--dir", "/tmp",
                 "--ro-bind", str(self.shared_cache), CACHE_DIR,
                 "--bind", str(scratch), JOB_DIR, "--chdir", JOB_DIR,
                 # Nothing but /job stays writable: the tmpfs root goes read-only last.
                 "--remount-ro", "/"]
        if seccomp_fd is not None:
            args += ["--seccomp", str(seccomp_fd)]
        args += ["--"]
        if self.privileged:
            args += [_which("setpriv") or "setpriv", f"--reuid={SANDBOX_UID}",
                     f"--regid={SANDBOX_GID}", "--clear-groups", "--inh-caps=-all",
                     "--bounding-set=-all", "--no-new-privs", "--"]
        return args + list(argv)

    def prepare_scratch(self, scratch: Path) -> None:
        """A fresh, empty scratch dir the sandbox user owns."""
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        scratch.chmod(0o700)
        if self.privileged and self.mode != "off":
            os.chown(scratch, SANDBOX_UID, SANDBOX_GID)

    def popen(self, argv: Sequence[str], *, scratch: Path, stdin: int | IO[Any] | None,
              stdout: int | IO[Any] | None, stderr: int | IO[Any] | None
              ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the sandbox; the caller owns (and must reap) the process."""
        from app.sandbox import seccomp

        sandboxed = self.mode != "off"
        job_dir, cache = (JOB_DIR, CACHE_DIR) if sandboxed else (str(scratch),
                                                                 str(self.shared_cache))
        fd = seccomp.filter_fd() if sandboxed else None
        try:
            return subprocess.Popen(
                self.command(argv, scratch=scratch, seccomp_fd=fd),
                stdin=stdin, stdout=stdout, stderr=stderr, cwd=scratch,
                env=self.environment(job_dir, cache), pass_fds=(fd,) if fd is not None else (),
                preexec_fn=self.limits.apply, start_new_session=True)
        finally:
            if fd is not None:
                os.close(fd)

    # -- health -------------------------------------------------------------------------

    def check(self, scratch: Path) -> SandboxStatus:
        """Can a sandbox start here? Runs ``true`` in one; says what is missing if not."""
        if self.mode == "off":
            return SandboxStatus(mode="off", available=False,
                                 missing="LOWERING_SANDBOX=off: uploads run unsandboxed")
        status = SandboxStatus(mode="required", available=False, privileged=self.privileged)
        bwrap = _which("bwrap")
        if bwrap is None:
            status.missing = f"bwrap (bubblewrap) is not installed: {INSTALL_HINT}"
            return status
        if self.privileged and _which("setpriv") is None:
            status.missing = "setpriv (util-linux) is not installed: apt-get install util-linux"
            return status
        version = subprocess.run([bwrap, "--version"], capture_output=True, text=True)
        status.tool = version.stdout.strip() or "bubblewrap"
        from app.sandbox import seccomp

        missing = seccomp.unavailable()
        if missing is not None:
            status.missing = missing
            return status
        status.seccomp = True
        self.prepare_scratch(scratch)
        try:
            proc = self.popen(["true"], scratch=scratch, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            _, err = proc.communicate(timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            status.missing = f"the sandbox did not start ({exc}): {INSTALL_HINT}"
            return status
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if proc.returncode != 0:
            reason = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            status.missing = f"the sandbox did not start ({reason[0]}): {INSTALL_HINT}"
            return status
        status.available = True
        status.isolation = ["uid 65534, no capabilities, no_new_privs", "seccomp filter",
                            "own pid, network, ipc, uts, mount namespaces",
                            "read-only root; writable scratch only",
                            "shared inductor cache read-only", "scrubbed environment",
                            "rlimits: " + ", ".join(f"{k}={v}" for k, v in
                                                     self.limits.as_dict().items())]
        return status


def _dedupe(paths: list[Path], covered: list[Path]) -> list[Path]:
    """Drop paths already inside another bind (a dest inside a read-only bind can't be made)."""
    kept: list[Path] = []
    for path in sorted({p.resolve() for p in paths}, key=lambda p: len(p.parts)):
        if not _nested(path, covered + kept):
            kept.append(path)
    return kept


def _parents(path: Path, made: set[Path]) -> list[str]:
    """World-readable parent dirs for a bind (bwrap would make them 0700 as root)."""
    args: list[str] = []
    for parent in reversed(path.parents):
        if parent not in made:
            made.add(parent)
            args += ["--perms", "0755", "--dir", str(parent)]
    return args


def from_settings(settings: Any) -> Sandbox:
    """The sandbox every job of this service runs in (``settings``: app.settings.Settings)."""
    return Sandbox(mode=settings.sandbox, shared_cache=settings.inductor_dir,
                   preload_modules=settings.preload_modules,
                   limits=Limits(memory_bytes=settings.memory_limit_bytes,
                                 # the job's own budget is set by the child once warm
                                 cpu_s=int(settings.cpu_limit_s) + WARM_CPU_S,
                                 file_bytes=settings.job_max_file_bytes,
                                 processes=settings.job_max_processes))
