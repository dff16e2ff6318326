"""The cache key: what makes two submissions identical.

It hashes everything that shapes a job's artifact. A submission whose key has a
succeeded job with its archive intact becomes a succeeded job at once (sharing the
stored archive); one whose key has a queued or running job follows it and finishes with
it, so identical requests cost one compile (``lifecycle.JobLifecycle.admit``). Failed
and cancelled jobs are never cache entries.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from app.constants import LOWERING_VERSION


def cache_key(*, input_sha256: str, params: dict[str, Any], toolchain: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of every input that can change the artifact."""
    options = params["options"]
    material = {
        "input_sha256": input_sha256,
        "model_name": params["model_name"],
        "backend_id": params["backend_id"],
        "device": params["device"],
        "options": options,
        # verification results are written into the archive's provenance
        "verify": params["verify"], "rtol": params["rtol"], "atol": params["atol"],
        "cpu_isa": toolchain.get("cpu_isa"),
        "cpp_march": options.get("cpp.march") or toolchain.get("cpp_march") or "native",
        "cuda_arch": toolchain.get("cuda_arch") if params["device"] != "cpu" else None,
        "compiler": toolchain.get("compiler"),
        "torch_version": toolchain.get("torch_version"),
        "lowering_version": LOWERING_VERSION,
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
