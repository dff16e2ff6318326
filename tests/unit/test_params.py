"""Form parameters and the options allowlist, without a server."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.api.submit import parse_params
from app.errors import ApiErrorCode, ServiceError, Unprocessable
from app.options import ALLOWED_OPTIONS, parse_options
from app.settings import Settings
from tests.strategies import form_fields, options_json


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
    with pytest.raises(Unprocessable, match="not valid JSON") as caught:
        parse_options("{")
    assert caught.value.code == ApiErrorCode.INVALID_PARAMETER
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


@pytest.mark.parametrize(
    ("raw", "error", "says"),
    [
        # Nesting deep enough to blow Python's recursion limit inside json.loads.
        ('{"freezing": ' + "[" * 30_000 + "]" * 30_000 + "}", Unprocessable, "bytes"),
        ("[" * 30_000, Unprocessable, "bytes"),
        # Under the size cap, still deeper than json.loads can recurse.
        ('{"freezing": ' + "[" * 2_000 + "]" * 2_000 + "}", Unprocessable, "nest"),
        ('{"a": ' + '{"b": ' * 500 + "1" + "}" * 501, Unprocessable, "nest"),
        # Past Python's int-to-str digit limit (4300), json.loads raises ValueError.
        ('{"cpp.simdlen": ' + "9" * 5_000 + "}", Unprocessable, "bytes"),
        ('{"cpp.simdlen": -' + "1" * 5_000 + "}", Unprocessable, "bytes"),
        # Below the size cap, numbers are still bounded in length.
        ('{"cpp.simdlen": ' + "9" * 100 + "}", Unprocessable, "digits"),
        ('{"cpp.simdlen": 1.' + "0" * 100 + "}", Unprocessable, "digits"),
        ('{"cpp.simdlen": 1e-' + "0" * 100 + "1}", Unprocessable, "digits"),
        ('{"cpp.simdlen": 1e999}', Unprocessable, "finite"),
        ('{"cpp.simdlen": NaN}', Unprocessable, "NaN"),
        ('{"cpp.simdlen": -Infinity}', Unprocessable, "Infinity"),
        ('{"freezing": true, "freezing": false}', Unprocessable, "twice"),
        ('{"cpp.march": "' + "x" * 70_000 + '"}', Unprocessable, "bytes"),
        ('"just a string"', Unprocessable, "JSON object"),
        ("null", Unprocessable, "JSON object"),
        ("1" * 5_000, Unprocessable, "bytes"),
        ("[" * 3_000, Unprocessable, "nest"),
    ],
)
def test_hostile_options_are_4xx_saying_what_to_fix(
    raw: str, error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says):
        parse_options(raw)


def test_options_limits_leave_real_options_alone() -> None:
    raw = '{"cpp.simdlen": 512, "cpp.march": "x86-64-v3", "freezing": false}'
    assert parse_options(raw) == {"cpp.march": "x86-64-v3", "cpp.simdlen": 512,
                                  "freezing": False}
    # Strings may contain brackets: they are not nesting.
    with pytest.raises(Unprocessable, match="must match"):
        parse_options('{"cpp.march": "' + "[" * 200 + '"}')


@pytest.mark.parametrize("raw", ["²", "1" * 5_000, "1e999", "-0.5", "inf"])
def test_hostile_tolerances_are_422(raw: str) -> None:
    with pytest.raises(Unprocessable, match="rtol"):
        parse_params({"model_name": "m", "rtol": raw}, settings=Settings(), cuda_devices=0)


@given(fields=form_fields, cuda=st.sampled_from([None, 0, 2]))
@settings(max_examples=400, deadline=None, database=None)
def test_fuzzed_form_fields_are_accepted_or_a_4xx(fields: dict[str, str],
                                                   cuda: int | None) -> None:
    try:
        params = parse_params(fields, settings=Settings(), cuda_devices=cuda)
    except ServiceError as exc:
        assert 400 <= exc.status < 500 and exc.message
        exc.message.encode("utf-8")  # the JSON error body must be encodable
    else:
        assert json.loads(json.dumps(params.as_fields(), allow_nan=False)) == params.as_fields()


@given(raw=options_json)
@settings(max_examples=300, deadline=None, database=None)
def test_fuzzed_options_json_is_accepted_or_a_4xx(raw: str) -> None:
    try:
        parse_options(raw)
    except ServiceError as exc:
        assert 400 <= exc.status < 500 and exc.message
        exc.message.encode("utf-8")
