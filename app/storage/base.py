"""What the service needs from storage: uploads, logs and artifacts, each owning its layout.

Nobody outside ``app/storage`` builds a path into the data dir. The local stores
(``files.py``, ``artifacts.py``) are the first implementations; an object store (S3)
implements the same protocols (``s3.py``), answering ``ArtifactStore.location`` with a
presigned URL, or with None when the API relays the object itself.
"""

from __future__ import annotations

from collections.abc import Iterator
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


class LogStore(Protocol):
    """A job's worker log."""

    def adopt(self, job_id: str, src: Path) -> None:
        """Make the file a child is writing to the job's log (the child keeps writing)."""

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
