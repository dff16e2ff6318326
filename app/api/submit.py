"""Turn a received multipart form into job parameters, or a 4xx saying what to fix."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from app.constants import DEVICE_PATTERN, NAME_PATTERN
from app.errors import ApiErrorCode, Unprocessable
from app.options import parse_options
from app.settings import Settings

KNOWN_FIELDS = {"model_name", "backend_id", "device", "options", "verify", "rtol", "atol"}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class LoweringParams:
    """The validated request parameters of one lowering."""

    model_name: str
    backend_id: str
    device: str
    options: dict[str, Any]
    verify: bool
    rtol: float
    atol: float

    def as_fields(self) -> dict[str, Any]:
        return dict(self.__dict__)


def parse_params(
    fields: dict[str, str], *, settings: Settings, cuda_devices: int | None
) -> LoweringParams:
    """Validate the form fields; ``cuda_devices`` is None when the host is not probed yet."""
    unknown = sorted(set(fields) - KNOWN_FIELDS)
    if unknown:
        raise Unprocessable(
            f"unknown form field(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_FIELDS))}",
            code=ApiErrorCode.UNKNOWN_FIELD,
        )
    model_name = fields.get("model_name")
    if model_name is None:
        raise Unprocessable("form field 'model_name' is required", code=ApiErrorCode.MISSING_FIELD)
    _check_name("model_name", model_name)
    backend_id = fields.get("backend_id", "aoti")
    _check_name("backend_id", backend_id)
    device = fields.get("device", "cpu").strip().lower()
    _check_device(device, cuda_devices)
    return LoweringParams(
        model_name=model_name,
        backend_id=backend_id,
        device=device,
        options=parse_options(fields.get("options")),
        verify=_parse_bool("verify", fields.get("verify"), default=True),
        rtol=_parse_tolerance("rtol", fields.get("rtol"), settings.verify_rtol),
        atol=_parse_tolerance("atol", fields.get("atol"), settings.verify_atol),
    )


def _check_name(field: str, value: str) -> None:
    if not re.fullmatch(NAME_PATTERN, value):
        raise Unprocessable(
            f"{field} {value[:140]!r} must match {NAME_PATTERN} (letters, digits, '_', '.', '-'; "
            "at most 128 characters, starting with a letter or digit)",
            code=ApiErrorCode.INVALID_NAME,
        )


def _check_device(device: str, cuda_devices: int | None) -> None:
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise Unprocessable(f"device {device[:40]!r} must be cpu, cuda or cuda:N",
                            code=ApiErrorCode.INVALID_DEVICE)
    if device == "cpu":
        return
    index = int(device.partition(":")[2] or 0)
    if not cuda_devices or index >= cuda_devices:
        have = f"{cuda_devices} CUDA device(s)" if cuda_devices is not None else "no known GPU"
        raise Unprocessable(
            f"device {device!r} is not available on this host ({have}); use cpu",
            code=ApiErrorCode.DEVICE_UNAVAILABLE,
        )


def _parse_bool(field: str, raw: str | None, *, default: bool) -> bool:
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise Unprocessable(f"{field} must be true or false")


def _parse_tolerance(field: str, raw: str | None, default: float) -> float:
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise Unprocessable(f"{field} must be a finite number >= 0")
    return value
