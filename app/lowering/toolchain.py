"""What an artifact was built with: recorded in every result and archive."""

from __future__ import annotations

import functools
import logging
import subprocess
from typing import Any

import torch

log = logging.getLogger("app.lowering")


@functools.lru_cache(maxsize=1)
def _compiler_version() -> str:
    # Ask inductor which compiler it will run, so the record names the real one
    # (config.cpp.cxx / $CXX) rather than whatever `g++` happens to be on PATH.
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = get_cpp_compiler()
    except Exception as exc:  # a missing compiler is reported, not raised
        log.warning("could not determine inductor's C++ compiler: %s", exc)
        compiler = "g++"
    try:
        proc = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{compiler} (unavailable: {type(exc).__name__})"
    first = (proc.stdout or proc.stderr).strip().splitlines()
    return first[0] if first else compiler


def _cuda_arch() -> list[str]:
    if not torch.cuda.is_available():
        return []
    archs = set()
    for idx in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(idx)
        archs.add(f"sm_{major}{minor}")
    return sorted(archs)


def probe_toolchain(options: dict[str, Any] | None = None) -> dict[str, Any]:
    options = options or {}
    cuda = torch.cuda.is_available()
    return {
        "torch_version": torch.__version__,
        "compiler": _compiler_version(),
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "cpp_march": options.get("cpp.march") or "native",
        "cuda_available": cuda,
        "cuda_devices": torch.cuda.device_count() if cuda else 0,
        "cuda_arch": _cuda_arch(),
    }
