"""Point every inductor cache, precompiled headers included, at one directory."""

from __future__ import annotations

import os
from pathlib import Path


def use_cache_dir(path: Path, *, lock_dir: Path) -> None:
    """Call before the first lowering in a process.

    TORCHINDUCTOR_CACHE_DIR covers most caches, but inductor fixes its precompiled
    header dir (and that dir's lock dir) at import time from ``tempfile.gettempdir()``.
    The locks go to ``lock_dir``: a job's view of the shared headers is read-only, and
    taking a lock means creating a file.
    """
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    from torch._inductor import codecache

    if hasattr(codecache, "_HEADER_DIR"):
        codecache._HEADER_DIR = str(path / "precompiled_headers")
        codecache._HEADER_LOCK_DIR = str(lock_dir)


def warm_up() -> None:
    """Do once per process what every lowering would otherwise pay for first.

    Imports inductor's compile path and picks the CPU's vector ISA (which compiles and
    loads probe libraries unless the mirrored trusted cache already holds them).
    """
    import torch._inductor.codegen.cpp_wrapper_cpu  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401
    import torch.export  # noqa: F401
    from torch._inductor import cpu_vec_isa

    cpu_vec_isa.pick_vec_isa()
