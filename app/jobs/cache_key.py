"""The cache key: what makes two submissions identical.

It hashes everything that shapes a job's artifact. A submission whose key has a
succeeded job with its archive intact becomes a succeeded job at once (sharing the
stored archive); one whose key has a queued or running job follows it and finishes with
it, so identical requests cost one compile (``lifecycle.JobLifecycle.admit``). Failed
and cancelled jobs are never cache entries.

``code_key`` is coarser: what makes two jobs compile the same code. A job whose code key
has a succeeded job takes that job's compiled files instead of compiling (worker.py),
and is still verified in full with its own weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
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
        **build_target(params, toolchain),
    }
    return _digest(material)


def build_target(params: Mapping[str, Any], toolchain: Mapping[str, Any]) -> dict[str, Any]:
    """What of the toolchain shapes compiled code for this job's device (``params``: the
    job's or its form's ``device`` and ``options``)."""
    return {
        "cpu_isa": toolchain.get("cpu_isa"),
        "cpp_march": params["options"].get("cpp.march") or toolchain.get("cpp_march")
        or "native",
        "cuda_arch": toolchain.get("cuda_arch") if params["device"] != "cpu" else None,
        "compiler": toolchain.get("compiler"),
        "torch_version": toolchain.get("torch_version"),
        "lowering_version": LOWERING_VERSION,
    }


def _digest(material: dict[str, Any]) -> str:
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


CODE_VERSION = "1"
"""Bump when what the lowering compiles for a given structure changes (e.g. the inductor
settings lower.py forces), so code compiled before is not reused."""

# Options under which the compiled code depends on weight values: freezing folds them
# into the code, runtime constant folding computes new constants from them, and an
# embedded .so carries them. Such jobs neither reuse nor donate compiled code.
VALUE_DEPENDENT_OPTIONS = ("freezing", "aot_inductor.use_runtime_constant_folding",
                           "aot_inductor.package_constants_in_so")


def code_key(*, structure_sha256: str, params: dict[str, Any],
             toolchain: dict[str, Any]) -> str | None:
    """The key of a job's compiled code (the delegate's .so and its sources), or None when
    that code depends on weight values.

    Two jobs with the same key compile the same code: the same structure (the graph with
    its signature, shapes, dtypes, dynamic ranges and example inputs; the weights'
    names, shapes and dtypes, not their values: see validation.gate.shapes_code), the
    same names, device, options and toolchain. Verification settings are not in it:
    they do not change what is compiled.
    """
    options = params["options"]
    if any(options.get(name) for name in VALUE_DEPENDENT_OPTIONS):
        return None
    material = {
        "structure_sha256": structure_sha256,
        "model_name": params["model_name"],
        "backend_id": params["backend_id"],
        "device": params["device"],
        "options": options,
        "code_version": CODE_VERSION,
        **build_target(params, toolchain),
    }
    return _digest(material)
