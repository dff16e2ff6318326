"""Compiled files out of a stored archive, for a job that reuses them. Never imports torch.

A job whose code key matches an earlier succeeded job's (cache_key.code_key) takes that
job's compiled delegate instead of compiling: the trusted supervisor copies the files of
``data/aotinductor/{model}-{backend}/`` out of the earlier archive into the new job's
scratch dir, and the sandboxed child packages them with its own program and weights,
then verifies the archive in full.

The archive was written by an earlier sandbox, so it is read as untrusted: plain member
names only, a size cap, no links, files created here (never opened through a path the
archive chose), and a self-contained delegate (one that carries its own weights) is
refused, since its code would hold the earlier job's weight values.
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from pathlib import Path

COMPILED_DIR = "compiled"
"""Where, in the job's scratch dir, the taken files are put."""
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}")
_EMBEDDED_WEIGHTS = "weights_config.json"
CHUNK_BYTES = 1 << 20


class NotReusable(Exception):
    """The earlier archive holds no compiled delegate this job can take."""


def take_compiled(archive: Path, *, delegate: str, dest: Path, max_bytes: int) -> list[str]:
    """Copy the compiled files of ``delegate`` out of ``archive`` into ``dest`` (created
    here, must not exist); return their names. Raises NotReusable or OSError."""
    prefix = f"archive/data/aotinductor/{delegate}/"
    fd = os.open(archive, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        try:
            with zipfile.ZipFile(handle) as zipped:
                members = [info for info in zipped.infolist()
                           if info.filename.startswith(prefix)]
                names = [info.filename[len(prefix):] for info in members]
                _check(names, sum(info.file_size for info in members), max_bytes)
                dest.mkdir(mode=0o755)
                for info, name in zip(members, names, strict=True):
                    _copy_out(zipped, info, dest / name)
        except zipfile.BadZipFile as exc:
            raise NotReusable(f"the earlier archive is not a readable zip ({exc})") from exc
    return names


def _check(names: list[str], total: int, max_bytes: int) -> None:
    if not names:
        raise NotReusable("the earlier archive holds no compiled delegate")
    odd = [name for name in names if not _NAME.fullmatch(name)]
    if odd:
        raise NotReusable(f"the earlier archive's compiled files have odd names: {odd[:3]}")
    if _EMBEDDED_WEIGHTS in names:
        raise NotReusable("the earlier delegate carries its own weights")
    if total > max_bytes:
        raise NotReusable(f"the earlier compiled files are {total} bytes, over {max_bytes}")


def _copy_out(zipped: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> None:
    """Into a file created here; a member longer than its directory entry says stops at
    that size (zipfile checks the CRC once the whole member is read)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out, zipped.open(info) as src:
        shutil.copyfileobj(src, out, CHUNK_BYTES)
