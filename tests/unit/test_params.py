"""Form parameters and the options allowlist, without a server."""

from __future__ import annotations

import pytest

from app.api.submit import parse_params
from app.errors import BadRequest, Unprocessable
from app.options import ALLOWED_OPTIONS, parse_options
from app.settings import Settings


def test_defaults() -> None:
    params = parse_params({"model_name": "m"}, settings=Settings(), cuda_devices=0)
    assert (params.backend_id, params.device, params.options, params.verify) == (
        "aoti", "cpu", {}, True)
    assert params.rtol == Settings().verify_rtol


def test_cuda_accepted_only_when_present() -> None:
    fields = {"model_name": "m", "device": "cuda:1"}
    assert parse_params(fields, settings=Settings(), cuda_devices=2).device == "cuda:1"
    with pytest.raises(Unprocessable, match="not available"):
        parse_params(fields, settings=Settings(), cuda_devices=1)
    with pytest.raises(Unprocessable, match="not available"):
        parse_params(fields, settings=Settings(), cuda_devices=None)


def test_options_are_normalised_and_typed() -> None:
    assert list(parse_options('{"freezing": true, "cpp.march": "x86-64-v2"}')) == [
        "cpp.march", "freezing"]
    with pytest.raises(Unprocessable, match="int"):
        parse_options('{"cpp.simdlen": true}')  # a bool is not an int here
    with pytest.raises(Unprocessable, match="one of"):
        parse_options('{"cpp.simdlen": 64}')
    with pytest.raises(BadRequest):
        parse_options("{")
    assert parse_options("  ") == {}
    assert all(spec.description for spec in ALLOWED_OPTIONS.values())


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWERING_PRELOAD_MODULES", "transformers.modeling_outputs, a.b")
    monkeypatch.setenv("LOWERING_WORKERS", "3")
    monkeypatch.setenv("LOWERING_DATA_DIR", "/tmp/x/../y")
    settings = Settings()
    assert settings.preload_modules == ["transformers.modeling_outputs", "a.b"]
    assert settings.workers == 3
    assert str(settings.data_dir) == "/tmp/y"
    assert settings.db_url == "sqlite:////tmp/y/jobs.db"
