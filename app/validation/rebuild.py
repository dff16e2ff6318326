"""Write a fresh zip of exactly the validated members, so torch reads what the gate saw.

Same names, same bytes, stored (not compressed) and 64-byte aligned like torch's own
writer. Members are streamed: zipfile checks each one's CRC as its last chunk is read,
so a corrupt member fails here instead of reaching a worker.
"""

from __future__ import annotations

import hashlib
import os
import struct
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.errors import ApiErrorCode, ServiceError, UnsupportedMediaType
from app.validation.zipcheck import Member

CHUNK_BYTES = 1 << 20
ALIGN = 64
_PAD_ID = 0x4246  # "FB", the padding extra field torch's writer uses


def _aligned_info(name: str, size: int, offset: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    info.external_attr = 0o644 << 16
    zip64_extra = 20 if size * 1.05 > zipfile.ZIP64_LIMIT else 0
    start = offset + 30 + len(name.encode("utf-8")) + 4 + zip64_extra
    pad = -start % ALIGN
    info.extra = struct.pack("<HH", _PAD_ID, pad) + b"\0" * pad
    return info


def rebuild(archive: zipfile.ZipFile, members: list[Member], dest: Path,
            digest: Callable[[Member], bool] = lambda member: False) -> tuple[int, str]:
    """Write ``members`` of ``archive`` to ``dest`` atomically; return its size in bytes
    and the sha256 of the members ``digest`` picks (see ``structure_digest``)."""
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    digests: dict[str, str] = {}
    try:
        with tmp.open("wb") as raw, zipfile.ZipFile(raw, "w", allowZip64=True) as out:
            for member in members:
                hasher = hashlib.sha256() if digest(member) else None
                _copy(archive, member, out, raw.tell(), hasher)
                if hasher is not None:
                    digests[member.rel] = hasher.hexdigest()
        size = tmp.stat().st_size
        os.replace(tmp, dest)
        return size, structure_digest(digests)
    except ServiceError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ServiceError(f"could not write the validated archive: {exc.strerror}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def structure_digest(digests: dict[str, str]) -> str:
    """One sha256 over (name below the root folder, sha256) of each picked member, in name
    order: the same for two uploads whose picked members hold the same bytes, whatever
    their root folder or member order."""
    lines = "".join(f"{rel}\0{value}\n" for rel, value in sorted(digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _copy(archive: zipfile.ZipFile, member: Member, out: zipfile.ZipFile, offset: int,
          hasher: Any = None) -> None:
    info = _aligned_info(member.name, member.size, offset)
    copied = 0
    try:
        with archive.open(member.info) as src, out.open(info, "w") as dst:
            while chunk := src.read(CHUNK_BYTES):
                copied += len(chunk)
                dst.write(chunk)
                if hasher is not None:
                    hasher.update(chunk)
    except OSError:
        raise  # disk trouble on our side: a 500 from rebuild()
    except Exception as exc:  # BadZipFile (CRC), EOFError, zlib.error: a corrupt member
        raise UnsupportedMediaType(f"member {member.name!r} is corrupt "
                                   f"({type(exc).__name__}: {str(exc)[:80]})",
                                   code=ApiErrorCode.NOT_A_PT2_ARCHIVE) from exc
    if copied != member.size:
        raise UnsupportedMediaType(f"member {member.name!r} is shorter than its directory "
                                   "entry says", code=ApiErrorCode.NOT_A_PT2_ARCHIVE)
