"""What the service needs from storage: uploads, logs and artifacts, each owning its layout.

Nobody outside ``app/storage`` builds a path into the data dir. The local stores
(``files.py``, ``artifacts.py``) are the first implementations; an object store (S3)
implements the same protocols (``s3.py``), answering ``ArtifactStore.location`` with a
presigned URL, or with None when the API relays the object itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol


@dataclass(frozen=True)
class ArtifactRef:
    """A stored archive: its content address and size."""

    sha256: str
    size_bytes: int


class UploadStore(Protocol):
    """A job's input: the gate's rebuilt copy of an upload, kept until the job is deleted."""

    staging_dir: Path
    """A local dir that uploads stream into while they arrive (emptied at start)."""

    def staging_path(self) -> Path:
        """A fresh local path to receive or rebuild a file into before ``commit``."""

    def commit(self, job_id: str, staged: Path) -> None:
        """Make ``staged`` the input of ``job_id`` (it no longer exists at ``staged``)."""

    def materialize(self, job_id: str, dest: Path, *, share: bool) -> None:
        """Put the job's input at ``dest``; ``share`` allows a read-only hard link."""

    def remove(self, job_id: str) -> None:
        """Forget the job's input (and any staged file named after it)."""

    def discard_staged(self) -> int:
        """Remove leftovers of receptions that never finished; returns how many."""

    @property
    def parts(self) -> PartStore:
        """Where the parts of resumable uploads are received (``app.storage.resumable``)."""

    def keep(self, upload_id: str, staged: Path) -> None:
        """Make ``staged`` (the gate's rebuilt copy) the kept copy of a resumable upload."""

    def adopt(self, job_id: str, upload_id: str) -> None:
        """Make a copy of a kept upload the input of ``job_id`` (the upload stays, and
        removing either never changes the other); FileNotFoundError when it is gone."""

    def forget(self, upload_id: str) -> None:
        """Remove a kept upload (no error if there is none)."""


@dataclass(frozen=True)
class PartTarget:
    """Where the client sends one part: ``url`` (absolute, or a path of this API)."""

    number: int
    url: str
    method: str = "PUT"


class PartStore(Protocol):
    """The parts of resumable uploads until they are assembled: files in the data dir, or
    an S3 multipart upload that clients send to directly (presigned UploadPart URLs).

    ``multipart_id`` is what ``begin`` returned (None for local parts); it is kept on the
    upload's row, so any replica can carry on an upload another one began.
    """

    direct: bool
    """Parts go to the object store, not through the API (no PUT route serves them)."""

    def begin(self, upload_id: str) -> str | None:
        """Prepare to receive parts; returns the multipart id to remember, if any."""

    def targets(self, upload_id: str, multipart_id: str | None, numbers: list[int],
                expires_s: int) -> list[PartTarget]:
        """Where to send each of ``numbers``."""

    async def write(self, upload_id: str, number: int, chunks: AsyncIterator[bytes],
                    *, size_bytes: int) -> None:
        """Receive one part through the API (local only); a resend replaces it. Kept only
        when it is exactly ``size_bytes``: PayloadTooLarge past it, Unprocessable short of
        it (FileNotFoundError once the upload's parts were joined)."""

    def received(self, upload_id: str, multipart_id: str | None) -> dict[int, int]:
        """The parts received so far: number -> size in bytes."""

    def assemble(self, upload_id: str, multipart_id: str | None, numbers: list[int],
                 dest: Path) -> str:
        """Join the parts, in order, into the local file ``dest``; returns its sha256. The
        parts are gone afterwards (the multipart upload is completed)."""

    def abort(self, upload_id: str, multipart_id: str | None) -> None:
        """Drop the parts (abort the multipart upload); no error if there are none."""


class LogStore(Protocol):
    """A job's worker log."""

    def adopt(self, job_id: str, src: Path) -> None:
        """Make the file a child is writing to the job's log (the child keeps writing)."""

    def seal(self, job_id: str) -> None:
        """The child has exited: the log is whole; make it readable from every process."""

    def tail(self, job_id: str, limit_bytes: int) -> str:
        """The last ``limit_bytes`` of the log, decoded; empty when there is none."""

    def chunks(self, job_id: str) -> Iterator[bytes] | None:
        """The whole log in chunks, or None when the job has no log yet."""

    def remove(self, job_id: str) -> None:
        """Forget the job's log."""


class ArtifactStore(Protocol):
    """Archives by content address: identical bytes are stored once."""

    def put_stream(self, handle: BinaryIO) -> ArtifactRef:
        """Copy ``handle`` in while hashing it."""

    def exists(self, sha256: str) -> bool:
        """The archive is stored (cheap: no hashing)."""

    def is_intact(self, sha256: str) -> bool:
        """The archive is stored and still hashes to ``sha256``; a bad one is removed."""

    def location(self, sha256: str) -> Path | str | None:
        """Where a download is served from: a local file, a URL to redirect to, or None:
        the API relays ``open_chunks`` (an object store the clients cannot reach)."""

    def open_chunks(self, sha256: str) -> Iterator[bytes]:
        """The archive's bytes in chunks; FileNotFoundError when it is not stored. The
        store is asked before this returns, so a failure to reach it is raised here."""

    def fetch(self, sha256: str, dest: Path) -> None:
        """Put a private copy of the archive at ``dest`` (a new local file); changing it
        never changes the stored archive. FileNotFoundError when it is not stored."""

    def remove(self, sha256: str) -> None:
        """Delete the archive; only the job lifecycle decides when (reference counting)."""

    def stored(self) -> Iterator[tuple[str, int, float]]:
        """Every stored archive as (sha256, size, last modified in epoch seconds): what
        retention compares with the job table to find archives no job references."""
