"""Content-addressed artifact files under the data dir, written atomically."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from app.constants import CHUNK_BYTES


def sha256_file(path: Path) -> tuple[str, int]:
    """The file's sha256 hex digest and size, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while block := handle.read(CHUNK_BYTES):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


class ArtifactStore:
    """Archives named by their sha256; identical bytes are stored once.

    :param root: directory on the same filesystem as the scratch dir (rename is atomic).
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.pt2"

    def put(self, src: Path) -> tuple[str, int]:
        """Move ``src`` into the store; returns (sha256, size_bytes)."""
        sha256, size = sha256_file(src)
        dest = self.path_for(sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with src.open("rb") as handle:
            os.fsync(handle.fileno())
        # Readers either see no file or the complete one: rename is atomic.
        os.replace(src, dest)
        return sha256, size

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def remove(self, sha256: str) -> None:
        self.path_for(sha256).unlink(missing_ok=True)
