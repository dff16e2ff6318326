"""OpenAPI additions: the multipart form (parsed by hand, so FastAPI cannot see it)."""

from __future__ import annotations

from typing import Any

from app.constants import NAME_PATTERN
from app.schemas import ErrorBody

FORM_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["program", "model_name"],
            "properties": {
                "program": {"type": "string", "format": "binary",
                            "description": ".pt2 file written by torch.export.save"},
                "model_name": {"type": "string", "pattern": NAME_PATTERN},
                "backend_id": {"type": "string", "default": "aoti"},
                "device": {"type": "string", "default": "cpu", "description": "cpu|cuda|cuda:N"},
                "options": {"type": "string", "description": "JSON object; see /v1/info"},
                "verify": {"type": "boolean", "default": True},
                "rtol": {"type": "number"},
                "atol": {"type": "number"},
            },
        }}},
    },
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 404, 408, 409, 413, 415, 422, 429, 503, 507)
}


