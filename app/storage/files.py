"""Uploads and logs as files under the data dir: the one place their names are decided.

``uploads/{job_id}.pt2``   the gate's rebuilt copy of the upload (what a worker runs)
``uploads/.staging/``      receptions and rebuilds in flight; emptied at every start
``uploads/.parts/{upload_id}/{n}``  the parts of a resumable upload until it is assembled
``uploads/.kept/{upload_id}.pt2``   the gate's rebuilt copy of a completed resumable upload
``logs/{job_id}.log``      the job's worker log
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from anyio import to_thread

from app.constants import CHUNK_BYTES
from app.errors import ApiErrorCode, PayloadTooLarge, Unprocessable
from app.storage.base import PartTarget

STAGING = ".staging"
PARTS = ".parts"
KEPT = ".kept"


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
        self.parts = LocalPartStore(root / PARTS)

    def _path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.pt2"

    def _kept(self, upload_id: str) -> Path:
        return self.root / KEPT / f"{upload_id}.pt2"

    def keep(self, upload_id: str, staged: Path) -> None:
        self._kept(upload_id).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, self._kept(upload_id))

    def adopt(self, job_id: str, upload_id: str) -> None:
        """A hard link (the same bytes, never written again: both are replaced, never
        changed); a copy where links are not possible."""
        source, dest = self._kept(upload_id), self._path(job_id)
        try:
            os.link(source, dest)
        except FileNotFoundError:
            raise
        except OSError:
            shutil.copyfile(source, dest)

    def forget(self, upload_id: str) -> None:
        self._kept(upload_id).unlink(missing_ok=True)

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


class LocalPartStore:
    """Parts of resumable uploads as files, ``root/{upload_id}/{n}``; each arrives in a
    temp file renamed into place, so a part is there whole or not at all.

    :param root: the parts dir (in the uploads dir: same filesystem as the staging dir).
    """

    direct = False

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, upload_id: str) -> Path:
        return self.root / upload_id

    def begin(self, upload_id: str) -> str | None:
        self._dir(upload_id).mkdir(parents=True, exist_ok=True)
        return None

    def targets(self, upload_id: str, multipart_id: str | None, numbers: list[int],
                expires_s: int) -> list[PartTarget]:
        return [PartTarget(n, f"/v1/uploads/{upload_id}/parts/{n}") for n in numbers]

    async def write(self, upload_id: str, number: int, chunks: AsyncIterator[bytes],
                    *, size_bytes: int) -> None:
        folder = self._dir(upload_id)
        temp = folder / f".{number}.{uuid.uuid4().hex}.tmp"
        handle = await to_thread.run_sync(temp.open, "wb")
        size, pending = 0, bytearray()
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > size_bytes:
                    raise PayloadTooLarge(f"part {number} is longer than its {size_bytes} bytes",
                                          code=ApiErrorCode.PART_TOO_LARGE)
                pending += chunk
                if len(pending) >= CHUNK_BYTES:
                    block, pending = pending, bytearray()
                    await to_thread.run_sync(handle.write, block)
            await to_thread.run_sync(handle.write, pending)
            await to_thread.run_sync(handle.close)
            if size != size_bytes:
                raise Unprocessable(
                    f"part {number} is {size} bytes, it must be {size_bytes} (every part is "
                    "part_size_bytes but the last, which is the rest); send it again",
                    code=ApiErrorCode.INVALID_PART)
            os.replace(temp, folder / str(number))
        except BaseException:
            handle.close()
            temp.unlink(missing_ok=True)
            raise

    def received(self, upload_id: str, multipart_id: str | None) -> dict[int, int]:
        try:
            entries = list(os.scandir(self._dir(upload_id)))
        except FileNotFoundError:
            return {}
        return {int(entry.name): entry.stat().st_size for entry in entries
                if entry.name.isdigit()}

    def assemble(self, upload_id: str, multipart_id: str | None, numbers: list[int],
                 dest: Path) -> str:
        digest = hashlib.sha256()
        with dest.open("wb") as out:
            for number in numbers:
                with (self._dir(upload_id) / str(number)).open("rb") as part:
                    while block := part.read(CHUNK_BYTES):
                        digest.update(block)
                        out.write(block)
        self.abort(upload_id, multipart_id)
        return digest.hexdigest()

    def abort(self, upload_id: str, multipart_id: str | None) -> None:
        shutil.rmtree(self._dir(upload_id), ignore_errors=True)


class LocalLogStore:
    """Job logs in ``root``.

    :param root: the logs dir.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, job_id: str) -> Path:
        """Where the job's log file is (or would be)."""
        return self.root / f"{job_id}.log"

    def adopt(self, job_id: str, src: Path) -> None:
        with contextlib.suppress(OSError):
            os.replace(src, self.path(job_id))

    def seal(self, job_id: str) -> None:
        """Nothing to do: every process of this host (or shared data dir) reads the file."""

    def tail(self, job_id: str, limit_bytes: int) -> str:
        return tail_text(self.path(job_id), limit_bytes)

    def chunks(self, job_id: str) -> Iterator[bytes] | None:
        try:
            handle = self.path(job_id).open("rb")
        except FileNotFoundError:
            return None

        def read() -> Iterator[bytes]:
            with handle:
                while block := handle.read(CHUNK_BYTES):
                    yield block

        return read()

    def remove(self, job_id: str) -> None:
        self.path(job_id).unlink(missing_ok=True)
