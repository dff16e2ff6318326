"""Point every inductor cache, precompiled headers included, at the shared directory."""

from __future__ import annotations

import os
from pathlib import Path


def use_cache_dir(path: Path) -> None:
    """Call before the first lowering in a process.

    TORCHINDUCTOR_CACHE_DIR covers most caches, but inductor fixes its precompiled
    header dir at import time from ``tempfile.gettempdir()``: with a per-job TMPDIR
    the ~140 MB headers would be rebuilt for every job and then deleted.
    """
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    from torch._inductor import codecache

    if hasattr(codecache, "_HEADER_DIR"):
        codecache._HEADER_DIR = str(path / "precompiled_headers")
