"""The gate child: ``python -S -m app.validation.child``, started by isolated.py.

Reads one JSON request on stdin (paths, ArchiveLimits, its own resource limits), sets
RLIMIT_CORE/AS/CPU/FSIZE on itself, runs :func:`admit_upload` and writes one JSON object
on stdout: ``{"report": GateReport}`` or ``{"error": {status, code, message}}``. Imports
only the standard library and app.validation (no asyncio, no torch) to start fast.
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from app.errors import ApiErrorCode, ServiceError
from app.validation.gate import admit_upload
from app.validation.limits import ArchiveLimits

MAX_OUTPUT_BYTES = 1 << 20
TOO_COMPLEX = ("checking this upload needed more than {} bytes of memory "
               "(LOWERING_GATE_MAX_MEMORY_BYTES); it is too complex to accept")


def _limit(kind: int, value: int) -> None:
    _, hard = resource.getrlimit(kind)
    soft = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (soft, hard))


def main(stdin: IO[str], stdout: IO[str]) -> int:
    memory = 0
    try:
        request = json.loads(stdin.read(MAX_OUTPUT_BYTES))
        memory = int(request["max_memory_bytes"])
        _limit(resource.RLIMIT_CORE, 0)
        _limit(resource.RLIMIT_AS, memory)
        _limit(resource.RLIMIT_CPU, max(1, int(float(request["max_cpu_s"]) + 0.999)))
        _limit(resource.RLIMIT_FSIZE, int(request["max_file_bytes"]))
        report = admit_upload(Path(request["src"]), Path(request["dest"]),
                              ArchiveLimits(**request["limits"]))
        result: dict[str, Any] = {"report": asdict(report)}
    except ServiceError as exc:
        message = TOO_COMPLEX.format(memory) if exc.code == ApiErrorCode.UPLOAD_TOO_COMPLEX else (
            exc.message)
        result = {"error": {"status": exc.status, "code": exc.code, "message": message}}
    except MemoryError:
        result = {"error": {"status": 422, "code": ApiErrorCode.UPLOAD_TOO_COMPLEX,
                            "message": TOO_COMPLEX.format(memory)}}
    except Exception as exc:  # a bug, not a refusal: the parent answers 500 and logs this
        import traceback

        traceback.print_exc()
        result = {"error": {"status": 500, "code": ApiErrorCode.INTERNAL_ERROR,
                            "message": type(exc).__name__}}
    stdout.write(json.dumps(result))
    stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.stdin, sys.stdout))
