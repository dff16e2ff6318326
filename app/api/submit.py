"""The submit form's text fields as a LoweringCreate, or a 422 saying what to fix."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from app.constants import NAME_PATTERN
from app.errors import ApiErrorCode, Unprocessable
from app.schemas import LoweringCreate
from app.settings import Settings

# What to fix, per field, when LoweringCreate refuses its value.
_RULES: dict[str, tuple[ApiErrorCode, str]] = {
    "model_name": (ApiErrorCode.INVALID_NAME, f"must match {NAME_PATTERN} (letters, digits, "
                   "'_', '.', '-'; at most 128 characters, starting with a letter or digit)"),
    "backend_id": (ApiErrorCode.INVALID_NAME, f"must match {NAME_PATTERN}"),
    "device": (ApiErrorCode.INVALID_DEVICE, "must be cpu, cuda or cuda:N"),
    "options": (ApiErrorCode.INVALID_PARAMETER, "must be a JSON object of AOTInductor settings"),
    "verify": (ApiErrorCode.INVALID_PARAMETER,
               "must be true or false (or 1/0, yes/no, on/off)"),
    "rtol": (ApiErrorCode.INVALID_PARAMETER, "must be a finite number >= 0"),
    "atol": (ApiErrorCode.INVALID_PARAMETER, "must be a finite number >= 0"),
    "targets": (ApiErrorCode.INVALID_PARAMETER, "must be a JSON array of objects"),
}
_SHOWN = {"model_name", "backend_id", "device"}  # fields whose refused value the message repeats
_CODES = frozenset(code.value for code in ApiErrorCode)


def parse_form(
    fields: Mapping[str, Any], *, settings: Settings, cuda_devices: int | None,
    check_device: bool = True,
) -> LoweringCreate:
    """Validate the form fields; ``cuda_devices`` is None when the host is not probed yet.
    ``check_device`` False (a fleet): any well-formed device is accepted.

    The result's rtol and atol are never None: a tolerance left out is the settings' one.
    """
    try:
        create = LoweringCreate.model_validate(fields)
    except ValidationError as exc:
        raise _unprocessable(exc.errors(include_url=False)) from None
    if check_device:
        _check_available(create.device, cuda_devices)
    return create.model_copy(update={
        "rtol": settings.verify_rtol if create.rtol is None else create.rtol,
        "atol": settings.verify_atol if create.atol is None else create.atol,
    })


def parse_targets(
    fields: Mapping[str, Any], *, settings: Settings, cuda_devices: int | None,
    check_device: bool = True,
) -> list[LoweringCreate]:
    """One form per target, in order: the form itself when it names no ``targets``; else
    the form with each target's device and options (merged over the form's), each checked
    as parse_form checks one (its refusal names ``targets[i]``). A repeated target, or
    any bad one, refuses the whole form."""
    check = partial(parse_form, settings=settings, cuda_devices=cuda_devices,
                    check_device=check_device)
    form = check(fields)
    if form.targets is None:
        return [form]
    base = {name: value for name, value in fields.items() if name != "targets"}
    resolved: list[LoweringCreate] = []
    for index, target in enumerate(form.targets):
        one = {**base, "device": target.get("device", form.device),
               "options": {**form.options, **target.get("options", {})}}
        try:
            params = check(one)
        except Unprocessable as exc:
            raise Unprocessable(f"targets[{index}]: {exc.message}", code=exc.code) from None
        if params in resolved:
            raise Unprocessable(f"targets[{index}] repeats targets[{resolved.index(params)}] "
                                "(same device and options); name each target once")
        resolved.append(params)
    return resolved


def _unprocessable(errors: list[ErrorDetails]) -> Unprocessable:
    """One error, the first a caller should fix: unknown fields, then in field order."""
    unknown = sorted(str(err["loc"][0])[:80] for err in errors
                     if err["type"] == "extra_forbidden" and err["loc"])
    if unknown:
        return Unprocessable(f"unknown form field(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(LoweringCreate.model_fields))}",
                             code=ApiErrorCode.UNKNOWN_FIELD)
    err = errors[0]
    field = str(err["loc"][0]) if err["loc"] else ""
    if err["type"] == "missing":
        return Unprocessable(f"form field {field!r} is required", code=ApiErrorCode.MISSING_FIELD)
    if err["type"] in _CODES:  # app.options' own refusal, already saying what to fix
        return Unprocessable(err["msg"], code=ApiErrorCode(err["type"]))
    if field not in _RULES:
        return Unprocessable(f"{field or 'the form'}: {err['msg']}")
    code, rule = _RULES[field]
    shown = f" {str(err.get('input'))[:140]!r}" if field in _SHOWN else ""
    return Unprocessable(f"{field}{shown} {rule}", code=code)


def _check_available(device: str, cuda_devices: int | None) -> None:
    if device == "cpu":
        return
    index = int(device.partition(":")[2] or 0)
    if not cuda_devices or index >= cuda_devices:
        have = f"{cuda_devices} CUDA device(s)" if cuda_devices is not None else "no known GPU"
        raise Unprocessable(
            f"device {device!r} is not available on this host ({have}); use cpu",
            code=ApiErrorCode.DEVICE_UNAVAILABLE,
        )
