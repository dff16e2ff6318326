"""The artifact store: an archive it stored is served without hashing it again, and a
stored file that changes afterwards is still caught."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from app.storage import artifacts as artifacts_module
from app.storage.artifacts import LocalArtifactStore


def test_a_stored_archive_is_known_intact_without_hashing_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    payload = os.urandom(3 << 20)
    ref = store.put_stream(io.BytesIO(payload))
    assert ref.sha256 == hashlib.sha256(payload).hexdigest() and ref.size_bytes == len(payload)
    assert store.location(ref.sha256).read_bytes() == payload

    def no_hashing(path: Path) -> tuple[str, int]:
        raise AssertionError("hashed again")

    monkeypatch.setattr(artifacts_module, "sha256_file", no_hashing)
    assert store.is_intact(ref.sha256)


def test_a_stored_archive_that_changes_is_not_served(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    ref = store.put_stream(io.BytesIO(b"archive bytes" * 1000))
    path = store.location(ref.sha256)
    path.write_bytes(b"other bytes!!" * 1000)  # same size; a new mtime
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert not store.is_intact(ref.sha256)
    assert not path.exists()
