"""The submit form (LoweringCreate through parse_form), the options allowlist and the
OpenAPI that describes them, without a server."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import Response
from hypothesis import given, settings
from hypothesis import strategies as st

from app.api.openapi import ERROR_RESPONSES, FORM_SCHEMA, SUBMIT_RESPONSES
from app.api.submit import parse_form
from app.errors import ApiErrorCode, ServiceError, Unprocessable
from app.options import ALLOWED_OPTIONS, parse_options
from app.schemas import LoweringCreate, LoweringPublic
from app.settings import Settings
from tests.strategies import form_fields, options_json


def _parse(fields: dict[str, str], cuda_devices: int | None = 0) -> LoweringCreate:
    return parse_form(fields, settings=Settings(), cuda_devices=cuda_devices)


def test_defaults() -> None:
    params = _parse({"model_name": "m"})
    assert (params.backend_id, params.device, params.options, params.verify) == (
        "aoti", "cpu", {}, True)
    assert (params.rtol, params.atol) == (Settings().verify_rtol, Settings().verify_atol)
    assert params.as_fields() == {"model_name": "m", "backend_id": "aoti", "device": "cpu",
                                  "options": {}, "verify": True, "rtol": params.rtol,
                                  "atol": params.atol}


def test_blank_optional_fields_are_their_defaults() -> None:
    blank = {"model_name": "m", "options": " ", "verify": "", "rtol": "", "atol": "\t"}
    assert _parse(blank) == _parse({"model_name": "m"})


def test_cuda_accepted_only_when_present() -> None:
    fields = {"model_name": "m", "device": "cuda:1"}
    assert _parse(fields, cuda_devices=2).device == "cuda:1"
    with pytest.raises(Unprocessable, match="not available"):
        _parse(fields, cuda_devices=1)
    with pytest.raises(Unprocessable, match="not available"):
        _parse(fields, cuda_devices=None)


@pytest.mark.parametrize(("raw", "device"), [("CPU", "cpu"), (" cuda:1\n", "cuda:1"),
                                             ("Cuda", "cuda"), ("\tcpu ", "cpu")])
def test_device_is_trimmed_and_lower_cased(raw: str, device: str) -> None:
    assert _parse({"model_name": "m", "device": raw}, cuda_devices=2).device == device


@pytest.mark.parametrize(("raw", "value"), [
    *[(word, True) for word in ("true", "1", "yes", "on", "TRUE", " Yes ", "On")],
    *[(word, False) for word in ("false", "0", "no", "off", "False", " NO", "OFF ")],
])
def test_verify_spellings(raw: str, value: bool) -> None:
    assert _parse({"model_name": "m", "verify": raw}).verify is value


@pytest.mark.parametrize("raw", ["maybe", "t", "f", "y", "n", "2", "-1", "truefalse", "\u0661"])
def test_other_verify_spellings_are_422(raw: str) -> None:
    with pytest.raises(Unprocessable, match="verify must be true or false") as caught:
        _parse({"model_name": "m", "verify": raw})
    assert caught.value.code is ApiErrorCode.INVALID_PARAMETER


# The cases of tests/e2e/test_errors.py::test_bad_fields_are_rejected, without a server.
@pytest.mark.parametrize(
    ("fields", "code", "says"),
    [
        ({}, ApiErrorCode.MISSING_FIELD, "model_name"),
        ({"model_name": "-bad"}, ApiErrorCode.INVALID_NAME, "model_name"),
        ({"model_name": "a" * 129}, ApiErrorCode.INVALID_NAME, "128"),
        ({"model_name": "m", "backend_id": "x/y"}, ApiErrorCode.INVALID_NAME, "backend_id"),
        ({"model_name": "m", "backend_id": ""}, ApiErrorCode.INVALID_NAME, "backend_id"),
        ({"model_name": "m", "device": "tpu"}, ApiErrorCode.INVALID_DEVICE, "cpu, cuda"),
        ({"model_name": "m", "device": ""}, ApiErrorCode.INVALID_DEVICE, "cpu, cuda"),
        ({"model_name": "m", "device": "cuda"}, ApiErrorCode.DEVICE_UNAVAILABLE, "not available"),
        ({"model_name": "m", "device": "cuda:3"}, ApiErrorCode.DEVICE_UNAVAILABLE, "cuda:3"),
        ({"model_name": "m", "options": "{not json"}, ApiErrorCode.INVALID_PARAMETER, "JSON"),
        ({"model_name": "m", "options": "[1]"}, ApiErrorCode.INVALID_PARAMETER, "JSON object"),
        ({"model_name": "m", "options": '{"evil": 1}'}, ApiErrorCode.UNKNOWN_OPTION, "allowed"),
        ({"model_name": "m", "options": '{"max_autotune": "yes"}'}, ApiErrorCode.INVALID_OPTION,
         "bool"),
        ({"model_name": "m", "options": '{"cpp.march": "native; rm -rf /"}'},
         ApiErrorCode.INVALID_OPTION, "must match"),
        ({"model_name": "m", "verify": "maybe"}, ApiErrorCode.INVALID_PARAMETER, "true or false"),
        ({"model_name": "m", "rtol": "-1"}, ApiErrorCode.INVALID_PARAMETER, "rtol"),
        ({"model_name": "m", "atol": "nan"}, ApiErrorCode.INVALID_PARAMETER, "atol"),
        ({"model_name": "m", "colour": "red"}, ApiErrorCode.UNKNOWN_FIELD, "colour"),
        # Unknown fields come first, then the fields in order.
        ({"colour": "red", "device": "tpu"}, ApiErrorCode.UNKNOWN_FIELD, "colour"),
        ({"device": "tpu"}, ApiErrorCode.MISSING_FIELD, "model_name"),
        ({"model_name": "m", "device": "tpu", "rtol": "x"}, ApiErrorCode.INVALID_DEVICE, "tpu"),
    ],
)
def test_bad_fields_are_422_saying_what_to_fix(
    fields: dict[str, str], code: ApiErrorCode, says: str
) -> None:
    with pytest.raises(Unprocessable) as caught:
        _parse(fields)
    assert (caught.value.status, caught.value.code) == (422, code)
    assert says in caught.value.message


def test_unknown_fields_are_all_named_with_the_known_ones() -> None:
    with pytest.raises(Unprocessable) as caught:
        _parse({"model_name": "m", "colour": "red", "program ": "x", "z" * 500: ""})
    message = caught.value.message
    assert "colour" in message and "'program '" not in message and "z" * 81 not in message
    assert message.endswith("known: " + ", ".join(sorted(LoweringCreate.model_fields)))


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


def test_options_given_as_a_dict_are_checked_too() -> None:
    assert LoweringCreate(model_name="m", options={"freezing": True}).options == {
        "freezing": True}
    with pytest.raises(ValueError, match="not allowed"):
        LoweringCreate(model_name="m", options={"evil": 1})


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


@pytest.mark.parametrize("field", ["rtol", "atol"])
@pytest.mark.parametrize("raw", ["²", "1" * 5_000, "1e999", "-1e999", "-0.5", "-1", "inf",
                                 "-inf", "Infinity", "nan", "NaN", "-nan", "0x10", "1,5",
                                 "x", "1e", "\u0663"])
def test_hostile_tolerances_are_422(field: str, raw: str) -> None:
    with pytest.raises(Unprocessable, match=f"^{field} must be a finite number >= 0$") as caught:
        _parse({"model_name": "m", field: raw})
    assert caught.value.code is ApiErrorCode.INVALID_PARAMETER


@pytest.mark.parametrize(("raw", "value"), [("0", 0.0), ("1e-3", 1e-3), (" 0.5 ", 0.5),
                                            ("1E2", 100.0), ("+2", 2.0)])
def test_tolerances(raw: str, value: float) -> None:
    assert _parse({"model_name": "m", "rtol": raw, "atol": raw}).atol == value


@given(fields=form_fields, cuda=st.sampled_from([None, 0, 2]))
@settings(max_examples=400, deadline=None, database=None)
def test_fuzzed_form_fields_are_accepted_or_a_4xx(fields: dict[str, str],
                                                   cuda: int | None) -> None:
    try:
        params = _parse(fields, cuda_devices=cuda)
    except ServiceError as exc:
        assert exc.status == 422 and exc.message
        exc.message.encode("utf-8")  # the JSON error body must be encodable
    else:
        assert set(fields) <= set(LoweringCreate.model_fields)
        assert json.loads(json.dumps(params.as_fields(), allow_nan=False)) == params.as_fields()
        assert math.isfinite(params.rtol or 0) and (params.rtol or 0) >= 0


@given(raw=options_json)
@settings(max_examples=300, deadline=None, database=None)
def test_fuzzed_options_json_is_accepted_or_a_4xx(raw: str) -> None:
    try:
        parse_options(raw)
    except ServiceError as exc:
        assert 400 <= exc.status < 500 and exc.message
        exc.message.encode("utf-8")


_name = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", fullmatch=True)
_tolerance = st.floats(min_value=0, allow_nan=False, allow_infinity=False)


@given(model_name=_name, backend_id=_name, device=st.sampled_from(["cpu", "cuda", "cuda:1"]),
       verify=st.booleans(), rtol=_tolerance, atol=st.none() | _tolerance,
       options=st.dictionaries(st.sampled_from(["freezing", "max_autotune"]), st.booleans()))
@settings(max_examples=200, deadline=None, database=None)
def test_a_valid_form_round_trips(model_name: str, backend_id: str, device: str, verify: bool,
                                  rtol: float, atol: float | None, options: dict[str, Any]
                                  ) -> None:
    """What a client sends for a LoweringCreate is read back as that LoweringCreate."""
    fields = {"model_name": model_name, "backend_id": backend_id, "device": device.upper(),
              "options": json.dumps(options), "verify": str(verify), "rtol": repr(rtol)}
    if atol is not None:
        fields["atol"] = repr(atol)
    parsed = _parse(fields, cuda_devices=2)
    assert parsed == LoweringCreate(
        model_name=model_name, backend_id=backend_id, device=device, options=options,
        verify=verify, rtol=rtol, atol=Settings().verify_atol if atol is None else atol)


def test_form_schema_is_the_models() -> None:
    schema = FORM_SCHEMA["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert list(schema["properties"]) == ["program", "upload", *LoweringCreate.model_fields]
    assert schema["required"] == ["model_name"]  # and program or upload
    assert schema["properties"]["rtol"] == {
        "type": "number", "minimum": 0, "title": "Rtol",
        "description": LoweringCreate.model_fields["rtol"].description}
    assert schema["properties"]["options"]["type"] == "string"
    assert schema["properties"]["verify"] == {**schema["properties"]["verify"],
                                              "type": "boolean", "default": True}


def test_submit_responses_in_openapi() -> None:
    app = FastAPI()

    @app.post("/v1/lowerings", status_code=202, response_model=LoweringPublic,
              openapi_extra=FORM_SCHEMA, responses=SUBMIT_RESPONSES)
    async def create() -> Response:
        raise NotImplementedError

    @app.get("/v1/lowerings/{job_id}", responses=ERROR_RESPONSES)
    async def get(job_id: str) -> Response:
        raise NotImplementedError

    paths = app.openapi()["paths"]
    responses = paths["/v1/lowerings"]["post"]["responses"]
    job = {"schema": {"$ref": "#/components/schemas/LoweringPublic"}}
    # ?wait: 200 is only ever the archive; a failed or cancelled job is an error (below).
    assert responses["200"]["content"] == {"application/zip": {
        "schema": {"type": "string", "format": "binary"}}}
    assert responses["202"]["content"] == {"application/json": job}
    assert "Location" in responses["202"]["headers"]
    assert "Retry-After" in responses["429"]["headers"]
    errors = {"400", "401", "403", "408", "409", "413", "415", "422", "429", "500", "503",
              "507"}
    assert set(responses) == {"200", "202", *errors}
    assert "missing_field" in responses["422"]["description"]
    assert "job_failed" in responses["422"]["description"]
    assert "job_cancelled" in responses["409"]["description"]
    error = {"$ref": "#/components/schemas/ErrorBody"}
    assert responses["422"]["content"]["application/json"]["schema"] == error
    statuses = {str(code.status) for code in ApiErrorCode} - {"405"}
    assert set(paths["/v1/lowerings/{job_id}"]["get"]["responses"]) == {"200", *statuses}
