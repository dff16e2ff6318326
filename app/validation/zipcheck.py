"""Zip framing: the geometry, names, sizes and CRCs of an archive, checked before use.

Python's ``zipfile`` parses the central directory; every entry's local header is then
read here and the entries must tile the file exactly (first at offset 0, each one
right after the previous one's data and descriptor, the last one ending where the
central directory starts), so no bytes hide before, between or inside members, and
no two entries share bytes. CRCs are checked when members are read (``zipfile``
verifies them at the end of every member).
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from typing import IO

from app.errors import ApiErrorCode, PayloadTooLarge, Unprocessable, UnsupportedMediaType
from app.validation.limits import ArchiveLimits

_EOCD = struct.Struct("<4sHHHHIIH")
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
# Bits torch's writer and Python's zipfile set: descriptor (3), UTF-8 (11), deflate level.
_ALLOWED_FLAGS = 0x0808 | 0x0006
_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
_FORBIDDEN_CHARS = ("\\", "\0", ":")


@dataclass(frozen=True)
class Member:
    """One validated zip entry: full name, name below the root folder, its ZipInfo."""

    name: str
    rel: str
    info: zipfile.ZipInfo

    @property
    def size(self) -> int:
        return int(self.info.file_size)


def _bad(where: str, message: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(f"{where}: {message}; a .pt2 archive is the zip that "
                                "torch.export.save writes", code=ApiErrorCode.NOT_A_PT2_ARCHIVE)


def _central_directory(fh: IO[bytes], size: int, where: str) -> tuple[int, int]:
    """(offset, end) of the central directory, from an EOCD that ends the file."""
    if size < _EOCD.size:
        raise _bad(where, "too short to be a zip archive")
    fh.seek(size - _EOCD.size)
    sig, disk, cd_disk, _, count, cd_size, cd_offset, comment = _EOCD.unpack(fh.read(_EOCD.size))
    if sig != b"PK\x05\x06" or comment:
        raise _bad(where, "the zip end record must end the file (no trailing data or comment)")
    if disk or cd_disk:
        raise _bad(where, "multi-disk zip archives are not accepted")
    end = size - _EOCD.size
    locator = b""
    if end >= _ZIP64_LOCATOR.size:
        fh.seek(end - _ZIP64_LOCATOR.size)
        locator = fh.read(_ZIP64_LOCATOR.size)
    if locator[:4] == b"PK\x06\x07":  # torch's writer always adds the zip64 records
        _, _, rec_offset, _ = _ZIP64_LOCATOR.unpack(locator)
        if rec_offset + _ZIP64_EOCD.size > end:
            raise _bad(where, "zip64 locator is broken")
        fh.seek(rec_offset)
        fields = _ZIP64_EOCD.unpack(fh.read(_ZIP64_EOCD.size))
        if fields[0] != b"PK\x06\x06" or rec_offset + 12 + fields[1] != end - 20:
            raise _bad(where, "zip64 end record is broken or followed by extra data")
        cd_size, cd_offset, end = fields[8], fields[9], rec_offset
    elif 0xFFFFFFFF in (cd_size, cd_offset) or count == 0xFFFF:
        raise _bad(where, "zip64 locator missing")
    if cd_offset + cd_size != end:
        raise _bad(where, "data between the central directory and the end record")
    return cd_offset, end


def _descriptor_length(fh: IO[bytes], info: zipfile.ZipInfo, at: int) -> int:
    fh.seek(at)
    raw = fh.read(24)
    sizes = (info.CRC, info.compress_size, info.file_size)
    for skip in (4, 0) if raw[:4] == b"PK\x07\x08" else (0,):
        for fmt in ("<III", "<IQQ"):
            width = struct.calcsize(fmt)
            if len(raw) >= skip + width and struct.unpack_from(fmt, raw, skip) == sizes:
                return skip + width
    raise _bad(info.orig_filename, "its data descriptor does not match the central directory")


def _check_name(name: str, where: str) -> None:
    parts = name.split("/")
    if (
        name.startswith("/") or any(c in name for c in _FORBIDDEN_CHARS)
        or any(part in ("", ".", "..") for part in parts)
        or any(ord(c) < 32 or ord(c) == 127 for c in name) or len(name) > 1024
    ):
        raise Unprocessable(
            f"{where}member {name!r} has an unsafe name (absolute, '..', '.', empty part, "
            "backslash, colon, NUL or control character)", code=ApiErrorCode.UNSAFE_MEMBER_NAME)


def _check_sizes(info: zipfile.ZipInfo, limits: ArchiveLimits, where: str) -> None:
    name = info.orig_filename
    if info.file_size > limits.max_member_bytes:
        raise PayloadTooLarge(f"{where}member {name!r} is {info.file_size} bytes uncompressed; "
                              f"the limit is {limits.max_member_bytes}",
                              code=ApiErrorCode.ARCHIVE_TOO_LARGE)
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise _bad(name, "stored member whose compressed and uncompressed sizes differ")
    if info.file_size > 65536 and info.file_size > limits.max_ratio * max(info.compress_size, 1):
        raise PayloadTooLarge(f"{where}member {name!r} expands {info.file_size} / "
                              f"{info.compress_size} times; the limit is {limits.max_ratio}",
                              code=ApiErrorCode.ARCHIVE_TOO_LARGE)


def scan_zip(fh: IO[bytes], size: int, limits: ArchiveLimits, where: str = "") -> tuple[
        zipfile.ZipFile, list[Member]]:
    """Open ``fh`` as a zip whose framing is sound; return it and its members in order.

    ``where`` prefixes messages for a nested zip (e.g. the example inputs).
    """
    label = where.rstrip(": ") or "upload"
    cd_offset, _ = _central_directory(fh, size, label)
    try:
        archive = zipfile.ZipFile(fh)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise _bad(label, f"not a readable zip archive ({exc})") from exc
    infos = archive.infolist()
    if len(infos) > limits.max_members:
        raise PayloadTooLarge(f"{where}archive has {len(infos)} members; the limit is "
                              f"{limits.max_members}", code=ApiErrorCode.ARCHIVE_TOO_LARGE)
    if archive.start_dir != cd_offset:
        raise _bad(label, "data before the first member")
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = info.orig_filename
        if name in seen or info.filename in seen:
            raise Unprocessable(f"{where}member {name!r} appears twice; readers disagree on "
                                "which copy they read", code=ApiErrorCode.UNSAFE_MEMBER_NAME)
        seen.update((name, info.filename))
        _check_name(name, where)
        if info.flag_bits & 0x1 or info.flag_bits & ~_ALLOWED_FLAGS:
            raise _bad(name, f"encrypted or unsupported zip flags {info.flag_bits:#x}")
        if info.compress_type not in _METHODS:
            raise _bad(name, f"compression method {info.compress_type} (only stored or "
                             "deflated are accepted)")
        _check_sizes(info, limits, where)
        total += info.file_size
        if total > limits.max_total_bytes:
            raise PayloadTooLarge(f"{where}archive expands to more than "
                                  f"{limits.max_total_bytes} bytes",
                                  code=ApiErrorCode.ARCHIVE_TOO_LARGE)
    _check_tiling(fh, infos, cd_offset)
    members = [Member(i.orig_filename, i.orig_filename.partition("/")[2], i) for i in infos]
    return archive, members


def _check_tiling(fh: IO[bytes], infos: list[zipfile.ZipInfo], cd_offset: int) -> None:
    position = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        name = info.orig_filename
        if info.header_offset != position:
            gap = "overlaps another member" if info.header_offset < position else (
                "has unaccounted bytes before it")
            raise _bad(name, f"member {gap} (offset {info.header_offset}, expected {position})")
        fh.seek(info.header_offset)
        raw = fh.read(_LOCAL.size)
        if len(raw) != _LOCAL.size:
            raise _bad(name, "truncated local header")
        sig, _, flags, method, _, _, _, _, _, name_len, extra_len = _LOCAL.unpack(raw)
        local_name = fh.read(name_len)
        expected = name.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
        if sig != b"PK\x03\x04" or local_name != expected or flags != info.flag_bits or (
                method != info.compress_type):
            raise _bad(name, "local header disagrees with the central directory")
        end = info.header_offset + _LOCAL.size + name_len + extra_len + info.compress_size
        if info.flag_bits & 0x8:
            end += _descriptor_length(fh, info, end)
        position = end
    if position != cd_offset:
        raise _bad("upload", "unaccounted bytes between the last member and the directory")


def read_member(archive: zipfile.ZipFile, member: Member, cap: int, where: str = "") -> bytes:
    """The whole member (CRC checked), refusing one over ``cap`` bytes."""
    return _read(archive, member, cap, where, keep=True)


def drain_member(archive: zipfile.ZipFile, member: Member, cap: int, where: str = "") -> None:
    """Read the member through once in chunks (so its CRC is checked) without holding it."""
    _read(archive, member, cap, where, keep=False)


def _read(archive: zipfile.ZipFile, member: Member, cap: int, where: str, *, keep: bool,
          chunk: int = 1 << 20) -> bytes:
    if member.size > cap:
        raise PayloadTooLarge(f"{where}member {member.name!r} is {member.size} bytes; the "
                              f"limit for it is {cap}", code=ApiErrorCode.ARCHIVE_TOO_LARGE)
    blocks: list[bytes] = []
    seen = 0
    try:
        with archive.open(member.info) as src:
            while block := src.read(chunk):
                seen += len(block)
                if keep:
                    blocks.append(block)
                if seen > member.size:
                    break
    except MemoryError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as exc:
        raise _bad(f"{where}{member.name}", f"unreadable ({exc})") from exc
    except Exception as exc:  # zlib.error and friends from a corrupt deflate stream
        raise _bad(f"{where}{member.name}", f"unreadable ({type(exc).__name__})") from exc
    if seen != member.size:
        raise _bad(f"{where}{member.name}", "size differs from its directory entry")
    return b"".join(blocks)
