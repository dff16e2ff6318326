"""A little disk kept in reserve, so DELETE (the way to free space) works on a full disk.

SQLite needs room to record even a delete. The service keeps ``data_dir/.reserve``
(created at start when there is room); a delete that fails for lack of space releases
it and tries once more. The next start makes a new reserve.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

RESERVE_NAME = ".reserve"
RESERVE_BYTES = 32 << 20


def make_reserve(data_dir: Path, size_bytes: int = RESERVE_BYTES) -> bool:
    """Create the reserve if missing and the disk has ample room; True if it exists."""
    path = data_dir / RESERVE_NAME
    if path.is_file():
        return True
    if shutil.disk_usage(data_dir).free < 8 * size_bytes:
        return False
    try:
        with path.open("wb") as handle:
            os.posix_fallocate(handle.fileno(), 0, size_bytes)
    except OSError:
        path.unlink(missing_ok=True)
        return False
    return True


def release_reserve(data_dir: Path) -> bool:
    """Give the reserve back to the filesystem; True if there was one."""
    path = data_dir / RESERVE_NAME
    existed = path.is_file()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return existed
