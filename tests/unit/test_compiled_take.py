"""Taking compiled files out of an earlier job's archive: the archive is untrusted (an
earlier sandbox wrote it), so only plain files of the one delegate come out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.storage.compiled import NotReusable, take_compiled
from tests.factories import zip_bytes

PREFIX = "archive/data/aotinductor/m-aoti/"


def _archive(tmp_path: Path, members: dict[str, bytes]) -> Path:
    path = tmp_path / "earlier.pt2"
    path.write_bytes(zip_bytes({"archive/models/m.json": b"{}", **members}))
    return path


def test_the_delegates_files_come_out(tmp_path: Path) -> None:
    archive = _archive(tmp_path, {PREFIX + "c1.wrapper.so": b"\x7fELF", PREFIX + "c1.cpp": b"x",
                                  "archive/data/aotinductor/other-aoti/c2.so": b"no"})
    dest = tmp_path / "compiled"
    names = take_compiled(archive, delegate="m-aoti", dest=dest, max_bytes=1 << 20)
    assert sorted(names) == ["c1.cpp", "c1.wrapper.so"]
    assert sorted(p.name for p in dest.iterdir()) == sorted(names)
    assert (dest / "c1.wrapper.so").read_bytes() == b"\x7fELF"
    assert not any(os.stat(p).st_mode & 0o022 for p in dest.iterdir())


@pytest.mark.parametrize("name", ["../escape.so", "sub/dir.so", ".hidden", "a\\b.so", "-x"])
def test_odd_names_are_refused(tmp_path: Path, name: str) -> None:
    archive = _archive(tmp_path, {PREFIX + "ok.so": b"1", PREFIX + name: b"2"})
    with pytest.raises(NotReusable, match="odd names"):
        take_compiled(archive, delegate="m-aoti", dest=tmp_path / "compiled", max_bytes=1 << 20)
    assert not (tmp_path / "compiled").exists()
    assert not (tmp_path / "escape.so").exists()


def test_a_delegate_with_its_own_weights_is_refused(tmp_path: Path) -> None:
    archive = _archive(tmp_path, {PREFIX + "c.so": b"1", PREFIX + "weights_config.json": b"{}"})
    with pytest.raises(NotReusable, match="own weights"):
        take_compiled(archive, delegate="m-aoti", dest=tmp_path / "compiled", max_bytes=1 << 20)


def test_files_over_the_cap_are_refused(tmp_path: Path) -> None:
    archive = _archive(tmp_path, {PREFIX + "c.so": b"x" * 4096})
    with pytest.raises(NotReusable, match="over 1024"):
        take_compiled(archive, delegate="m-aoti", dest=tmp_path / "compiled", max_bytes=1024)


def test_no_delegate_not_a_zip_or_a_link_is_no_reuse(tmp_path: Path) -> None:
    archive = _archive(tmp_path, {})
    with pytest.raises(NotReusable, match="no compiled"):
        take_compiled(archive, delegate="m-aoti", dest=tmp_path / "a", max_bytes=1 << 20)
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(NotReusable, match="not a readable zip"):
        take_compiled(garbage, delegate="m-aoti", dest=tmp_path / "b", max_bytes=1 << 20)
    link = tmp_path / "link.pt2"
    link.symlink_to(_archive(tmp_path, {PREFIX + "c.so": b"1"}))
    with pytest.raises(OSError):
        take_compiled(link, delegate="m-aoti", dest=tmp_path / "c", max_bytes=1 << 20)


def test_a_corrupt_member_fails_its_crc(tmp_path: Path) -> None:
    archive = _archive(tmp_path, {PREFIX + "c.so": b"A" * 64})
    raw = archive.read_bytes()
    archive.write_bytes(raw.replace(b"A" * 64, b"B" * 64, 1))
    with pytest.raises(NotReusable, match="not a readable zip"):
        take_compiled(archive, delegate="m-aoti", dest=tmp_path / "compiled", max_bytes=1 << 20)
