"""run_lowering: load -> lower -> package -> verify, each failure a JobError."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from app.constants import ErrorCode, Phase
from app.errors import JobError
from app.jobs import failures
from app.lowering.load import load_program
from app.lowering.lower import constant_sources, lower_program
from app.lowering.package import LOAD_HINT, WEIGHTS_MODES, write_archive
from app.lowering.profile import profile_archive, working_copy
from app.lowering.toolchain import probe_toolchain
from app.lowering.verify import verify_archive
from app.options import EMBED_OPTION

log = logging.getLogger("app.lowering")


@dataclass
class LoweringResult:
    timings: dict[str, float] = field(default_factory=dict)
    verification: dict[str, Any] | None = None
    toolchain: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] | None = None
    code_reused: bool = False


@contextmanager
def _phase(name: Phase, timings: dict[str, float], on_phase: Callable[[str], None],
           code: ErrorCode = ErrorCode.LOWERING_FAILED) -> Iterator[None]:
    on_phase(name.value)
    log.info("phase %s started", name)
    start = time.monotonic()
    try:
        yield
    except JobError:
        raise
    except Exception as exc:
        log.exception("phase %s failed", name)
        raise failures.error_for(exc, phase=name.value, default=code) from exc
    finally:
        timings[name.value] = timings.get(name.value, 0.0) + time.monotonic() - start
    log.info("phase %s done in %.1f s", name, timings[name.value])


def _profile(archive: Path, program: ExportedProgram, model_name: str, backend_id: str,
             device: str, timings: dict[str, float],
             on_phase: Callable[[str], None]) -> dict[str, Any] | None:
    """Time the verified runner against eager; a failure here costs the job nothing but
    its profile (the archive is already verified)."""
    on_phase(Phase.PROFILE.value)
    start = time.monotonic()
    try:
        return profile_archive(archive_path=archive, program=program, model_name=model_name,
                               backend_id=backend_id, device=device)
    except Exception:
        log.exception("profiling failed; the job goes on without a profile")
        return None
    finally:
        timings[Phase.PROFILE.value] = time.monotonic() - start


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise JobError(
            ErrorCode.LOWERING_FAILED,
            f"device {device!r} requested but this worker has no usable CUDA device",
            detail={"exception_type": "RuntimeError", "phase": "lower"},
        )


def _failure_message(verification: dict[str, Any]) -> str:
    """Which case and output failed, and how, without a value the compiled code computed."""
    bad = next(c for c in verification["cases"] if not c["passed"])
    where = f"case {bad['name']} (sizes {bad['sizes']})"
    if "error" in bad:
        return f"{where}: {bad['error']}"
    failed = [o for o in bad.get("outputs", []) if not o["passed"]]
    if not failed:
        return f"{where} failed"
    first = failed[0]
    problem = first.get("problem")
    if problem in ("shape", "dtype"):
        got, expected = first["got"].get(problem), first["expected"].get(problem)
        how = f"{problem} {got} where {expected} was expected"
    elif problem:
        how = str(problem)
    else:
        tol = f"atol {verification['atol']} + rtol {verification['rtol']} * |expected|"
        how = f"max abs error in the range {first['error_magnitude']} exceeds {tol}"
    others = [str(o["index"]) for o in failed[1:]]
    also = ""
    if others:
        also = f"; outputs {', '.join(others[:20])}{' ...' if len(others) > 20 else ''} differ too"
    return f"output {first['index']} (flat index) differs in {where}: {how}{also}"


def run_lowering(
    *,
    program_path: Path,
    out_path: Path,
    model_name: str,
    backend_id: str,
    device: str,
    options: dict[str, Any],
    verify: bool,
    rtol: float,
    atol: float,
    provenance: dict[str, Any],
    on_phase: Callable[[str], None] = lambda phase: None,
    max_artifact_bytes: int | None = None,
    weights: str | None = None,
    compiled: list[Path] | None = None,
) -> LoweringResult:
    """``weights``: "shared" (the default) stores them once, in the original program, and
    the delegate's .so takes them from there at load (package.load_runner); "embedded"
    compiles them into the .so as well (a self-contained runner, an archive twice the
    weights' size). Unset, the job's option ``aot_inductor.package_constants_in_so``
    decides (true: embedded).

    ``compiled``: files an earlier lowering of the same structure compiled (shared
    weights only); packaged instead of compiling. Should that archive fail (it never
    should: see cache_key.code_key), the program is compiled afresh.
    """
    if weights is None:
        weights = "embedded" if options.get(EMBED_OPTION) else "shared"
    if weights not in WEIGHTS_MODES:
        raise ValueError(f"weights must be one of {WEIGHTS_MODES}, not {weights!r}")
    shared = weights == "shared"
    if compiled is not None and not shared:
        raise ValueError("compiled files can be reused only with shared weights")
    program_path, out_path = Path(program_path), Path(out_path)
    result = LoweringResult(toolchain={**probe_toolchain(options), "device": device})
    timings = result.timings

    on_phase(Phase.LOAD.value)
    log.info("loading %s", program_path)
    start = time.monotonic()
    # Lowering runs the model (the delegate export) and moves it to the device, and
    # the archive must carry the untouched original: it lowers a working copy, which is
    # the original itself for a program that running does not change, on the CPU (a
    # second load would hold the weights twice for the whole job).
    original, extra_files = load_program(program_path)
    to_lower: ExportedProgram | None = working_copy(original, device)
    timings["load"] = time.monotonic() - start

    def lower(files: list[Path] | None) -> tuple[ExportedProgram, list[Any]]:
        nonlocal to_lower
        program = to_lower if to_lower is not None else working_copy(original, device)
        to_lower = None
        with _phase(Phase.LOWER, timings, on_phase):
            _check_device(device)
            return lower_program(
                program, model_name=model_name, backend_id=backend_id, device=device,
                options=options, package_constants_in_so=not shared, compiled=files)

    def record() -> dict[str, Any]:
        return {**provenance, "model_name": model_name, "backend_id": backend_id,
                "device": device, "options": dict(options), "toolchain": result.toolchain,
                "weights": {"mode": weights, **({"load": LOAD_HINT} if shared else {})},
                "compiled_code": {"reused": result.code_reused},
                "verification": result.verification, "profile": result.profile,
                "timings": dict(timings)}

    def package(path: Path, delegate: ExportedProgram, aoti_files: list[Any]) -> None:
        write_archive(path, model_name=model_name, backend_id=backend_id, original=original,
                      delegate=delegate, aoti_files=aoti_files, provenance=record(),
                      max_bytes=max_artifact_bytes, extra_files=extra_files,
                      constants_map=constant_sources(original) if shared else None)

    if compiled is not None:
        result.code_reused = True
        try:
            _lower_and_check(result, lower(compiled), package, original=original,
                             out_path=out_path, verify=verify, on_phase=on_phase,
                             names=(model_name, backend_id, device), tolerances=(rtol, atol))
            return result
        except JobError as exc:
            # Not the program's fault as long as the key is sound: compile it afresh.
            log.warning("the reused compiled code did not give a verified archive (%s); "
                        "compiling afresh", exc)
            result.code_reused = False
            result.verification = result.profile = None
    _lower_and_check(result, lower(None), package, original=original, out_path=out_path,
                     verify=verify, on_phase=on_phase, names=(model_name, backend_id, device),
                     tolerances=(rtol, atol))
    return result


def _lower_and_check(result: LoweringResult, lowered: tuple[ExportedProgram, list[Any]],
                     package: Callable[[Path, ExportedProgram, list[Any]], None], *,
                     original: ExportedProgram, out_path: Path, verify: bool,
                     on_phase: Callable[[str], None], names: tuple[str, str, str],
                     tolerances: tuple[float, float]) -> None:
    """Package the lowered program, then (``verify``) verify and profile it."""
    delegate, aoti_files = lowered
    timings = result.timings
    model_name, backend_id, device = names
    if not verify:
        with _phase(Phase.PACKAGE, timings, on_phase):
            package(out_path, delegate, aoti_files)
        return

    # The verified archive is re-written with the verification result in its
    # provenance; only the extra file differs, the compiled files are reused.
    draft = out_path.with_name(f".{out_path.stem}.unverified.pt2")
    try:
        with _phase(Phase.PACKAGE, timings, on_phase):
            package(draft, delegate, aoti_files)
        with _phase(Phase.VERIFY, timings, on_phase, code=ErrorCode.VERIFICATION_FAILED):
            result.verification = verify_archive(
                archive_path=draft, program=original, model_name=model_name,
                backend_id=backend_id, device=device, rtol=tolerances[0], atol=tolerances[1],
            )
        if not result.verification["passed"]:
            raise JobError(ErrorCode.VERIFICATION_FAILED, _failure_message(result.verification),
                           detail=result.verification)
        result.profile = _profile(draft, original, model_name, backend_id, device, timings,
                                  on_phase)
        with _phase(Phase.PACKAGE, timings, lambda _: None):
            package(out_path, delegate, aoti_files)
    finally:
        draft.unlink(missing_ok=True)
