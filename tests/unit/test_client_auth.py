"""The API key in the SDK and lowerctl: sent to the service, never anywhere else."""

from __future__ import annotations

import httpx
import pytest

from app.client.cli import main
from app.client.sdk import LoweringClient


def _recorder(seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"items": [], "next_cursor": None})

    return httpx.MockTransport(handle)


def test_the_key_goes_to_the_service_origin_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOWERING_API_KEY", raising=False)
    seen: list[httpx.Request] = []
    with LoweringClient("http://api:8000", api_key="lsk_k", transport=_recorder(seen)) as client:
        client._http.get("/v1/lowerings")
        # A presigned part URL of an object store, another port, another scheme.
        for url in ("http://bucket.s3.example/part?X-Amz-Signature=x",
                    "http://api:9000/v1/lowerings", "https://api:8000/v1/lowerings"):
            client._http.put(url, content=b"x")
    assert seen[0].headers["authorization"] == "Bearer lsk_k"
    assert all("authorization" not in request.headers for request in seen[1:])


def test_the_key_comes_from_the_environment_unless_given(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWERING_API_KEY", "lsk_env")
    seen: list[httpx.Request] = []
    with LoweringClient("http://api", transport=_recorder(seen)) as client:
        client._http.get("/v1/lowerings")
    with LoweringClient("http://api", api_key="", transport=_recorder(seen)) as client:
        client._http.get("/v1/lowerings")
    assert seen[0].headers["authorization"] == "Bearer lsk_env"
    assert "authorization" not in seen[1].headers


def test_lowerctl_sends_api_key_and_reads_the_variable(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("LOWERING_API_KEY", raising=False)
    seen: list[httpx.Request] = []
    assert main(["--url", "http://api", "--api-key", "lsk_flag", "list"],
                transport=_recorder(seen)) == 0
    monkeypatch.setenv("LOWERING_API_KEY", "lsk_var")
    assert main(["--url", "http://api", "list"], transport=_recorder(seen)) == 0
    monkeypatch.delenv("LOWERING_API_KEY")
    assert main(["--url", "http://api", "list"], transport=_recorder(seen)) == 0
    capsys.readouterr()
    assert [r.headers.get("authorization") for r in seen] == [
        "Bearer lsk_flag", "Bearer lsk_var", None]
