"""Content-addressed artifact files under the data dir, written atomically.

``artifacts/{sha256[:2]}/{sha256}.pt2``; the only module that knows it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from app.constants import CHUNK_BYTES, SHA256_RE
from app.storage.base import ArtifactRef


def sha256_file(path: Path) -> tuple[str, int]:
    """The file's sha256 hex digest and size, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while block := handle.read(CHUNK_BYTES):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


class LocalArtifactStore:
    """Archives named by their sha256; identical bytes are stored once.

    :param root: directory the archives live in; writes go through a temp file in it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        # sha256 -> (inode, size, mtime_ns) of the file last found intact; hashing a
        # multi-GB archive on every download would be wasteful, a changed file is not.
        self._intact: dict[str, tuple[int, int, int]] = {}
        self._lock = threading.Lock()

    def _path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.pt2"

    def location(self, sha256: str) -> Path:
        return self._path(sha256)

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def put_stream(self, handle: BinaryIO) -> ArtifactRef:
        """Copy ``handle`` into the store while hashing it.

        A copy, not a rename: the source belongs to the sandbox, and the stored file
        must be ours (owner, mode, no other links to it). The name is the hash of exactly
        the bytes written, so the file is known intact: its first download (the ``?wait=``
        answer included) does not hash it again (~0.8 s a GB).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        with tempfile.NamedTemporaryFile(dir=self.root, prefix=".incoming-", delete=False) as out:
            try:
                while block := handle.read(CHUNK_BYTES):
                    digest.update(block)
                    out.write(block)
                    size += len(block)
                out.flush()
                os.fsync(out.fileno())
                stored = os.fstat(out.fileno())
            except BaseException:
                Path(out.name).unlink(missing_ok=True)
                raise
        sha256 = digest.hexdigest()
        dest = self._path(sha256)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(out.name, 0o644)
            # Readers either see no file or the complete one: rename is atomic.
            os.replace(out.name, dest)
        except BaseException:
            Path(out.name).unlink(missing_ok=True)
            raise
        with self._lock:  # a rename keeps the inode, size and mtime
            self._intact[sha256] = (stored.st_ino, stored.st_size, stored.st_mtime_ns)
        return ArtifactRef(sha256, size)

    def stored(self) -> Iterator[tuple[str, int, float]]:
        if not self.root.is_dir():
            return
        for folder in self.root.iterdir():
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                sha256 = entry.name.removesuffix(".pt2")
                if entry.name.endswith(".pt2") and SHA256_RE.fullmatch(sha256):
                    stat = entry.stat()
                    yield sha256, stat.st_size, stat.st_mtime

    def is_intact(self, sha256: str) -> bool:
        """True if the stored file's bytes still hash to ``sha256``; a bad file is removed."""
        path = self._path(sha256)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if self._intact.get(sha256) == stamp:
                return True
        if sha256_file(path)[0] != sha256:
            # Never serve it again; an identical submission will lower it afresh.
            self.remove(sha256)
            return False
        with self._lock:
            self._intact[sha256] = stamp
        return True

    def open_chunks(self, sha256: str) -> Iterator[bytes]:
        handle = self._path(sha256).open("rb")  # FileNotFoundError before any byte

        def read() -> Iterator[bytes]:
            with handle:
                while block := handle.read(CHUNK_BYTES):
                    yield block

        return read()

    def fetch(self, sha256: str, dest: Path) -> None:
        """A copy, not a hard link: the stored file must have no other names."""
        shutil.copyfile(self._path(sha256), dest)

    def remove(self, sha256: str) -> None:
        with self._lock:
            self._intact.pop(sha256, None)
        self._path(sha256).unlink(missing_ok=True)
