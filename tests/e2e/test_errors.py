"""Every bad request is a JSON 4xx that says what to fix; nothing is queued or left behind."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import Server
from tests.factories import leftover_uploads, rewrite_zip, submit, zip_bytes


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert "Traceback" not in response.text
    return str(body["error"]["message"])


@pytest.fixture
def job_count(client: httpx.Client) -> int:
    return len(client.get("/v1/lowerings", params={"limit": 500}).json()["items"])


@pytest.mark.parametrize(
    ("fields", "status", "code", "says"),
    [
        ({}, 422, "missing_field", "model_name"),
        ({"model_name": "-bad"}, 422, "invalid_name", "model_name"),
        ({"model_name": "a" * 129}, 422, "invalid_name", "128"),
        ({"model_name": "m", "backend_id": "x/y"}, 422, "invalid_name", "backend_id"),
        ({"model_name": "m", "device": "tpu"}, 422, "invalid_device", "cpu, cuda"),
        ({"model_name": "m", "device": "cuda"}, 422, "device_unavailable", "not available"),
        ({"model_name": "m", "device": "cuda:3"}, 422, "device_unavailable", "cuda:3"),
        ({"model_name": "m", "options": "{not json"}, 422, "invalid_parameter", "JSON"),
        ({"model_name": "m", "options": "[1]"}, 422, "invalid_parameter", "JSON object"),
        ({"model_name": "m", "options": '{"evil": 1}'}, 422, "unknown_option", "allowed"),
        ({"model_name": "m", "options": '{"max_autotune": "yes"}'}, 422, "invalid_option",
         "bool"),
        ({"model_name": "m", "options": '{"cpp.march": "native; rm -rf /"}'}, 422,
         "invalid_option", "must match"),
        ({"model_name": "m", "verify": "maybe"}, 422, "invalid_parameter", "true or false"),
        ({"model_name": "m", "rtol": "-1"}, 422, "invalid_parameter", "rtol"),
        ({"model_name": "m", "atol": "nan"}, 422, "invalid_parameter", "atol"),
        ({"model_name": "m", "colour": "red"}, 422, "unknown_field", "colour"),
    ],
)
def test_bad_fields_are_rejected(
    client: httpx.Client, server: Server, programs: Path, job_count: int,
    fields: dict[str, str], status: int, code: str, says: str,
) -> None:
    message = _error(submit(client, programs / "linear.pt2", **fields), status, code)
    assert says in message
    assert len(client.get("/v1/lowerings", params={"limit": 500}).json()["items"]) == job_count
    assert leftover_uploads(server.data_dir) == []


def test_not_multipart_is_415(client: httpx.Client) -> None:
    response = client.post("/v1/lowerings", json={"model_name": "m"})
    assert "multipart" in _error(response, 415, "not_multipart")


def test_missing_file_is_rejected(client: httpx.Client) -> None:
    response = client.post("/v1/lowerings", data={"model_name": "m"},
                           files={"other": ("x", b"1")})
    assert "program" in _error(response, 400, "bad_request")
    response = client.post("/v1/lowerings", files={"model_name": (None, "m")})
    assert "program" in _error(response, 422, "missing_field")


def test_malformed_multipart_is_400(client: httpx.Client, server: Server) -> None:
    body = b"--xyz\r\nContent-Disposition: form-data; name=\"program\"; filename=\"a\"\r\n\r\nabc"
    response = client.post("/v1/lowerings", content=body,
                           headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert response.status_code == 400, response.text
    assert leftover_uploads(server.data_dir) == []


def test_not_a_zip_is_415(client: httpx.Client, server: Server) -> None:
    response = submit(client, b"this is not a zip" * 100, model_name="m")
    assert "torch.export.save" in _error(response, 415, "not_a_pt2_archive")
    assert leftover_uploads(server.data_dir) == []


def test_upload_over_limit_is_413(client: httpx.Client, server: Server) -> None:
    big = b"\0" * (9 * 1024 * 1024)  # the shared server caps uploads at 8 MiB
    response = submit(client, big, model_name="m")
    assert "LOWERING_MAX_UPLOAD_BYTES" in _error(response, 413, "upload_too_large")
    assert leftover_uploads(server.data_dir) == []


@pytest.mark.parametrize(
    ("change", "code", "says"),
    [
        ({"drop": "data/sample_inputs/"}, "missing_example_inputs", "example inputs"),
        ({"drop": "models/"}, "unsupported_layout", "models/"),
        ({"add": {"linear/data/aotinductor/m-aoti/x.so": b"\x7fELF"}}, "unsupported_layout",
         "aotinductor"),
        ({"add": {"other/file": b"x"}}, "unsupported_layout", "one root folder"),
    ],
)
def test_wrong_layout_is_422(
    client: httpx.Client, server: Server, programs: Path, change: dict[str, object],
    code: str, says: str,
) -> None:
    payload = rewrite_zip(programs / "linear.pt2", **change)  # type: ignore[arg-type]
    assert says in _error(submit(client, payload, model_name="m"), 422, code)
    assert leftover_uploads(server.data_dir) == []


def test_empty_zip_is_rejected(client: httpx.Client) -> None:
    message = _error(submit(client, zip_bytes({}), model_name="m"), 422, "unsupported_layout")
    assert "empty" in message


def test_unknown_ids_are_404(client: httpx.Client) -> None:
    for method, path in [("GET", "/v1/lowerings/nope"), ("GET", "/v1/lowerings/nope/artifact"),
                         ("GET", "/v1/lowerings/nope/log"), ("POST", "/v1/lowerings/nope/cancel"),
                         ("DELETE", "/v1/lowerings/nope")]:
        assert "nope" in _error(client.request(method, path), 404, "not_found")
    _error(client.get("/v2/whatever"), 404, "not_found")


@pytest.mark.parametrize(
    "params",
    [
        {"cursor": "abc"}, {"cursor": "99999999999999999999"}, {"cursor": "9" * 5000},
        {"cursor": "-1"}, {"cursor": "0"}, {"cursor": "\u00b2"}, {"cursor": "1.5"},
        {"limit": 0}, {"limit": "99999999999999999999"}, {"limit": "-5"}, {"limit": "1e3"},
        {"status": "done"}, {"model_name": "a\x00b"}, {"model_name": "x" * 5000},
    ],
)
def test_bad_list_queries_are_422(client: httpx.Client, params: dict[str, object]) -> None:
    message = _error(client.get("/v1/lowerings", params=params), 422, "invalid_parameter")
    assert next(iter(params)) in message


@pytest.mark.parametrize("wait", ["-1", "nan", "inf", "1e999", "99999999999999999999", "x"])
def test_bad_wait_is_422(client: httpx.Client, wait: str) -> None:
    response = client.post("/v1/lowerings", params={"wait": wait})
    assert "wait" in _error(response, 422, "invalid_parameter")


@pytest.mark.parametrize("job_id", ["a\x00b", "x" * 5000, "../../etc", "%", " "])
def test_ids_that_cannot_exist_are_404(client: httpx.Client, job_id: str) -> None:
    for method, suffix in [("GET", ""), ("GET", "/artifact"), ("GET", "/log"),
                           ("POST", "/cancel"), ("DELETE", "")]:
        path = "/v1/lowerings/" + quote(job_id, safe="") + suffix
        response = client.request(method, path)
        assert response.status_code in (404, 405), (method, path, response.text)
        assert set(response.json()) == {"error"}


@pytest.mark.parametrize(
    ("options", "status", "says"),
    [
        ('{"freezing": ' + "[" * 2_000 + "]" * 2_000 + "}", 422, "nest"),
        ('{"cpp.simdlen": ' + "9" * 5_000 + "}", 422, "bytes"),
        ('{"cpp.simdlen": ' + "9" * 100 + "}", 422, "digits"),
        ('{"cpp.simdlen": NaN}', 422, "NaN"),
        ('{"cpp.simdlen": 1e999}', 422, "finite"),
        ('{"freezing": true, "freezing": true}', 422, "twice"),
    ],
)
def test_hostile_options_are_4xx(
    client: httpx.Client, server: Server, options: str, status: int, says: str
) -> None:
    response = submit(client, b"not a zip", model_name="m", options=options)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]
    assert leftover_uploads(server.data_dir) == []


@pytest.mark.parametrize("length", [71, 200, 256, 257, 300, 5000])
def test_long_multipart_boundary_is_400(client: httpx.Client, length: int) -> None:
    boundary = "b" * length
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="model_name"\r\n\r\nm\r\n'
            f"--{boundary}--\r\n").encode()
    response = client.post("/v1/lowerings", content=body,
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert "boundary" in _error(response, 400, "malformed_multipart")


def test_duplicate_form_field_is_400(client: httpx.Client, programs: Path) -> None:
    response = client.post("/v1/lowerings", data={"model_name": ["a", "b"]},
                           files={"program": ("p.pt2", b"PK", "application/octet-stream")})
    assert "model_name" in _error(response, 400, "duplicate_field")


def test_health_ready_info(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    info = client.get("/v1/info").json()
    # What the README documents: versions, devices, limits, sandbox, option allowlist.
    assert info["service"]["name"] == "lowering-service"
    assert isinstance(info["service"]["version"], str) and info["service"]["version"]
    assert info["torch_version"].startswith("2.")
    assert info["devices"][0] == "cpu"
    assert all(device == "cpu" or device.startswith("cuda:") for device in info["devices"])
    limits = info["limits"]
    assert limits["max_upload_bytes"] == 8 * 1024 * 1024
    assert all(isinstance(limits[key], (int, float)) and limits[key] > 0
               for key in ("job_timeout_s", "max_wait_s")), limits
    assert isinstance(info["sandbox"]["mode"], str)
    assert isinstance(info["sandbox"]["available"], bool)
    assert "cpp.march" in info["options"]
    for key, spec in info["options"].items():
        assert spec["type"] in {"bool", "int", "float", "str"} and spec["description"], key
