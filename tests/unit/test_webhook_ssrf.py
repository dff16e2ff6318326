"""Webhook and callback targets: what the service refuses to send to (SSRF), and how a
checked address is the one connected to (no second DNS answer between check and send)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from app.errors import ApiErrorCode
from app.webhooks import targets
from app.webhooks.targets import TargetRefused, check_url, resolve

PRIVATE = [
    "http://127.0.0.1/hook",
    "http://127.1/",
    "http://2130706433/",  # 127.0.0.1 as one integer
    "http://0x7f.0.0.1/",
    "http://localhost:8080/",
    "http://10.1.2.3/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",  # carrier-grade NAT
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://0.0.0.0/",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "http://[::1]/",
    "http://[::]/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://[ff02::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
    "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
    "https://[::ffff:a00:1]:8443/",
]

MALFORMED = [
    "ftp://example.com/",
    "file:///etc/passwd",
    "gopher://example.com/",
    "javascript:alert(1)",
    "http://user:pw@example.com/",
    "http://user@example.com/",
    "http:///nohost",
    "/relative/path",
    "",
    "http://example.com/" + "a" * 2100,
    "http://exa mple.com/",
]


@pytest.mark.parametrize("url", PRIVATE)
def test_private_loopback_link_local_and_metadata_targets_are_refused(url: str) -> None:
    with pytest.raises(TargetRefused) as caught:
        resolve(url, allow_private=False)
    assert caught.value.code is ApiErrorCode.WEBHOOK_TARGET_REFUSED
    assert "LOWERING_WEBHOOK_ALLOW_PRIVATE" in caught.value.message


@pytest.mark.parametrize("url", MALFORMED)
def test_urls_that_are_not_plain_http_are_refused(url: str) -> None:
    with pytest.raises(TargetRefused) as caught:
        check_url(url)
    assert caught.value.code is ApiErrorCode.INVALID_WEBHOOK_URL
    with pytest.raises(TargetRefused):
        resolve(url, allow_private=True)


def test_allow_private_lets_a_local_receiver_through() -> None:
    target = resolve("http://127.0.0.1:9/hook?x=1", allow_private=True)
    assert target.address == "127.0.0.1" and target.port == 9
    assert target.pinned_url == "http://127.0.0.1:9/hook?x=1"


def test_a_public_literal_is_accepted_without_dns() -> None:
    target = resolve("https://93.184.215.14/hook", allow_private=False)
    assert (target.address, target.port, target.host) == ("93.184.215.14", 443, "93.184.215.14")


def _fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> None:
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in answers:
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6,
                     "", (a, port or 0)) for a in answers[host]]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(targets.socket, "getaddrinfo", getaddrinfo)


def test_a_name_with_any_private_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, {"mixed.example": ["93.184.215.14", "10.0.0.5"],
                            "v6.example": ["2606:2800:21f:cb07:6820:80da:af6b:8b2c", "::1"]})
    for url in ("http://mixed.example/", "http://v6.example/"):
        with pytest.raises(TargetRefused):
            resolve(url, allow_private=False)


def test_a_name_that_does_not_resolve_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def nothing(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(targets.socket, "getaddrinfo", nothing)
    with pytest.raises(TargetRefused, match="does not resolve"):
        resolve("http://nowhere.example/", allow_private=False)


def test_the_checked_address_is_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """The request goes to the address checked, with the name as Host and SNI: a second
    DNS answer (rebinding to 127.0.0.1) never reaches the connection."""
    _fake_dns(monkeypatch, {"hooks.example": ["93.184.215.14"]})
    target = resolve("https://hooks.example:8443/in?a=b", allow_private=False)
    assert target.pinned_url == "https://93.184.215.14:8443/in?a=b"
    assert target.headers == {"host": "hooks.example:8443"}
    assert target.extensions == {"sni_hostname": "hooks.example"}
    _fake_dns(monkeypatch, {"hooks6.example": ["2606:2800:21f:cb07:6820:80da:af6b:8b2c"]})
    target = resolve("http://hooks6.example/", allow_private=False)
    assert target.pinned_url == "http://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/"
    assert target.headers == {"host": "hooks6.example"}
