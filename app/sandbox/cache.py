"""The shared inductor cache: filled only by trusted priming, read-only to every job."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from app import __version__
from app.constants import LOWERING_VERSION


def publish_cache(private: Path, shared: Path) -> int:
    """Copy the regular files a trusted priming run compiled into the shared cache.

    Links (to files already shared) and locks are skipped; each file lands by atomic
    rename, owned by this service and read-only to the sandbox user.
    """
    count = 0
    for root, dirs, files in os.walk(private):
        dirs[:] = [d for d in dirs if d != "locks"]
        rel = Path(root).relative_to(private)
        for name in files:
            src, dest = Path(root) / name, shared / rel / name
            if src.is_symlink() or not src.is_file() or name.endswith((".lock", ".tmp")):
                continue
            if dest.exists():
                continue
            if not dest.parent.is_dir():
                dest.parent.mkdir(parents=True)
                dest.parent.chmod(0o755)
            tmp = dest.with_name(f".{name}.{os.getpid()}.tmp")
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o755 if os.access(src, os.X_OK) else 0o644)
            os.replace(tmp, dest)
            count += 1
    return count


@functools.cache
def toolchain_stamp() -> str:
    """What the shared cache's contents depend on, without importing torch."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "none"
    try:
        compiler = subprocess.run(["g++", "--version"], capture_output=True, text=True,
                                  timeout=30).stdout.splitlines()[:1]
    except (OSError, subprocess.TimeoutExpired):
        compiler = []
    material = json.dumps([torch_version, compiler, __version__, LOWERING_VERSION,
                           sys.version, platform.machine()])
    return hashlib.sha256(material.encode()).hexdigest()[:16]
