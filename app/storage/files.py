"""Uploads and logs as files under the data dir: the one place their names are decided.

``uploads/{job_id}.pt2``   the gate's rebuilt copy of the upload (what a worker runs)
``uploads/.staging/``      receptions and rebuilds in flight; emptied at every start
``logs/{job_id}.log``      the job's worker log
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from app.constants import CHUNK_BYTES

STAGING = ".staging"


def tail_text(path: Path, limit_bytes: int) -> str:
    """The last ``limit_bytes`` of a text file, decoded; empty when it cannot be read."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - limit_bytes))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


class LocalUploadStore:
    """Job inputs in ``root``.

    :param root: the uploads dir; staged files live in ``root/.staging`` (same filesystem,
        so a commit is an atomic rename).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging_dir = root / STAGING

    def _path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.pt2"

    def staging_path(self) -> Path:
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        return self.staging_dir / f"{uuid.uuid4().hex}.pt2"

    def commit(self, job_id: str, staged: Path) -> None:
        os.replace(staged, self._path(job_id))

    def materialize(self, job_id: str, dest: Path, *, share: bool) -> None:
        """A hard link only when ``share`` (the reader is another uid that cannot write
        it); otherwise a copy, so a job can never change the input a retry would run."""
        source = self._path(job_id)
        if share:
            source.chmod(0o644)
            with contextlib.suppress(OSError):
                os.link(source, dest)
                return
        shutil.copyfile(source, dest)

    def remove(self, job_id: str) -> None:
        self._path(job_id).unlink(missing_ok=True)

    def discard_staged(self) -> int:
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        count = 0
        for leftover in self.staging_dir.iterdir():
            leftover.unlink(missing_ok=True)
            count += 1
        return count


class LocalLogStore:
    """Job logs in ``root``.

    :param root: the logs dir.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.log"

    def adopt(self, job_id: str, src: Path) -> None:
        with contextlib.suppress(OSError):
            os.replace(src, self._path(job_id))

    def tail(self, job_id: str, limit_bytes: int) -> str:
        return tail_text(self._path(job_id), limit_bytes)

    def chunks(self, job_id: str) -> Iterator[bytes] | None:
        try:
            handle = self._path(job_id).open("rb")
        except FileNotFoundError:
            return None

        def read() -> Iterator[bytes]:
            with handle:
                while block := handle.read(CHUNK_BYTES):
                    yield block

        return read()

    def remove(self, job_id: str) -> None:
        self._path(job_id).unlink(missing_ok=True)
